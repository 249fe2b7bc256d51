"""`make demo` without Debian's python3-doc: the document question falls back to a document every CPython
ships, and says which document it used; the server's key goes through the environment."""

from __future__ import annotations

import pytest

pytest.importorskip("openai", reason="the demo drives the server with the openai client (pip install -e '.[test]')")

from dsv32 import demo  # noqa: E402


def test_document_falls_back_without_python3_doc(tmp_path, monkeypatch, capsys):
    # an empty corpus cache and no apt-get on PATH: the python-docs source cannot be built here
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    doc = demo.load_document()
    assert "python-docs unavailable" in capsys.readouterr().out
    assert "_pydecimal" in doc.title and "fallback" in doc.title
    assert "decimal floating point arithmetic" in doc.text and len(doc.text) > 2000
    assert len(doc.questions) == 2


def test_server_command_keeps_the_key_out_of_argv():
    cmd, env = demo.server_command("smollm2-135m", 8123)
    assert env["DSV32_API_KEY"] and env["DSV32_API_KEY"] not in " ".join(cmd)
    assert "--api-key" not in cmd and cmd[1:4] == ["-m", "dsv32", "serve"]
