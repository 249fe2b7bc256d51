"""Training checkpoints that never lose work: atomic, checksummed, pruned, verified at resume.

Layout::

    OUT/ckpt/step_000123/      one directory per saved optimiser step (the step count *after* that step)
        model.pt               model state_dict (parameters + persistent buffers, so the MoE router biases too)
        optimizer.pt           optimiser state_dict
        trainer.pt             scheduler, step, tokens, RNG states, data position, metrics so far
        manifest.json          format, step, and the size + sha256 of every file above (written last)

A checkpoint is written into ``OUT/ckpt/.tmp-step_000123-<pid>/``, every file fsynced, then the directory is
renamed into place in one ``os.rename`` (atomic on POSIX), so a reader sees either the whole checkpoint or
none. A kill mid-write leaves only a ``.tmp-*`` directory, which the next resume reports and removes.
Re-saving a step that exists moves the old copy to ``.trash-step_000123-<pid>/`` first (POSIX cannot rename a
directory over a non-empty one); a kill between the two renames leaves the step only in the trash, so
:func:`clean_temporaries` puts such a trash directory back instead of deleting it.
:func:`latest_valid` walks the checkpoints newest first and returns the first whose manifest matches its
files; corrupt ones (bad checksum, missing or truncated file, no manifest) are reported and moved aside to
``OUT/ckpt/corrupt-*`` (never deleted: they may still hold something a person wants).

Files are read with ``torch.load(weights_only=True)``: only tensors and plain containers, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsv32.checkpoint import fsync_path, pid_alive

FORMAT = "dsv32-train-ckpt/1"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"step_(\d+)")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped at resume (corrupt, partial) or a leftover temporary was cleaned up."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(root: str | Path, step: int, parts: dict[str, Any], *, keep: int | None = 3,
                    info: dict[str, Any] | None = None) -> Path:
    """Write ``parts`` (name -> torch-saveable object, saved as ``name.pt``) as ``root/step_{step:06d}``.

    Atomic (temporary directory + rename); an existing checkpoint of the same step is replaced, and at every
    moment either it or its replacement is a complete ``step_*`` or a trash directory that
    :func:`clean_temporaries` restores. Afterwards only the newest ``keep`` checkpoints are kept (``None`` or 0:
    keep all). ``info`` goes into the manifest.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}
    for part, obj in parts.items():
        path = tmp / f"{part}.pt"
        _write_file(path, lambda f, obj=obj: torch.save(obj, f))
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "step": step, "time": time.time(), "files": files, **(info or {})}
    _write_file(tmp / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode()))
    fsync_path(tmp)
    final = root / name
    trash = None
    if final.exists():  # re-saving a step: swap, then delete (a kill in between: clean_temporaries restores)
        trash = root / f".trash-{name}-{os.getpid()}"
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(final, trash)
        fsync_path(root)
    os.rename(tmp, final)
    fsync_path(root)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    if keep:
        for old in list_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """``root/step_*`` directories, newest (highest step) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint is complete and every checksum matches, else what is wrong."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (partial checkpoint)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest.json ({e})"
    if manifest.get("format") != FORMAT:
        return f"unknown format {manifest.get('format')!r}"
    for fname, meta in manifest.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            return f"missing file {fname}"
        if f.stat().st_size != meta["bytes"]:
            return f"{fname} is {f.stat().st_size} bytes, manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{fname}: sha256 mismatch"
    return None


def clean_temporaries(root: str | Path, warn: Callable[[str], None] | None = None) -> None:
    """Tidy up after a process killed while saving: remove ``.tmp-*`` directories (never renamed into place)
    and ``.trash-*`` ones whose step was replaced; a ``.trash-step_N-*`` whose ``step_N`` is missing is the
    only copy of that step (killed between the two renames of a re-save) and is put back. Temporaries of a
    process still running on this machine are left alone."""
    root = Path(root)
    if not root.is_dir():
        return
    leftovers = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".trash-")))
    for p in leftovers:
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # a live process is saving there now (e.g. an evaluation reading a run that still trains)
        if p.name.startswith(".trash-"):
            step_name = p.name.removeprefix(".trash-").rsplit("-", 1)[0]
            if _STEP_RE.fullmatch(step_name) and not (root / step_name).exists():
                _warn(warn, f"restoring {root / step_name} from {p.name}: a re-save of that step was interrupted")
                os.rename(p, root / step_name)
                fsync_path(root)
                continue
        _warn(warn, f"removing {p}: left over from a save that was interrupted")
        shutil.rmtree(p, ignore_errors=True)


def latest_valid(root: str | Path, warn: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, with its manifest; None when there is none.

    Leftover temporaries are removed; corrupt checkpoints newer than the one returned are reported and moved
    aside to ``root/corrupt-<name>-<time>`` so they neither shadow nor get pruned in place of good ones.
    """
    root = Path(root)
    clean_temporaries(root, warn)
    for path in list_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, json.loads((path / MANIFEST).read_text())
        aside = root / f"corrupt-{path.name}-{int(time.time())}"
        _warn(warn, f"checkpoint {path} is unusable ({problem}); moved to {aside.name}, trying the previous one")
        os.rename(path, aside)
    return None


def load_parts(path: str | Path, names: list[str] | None = None, map_location: str | torch.device = "cpu"
               ) -> dict[str, Any]:
    """The saved parts of a (verified) checkpoint directory: {name: object}."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    out = {}
    for fname in manifest["files"]:
        part = fname.removesuffix(".pt")
        if names is None or part in names:
            out[part] = torch.load(path / fname, map_location=map_location, weights_only=True)
    return out


def _warn(warn: Callable[[str], None] | None, msg: str) -> None:
    if warn is None:
        warnings.warn(msg, CheckpointWarning, stacklevel=3)
    else:
        warn(msg)


# ------------------------------------------------------------------------------------------ signals


class GracefulStop:
    """SIGINT/SIGTERM set a flag instead of killing: the trainer finishes the step, saves, and exits 0.

    A second SIGINT while the flag is already set raises ``KeyboardInterrupt`` (the user insists). Only the main
    thread can install handlers; elsewhere this is a no-op flag.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
