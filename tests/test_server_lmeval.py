"""lm-eval-harness (0.4.13) against `dsv32 serve --model smollm2-135m`, as a user runs it: default settings, no
tokenizer arguments, offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1).

`local-completions` finds the server's tokenizer endpoints (`/tokenizer_info`, `/tokenize`) and scores with
`/v1/completions` (`echo`, `logprobs=1`, batched token-id prompts). Three custom tasks with local JSON data:
a multiple-choice task (acc), a perplexity task (`loglikelihood_rolling`) and a generate-until task through
`local-chat-completions`. The multiple-choice accuracy must equal the same model's in-process log-likelihood
scoring exactly, and every per-choice and per-document log-likelihood must match it.

lm-eval runs in a subprocess: its environment (offline flags) is then the one `datasets` and the hub client
read at import, whatever else this pytest process imported before.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs lm-eval (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install -e '.[serve]')")

from dsv32.gguf import find_smollm2_gguf  # noqa: E402
from dsv32.registry import load_model  # noqa: E402
from dsv32.tokenizer import load_tokenizer  # noqa: E402

MC = [
    {"q": "The capital of France is", "choices": ["Paris", "London", "Berlin", "Madrid"], "label": 0},
    {"q": "Two plus two equals", "choices": ["three", "four", "five", "ten"], "label": 1},
    {"q": "The opposite of hot is", "choices": ["warm", "cold", "red", "fast"], "label": 1},
    {"q": "A baby cat is called a", "choices": ["puppy", "calf", "kitten", "foal"], "label": 2},
    {"q": "The sun rises in the", "choices": ["west", "north", "south", "east"], "label": 3},
    {"q": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "Newton", "Joule"], "label": 0},
]
PPL = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Paris is the capital and largest city of France."},
]
GEN = [{"q": "What is the capital of France?", "a": "Paris"}, {"q": "Name a primary colour.", "a": "red"}]

TASKS = {
    "dsv32_mc": """
        output_type: multiple_choice
        doc_to_text: "{{q}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list:
          - metric: acc
    """,
    "dsv32_ppl": """
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
    """,
    "dsv32_gen": """
        output_type: generate_until
        doc_to_text: "{{q}}"
        doc_to_target: "{{a}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 8
        metric_list:
          - metric: exact_match
    """,
}
DATA = {"dsv32_mc": MC, "dsv32_ppl": PPL, "dsv32_gen": GEN}

# Run by a fresh interpreter: both evaluations, results and per-sample responses as JSON on stdout. It imports
# lm-eval while the server loads, then waits for the server's /health.
RUNNER = """
import json, sys, time, urllib.request
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

url, tasks = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 300
while True:
    try:
        urllib.request.urlopen(url + "/health", timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
tm = TaskManager(include_path=tasks)
lm = get_model("local-completions").create_from_arg_string(
    f"model=smollm2-135m,base_url={url}/v1/completions,max_retries=1", {"batch_size": 4})
comp = lm_eval.simple_evaluate(model=lm, tasks=["dsv32_mc", "dsv32_ppl"], task_manager=tm, log_samples=True)
chat = lm_eval.simple_evaluate(
    model="local-chat-completions",
    model_args=f"model=smollm2-135m,base_url={url}/v1/chat/completions,max_retries=1",
    tasks=["dsv32_gen"], apply_chat_template=True, task_manager=tm, log_samples=True)
out = {"tokenizer_backend": lm.tokenizer_backend}
for res in (comp, chat):
    for task, metrics in res["results"].items():
        out[task] = {"metrics": metrics, "resps": [s["resps"] for s in res["samples"][task]],
                     "docs": [s["doc"] for s in res["samples"][task]]}
print("RESULTS " + json.dumps(out))
"""


def _write_tasks(root: Path) -> Path:
    for name, spec in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DATA[name]))
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (root / f"{name}.yaml").write_text(head + textwrap.dedent(spec).lstrip())
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _loglikelihood(model, ids: list[int], n_cont: int) -> float:
    """Sum of log p(token | everything before) over the last ``n_cont`` of ``ids``: one full forward."""
    with torch.no_grad():
        lp = model.forward(torch.tensor([ids])).log_softmax(-1)[0]  # [S, V]
    tgt = torch.tensor(ids[-n_cont:])
    return float(lp[len(ids) - n_cont - 1 : -1].gather(-1, tgt[:, None]).sum())


def _reference_choices(model, tok, q: str, choices: list[str]) -> list[float]:
    """In-process multiple-choice scoring, tokenised as a causal scorer does: the continuation's ids are those
    of ``q + " " + choice`` after the ids of ``q``."""
    ctx = tok.encode(q)
    out = []
    for c in choices:
        whole = tok.encode(f"{q} {c}")
        assert whole[: len(ctx)] == ctx
        out.append(_loglikelihood(model, whole, len(whole) - len(ctx)))
    return out


def test_lm_eval_local_completions_and_chat(tmp_path: Path):
    try:
        find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tasks = _write_tasks(tmp_path)
    url = f"http://127.0.0.1:{_free_port()}"
    # three things at once: the server loads, lm-eval imports (then waits for the server), the reference runs
    senv = {k: v for k, v in os.environ.items() if k != "DSV32_API_KEY"}
    serve_cmd = [sys.executable, "-m", "dsv32", "serve", "--model", "smollm2-135m", "--port", url.rsplit(":", 1)[1],
                 "--max-slots", "4", "--max-len", "1024", "--threads", "1", "--log-level", "warning"]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below; a pipe nobody reads could block it)
    server = subprocess.Popen(serve_cmd, stdout=log, stderr=subprocess.STDOUT, env={**senv, "HF_HUB_OFFLINE": "1"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, url, str(tasks)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        torch.set_num_threads(1)
        model, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
        ref_mc = [_reference_choices(model, tok, d["q"], d["choices"]) for d in MC]
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id  # lm-eval's rolling prefix: BOS, else EOS
        ref_ppl = [_loglikelihood(model, [prefix, *tok.encode(d["text"])], len(tok.encode(d["text"]))) for d in PPL]
        out, err = runner.communicate(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
        _stop(server)
        log.close()
    line = next((x for x in out.splitlines() if x.startswith("RESULTS ")), None)
    assert runner.returncode == 0 and line is not None, err[-3000:] + (tmp_path / "serve.log").read_text()[-2000:]
    res = json.loads(line[len("RESULTS ") :])
    assert res.pop("tokenizer_backend") == "remote"  # lm-eval's default path: the server's tokenizer, not the hub

    mc = res["dsv32_mc"]
    assert [d["q"] for d in mc["docs"]] == [d["q"] for d in MC]
    correct = 0
    for doc, resps, ref in zip(MC, mc["resps"], ref_mc):
        got = [float(r[0][0]) for r in resps]
        assert got == pytest.approx(ref, abs=1e-4), doc
        correct += max(range(len(ref)), key=ref.__getitem__) == doc["label"]
    assert mc["metrics"]["acc,none"] == correct / len(MC)  # exactly

    ppl = res["dsv32_ppl"]  # one rolling window per document: every token after the prefix token
    assert [float(r[0][0]) for r in ppl["resps"]] == pytest.approx(ref_ppl, abs=1e-4)
    assert ppl["metrics"]["word_perplexity,none"] > 1

    gen = res["dsv32_gen"]
    assert len(gen["resps"]) == len(GEN) and all(isinstance(r[0][0], str) and r[0][0] for r in gen["resps"])
    assert "exact_match,none" in gen["metrics"]
