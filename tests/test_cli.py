"""What a user meets at the command line: one-line errors, the resume advice and exit status after
a signal, failed checkpoint writes, chat over piped stdin, evaluation settings from a model's
config."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_helpers import BASE, ROOT, compose_cfg

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def speed_train(*args, cwd, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "speed_train", *args],
        cwd=cwd,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=-1"], "error: optim.lr=-1.0: must be > 0"),
        (["data.recipe=/"], "error: recipe '/' is a folder"),
        (["speed.k=99"], "error: speed.k: cutoff k=99 exceeds the model's 4 layers"),
    ],
)
def test_framework_errors_are_one_line(tmp_path, overrides, message):
    r = speed_train(*BASE, f"output_dir={tmp_path / 'run'}", *overrides, cwd=tmp_path)
    assert r.returncode == 1
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert lines[-1].startswith(message) and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["error"]
    full = speed_train(
        *BASE,
        f"output_dir={tmp_path / 'run2'}",
        *overrides,
        cwd=tmp_path,
        env={**ENV, "HYDRA_FULL_ERROR": "1"},
    )
    assert full.returncode == 1 and "Traceback" in full.stderr  # on request


def test_read_only_output_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = speed_train(*BASE, f"output_dir={blocker / 'run'}", cwd=tmp_path)
    assert r.returncode == 1 and "is not writable" in r.stderr.strip().splitlines()[-1]


def test_signal_prints_the_resume_command_and_exits_128_plus_signal(tmp_path):
    run = tmp_path / "run"
    args = [
        *BASE,
        f"hydra.run.dir={run}",
        "trainer.max_steps=6",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "data.max_train_examples=24",
        "trainer.checkpoint_every_n_steps=100",
    ]
    env = {
        **ENV,
        "SPEED_TEST_PROBES": json.dumps({"signal_at_step": [2, "SIGTERM"]}),
        "PYTHONPATH": str(ROOT),
    }
    # the entry point with a test probe: python -m speed_train's main() plus the self-signal callback
    code = (
        "import sys; from tests.train_helpers import probes_from_env; import speed_train.train.run as r; "
        "orig = r.train; r.train = lambda cfg, callbacks=(): orig(cfg, callbacks=probes_from_env()); "
        "from speed_train.__main__ import main; sys.argv = ['speed_train', *sys.argv[1:]]; main()"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    out = p.stdout
    assert "stopped by signal 15 at step 3" in out and "to resume:" in out
    command = out.split("to resume:")[1].strip().splitlines()[0]
    assert command.startswith("python -m speed_train ") and f"hydra.run.dir={run}" in command
    assert "resume=auto" in command and "trainer.max_steps=6" in command
    assert (run / "checkpoints" / "preempt-step=3.ckpt").is_file()


def test_a_failed_checkpoint_write_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    from speed_train.train.checkpointing import AtomicCheckpointIO, CheckpointError

    def full_disk(obj, fh, **kw):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*step=2.ckpt: No space left on device; free"
    ):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "ck" / "step=2.ckpt")
    assert [p.name for p in (tmp_path / "ck").iterdir()] == []  # no partial file, no .tmp


def test_push_to_hub_offline_is_refused_before_training(tmp_path, monkeypatch):
    from speed_train.train.build import ConfigError, validate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg([*BASE, "export.enabled=true", "export.push_to_hub=me/model", f"output_dir={tmp_path}"])
    with pytest.raises(
        ConfigError, match="export.push_to_hub='me/model': the Hugging Face Hub is unreachable"
    ):
        validate(cfg)


def test_eval_missing_model_path_says_what_to_give(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "speed_train.eval",
            "--model",
            str(tmp_path / "nope"),
            "--tasks",
            "arc_easy",
            "--limit",
            "1",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode != 0
    assert "no such local folder, and not a Hub id" in r.stderr and "Repo id must be" not in r.stderr


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.hf.export import make_hf_native
    from speed_train.speed.tiny import tiny_model

    tok = load_smollm2_tokenizer()
    folder = tmp_path_factory.mktemp("export") / "model"
    tiny_model("llama", layers=4, vocab=len(tok)).save_pretrained(folder)
    make_hf_native(folder, tok, k=2, num_layers=4, anchor="bos", add_bos="auto")
    return folder


def test_settings_come_from_an_exports_config(export_dir):
    from speed_train.loading import load_model, saved_speed_settings

    model, _ = load_model(str(export_dir))  # no speed_config.json here: config.json alone
    assert not (export_dir / "speed_config.json").exists()
    assert saved_speed_settings(model, str(export_dir)) == {"k": 2, "anchor": "bos", "add_bos": "auto"}


def test_chat_over_piped_stdin(export_dir):
    from speed_train.loading import load_model
    from speed_train.speed.chat_roles import encode_generation_prompt
    from speed_train.speed.config import SpeedConfig
    from speed_train.speed.generate import speed_generate

    stdin = "What is the capital of France?\n/reset\nHello\n/quit\nnever read\n"
    r = subprocess.run(
        [sys.executable, "-m", "speed_train.chat", str(export_dir), "--max-new-tokens", "5"],
        input=stdin,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"# {export_dir}: K=2 of 4 layers, anchor bos")
    replies = [x.removeprefix("assistant> ") for x in lines if x.startswith("assistant> ")]
    assert len(replies) == 2 and "(new conversation)" in lines  # /quit stopped before the last line
    model, tok = load_model(str(export_dir))
    p = encode_generation_prompt(
        [{"role": "user", "content": "What is the capital of France?"}], tok, SpeedConfig(k=2)
    )
    want = speed_generate(model, [p], 2, max_new_tokens=5, stop_token_ids=[tok.eos_token_id]).sequences[0]
    assert (
        replies[0].strip()
        == tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True).strip()
    )


def test_model_card(tmp_path):
    from speed_train.hf.card import model_card
    from speed_train.speed.tiny import tiny_config
    from speed_train.train.run import RunResult

    cfg = compose_cfg(["output_dir=/tmp/x"])
    r = RunResult(
        k=22,
        num_layers=30,
        anchor="bos",
        data_report="",
        global_step=60,
        heldout={"heldout_full_depth": 2.66, "heldout_after": 1.08},
    )
    card = model_card(cfg, tiny_config("llama", layers=30), 22, r, "me/speed")
    assert card.startswith("---\nlibrary_name: transformers\n") and "tags:\n- speed" in card
    assert "# SPEED-22+BoS of smollm2_135m_instruct" in card and "| cutoff K | 22 of 30 layers |" in card
    assert "from_pretrained(path, trust_remote_code=True)" in card and "'me/speed'" in card
    assert "| full depth (before training) | 2.6600 |" in card and "| optimizer steps | 60 |" in card
    assert "| 131,072 | 0.733 |" in card  # active KV at 128K: (22 x n + 8 x 5) / (30 x n)
    assert Path(card.split("```yaml")[1].split("```")[0].strip().splitlines()[0]).name  # the training config
