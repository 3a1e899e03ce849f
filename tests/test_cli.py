"""What a user meets at the command line: one-line errors, the resume advice and exit status after
a signal, failed checkpoint writes, chat over piped stdin, evaluation settings from a model's
config."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speed_train.speed.config import SpeedConfig
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
@pytest.mark.slow
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


@pytest.mark.slow
def test_read_only_output_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = speed_train(*BASE, f"output_dir={blocker / 'run'}", cwd=tmp_path)
    assert r.returncode == 1 and "is not writable" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
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


@pytest.mark.slow
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
    make_hf_native(folder, tok, SpeedConfig(k=2, anchor="bos"))
    return folder


def test_settings_come_from_an_exports_config(export_dir):
    from speed_train.loading import load_model, saved_speed_config

    model, _ = load_model(str(export_dir))  # no speed_config.json here: config.json alone
    assert not (export_dir / "speed_config.json").exists()
    assert saved_speed_config(model, str(export_dir)) == SpeedConfig(k=2, anchor="bos", add_bos="auto")
    assert SpeedConfig.from_pretrained(export_dir) == SpeedConfig(k=2, anchor="bos", add_bos="auto")


@pytest.mark.slow
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
    card = model_card(cfg, tiny_config("llama", layers=30), SpeedConfig(k=22, anchor="bos"), r, "me/speed")
    assert card.startswith("---\nlibrary_name: transformers\n") and "tags:\n- speed" in card
    assert "# SPEED-22+BoS of smollm2_135m_instruct" in card and "| cutoff K | 22 of 30 layers |" in card
    assert "from_pretrained(path, trust_remote_code=True)" in card and "'me/speed'" in card
    assert "| full depth (before training) | 2.6600 |" in card and "| optimizer steps | 60 |" in card
    assert "| 131,072 | 0.733 |" in card  # active KV at 128K: (22 x n + 8 x 5) / (30 x n)
    assert Path(card.split("```yaml")[1].split("```")[0].strip().splitlines()[0]).name  # the training config
    assert "license:" not in card and "Gemma" not in card


# -- issue 18: nothing lost, nothing silently wrong ---------------------------------------------
def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The error line of a run that failed with a user error: exit 1, no traceback."""
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return [x for x in r.stderr.strip().splitlines() if x.strip()][-1]


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = speed_train(
        *BASE,
        f"hydra.run.dir={run}",
        "data.max_train_examples=32",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=2",
        "optim.lr=1e30",
        "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=1",
        "export.enabled=true",
        cwd=tmp_path,
    )
    line = one_line_error(r)  # was: exit 0, no word, NaN checkpoints, a NaN export
    assert line.startswith("error: training diverged at optimizer step 2: loss nan, gradient norm nan;")
    assert (
        f"newest checkpoint: {run / 'checkpoints' / 'step=1.ckpt'}" in line and "optim.lr (now 1e+30)" in line
    )
    # the finite step-1 checkpoint is not pruned for non-finite ones; nothing is exported
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=1.ckpt", "step=1.ckpt.complete"]
    assert not (run / "export").exists() and not (run / "results.json").exists()
    failed = json.loads((run / "failed.json").read_text(), parse_constant=pytest.fail)
    assert failed["error"].startswith("DivergenceError: training diverged at optimizer step 2")


@pytest.mark.slow
def test_resume_refuses_another_runs_settings_in_one_line(tmp_path):
    run = tmp_path / "run"
    first = [*BASE, f"hydra.run.dir={run}", "data.max_train_examples=16", "trainer.max_steps=3"]
    assert speed_train(*first, cwd=tmp_path).returncode == 0
    ckpt = run / "checkpoints" / "step=3.ckpt"
    hydra_config = (run / ".hydra" / "config.yaml").read_text()
    refusals = {
        ("speed.k=0.25", "optim.lr=0.5"): [
            "speed.k 0.75 -> 0.25; optim.lr 0.001 -> 0.5",
            f"init_from={ckpt}",
        ],
        ("model=tiny_qwen2",): ['model.arch "llama" -> "qwen2"'],
        ("data.recipe=packaged_instruct",): ['data.recipe "packaged_chat" -> "packaged_instruct"'],
        # these three were 40-line tracebacks
        ("data.pack=true",): ["data.pack false -> true"],
        ("lora.r=4",): ["lora.r 16 -> 4"],
        ("data.max_train_examples=8",): ["data.max_train_examples 16 -> 8"],
    }
    for changes, wanted in refusals.items():
        line = one_line_error(speed_train(*first, "trainer.max_steps=6", *changes, cwd=tmp_path))
        assert line.startswith(f"error: resume: {ckpt} was saved by a run with other settings ("), line
        assert all(w in line for w in wanted), line
        assert ("init_from=" in line) == (
            changes[0].split("=")[0] in ("speed.k", "data.recipe", "data.pack", "data.max_train_examples")
        ), line
    line = one_line_error(speed_train(*first, "trainer.max_steps=2", cwd=tmp_path))
    assert line.startswith(f"error: resume: {ckpt} is at optimizer step 3, past this run's 2 steps")
    # refused before Hydra wrote the refused settings into the run folder; no failed.json beside results
    assert (run / ".hydra" / "config.yaml").read_text() == hydra_config
    assert not (run / "failed.json").exists()
    # extending the run stays allowed
    assert speed_train(*first, "trainer.max_steps=4", cwd=tmp_path).returncode == 0
    assert json.loads((run / "results.json").read_text())["resumed_from"] == str(ckpt)


# python -m speed_train on a disk that fills up while the export writes its weights: safetensors
# (bound by transformers and peft at import, hence patched first) fails as it does, with its own
# error type and the OS error number in the message
DISK_FULL_AT_EXPORT = (
    "import sys, safetensors.torch as st; from safetensors import SafetensorError\n"
    "def full(*a, **kw): raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')\n"
    "st.save_file = full\n"
    "from speed_train.__main__ import main; sys.argv = ['speed_train', *sys.argv[1:]]; main()"
)


@pytest.mark.slow
def test_the_end_is_checkpointed_progress_is_logged_and_a_failed_export_says_how_to_export(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / ".model.tmp-killed").mkdir()  # left by an export that was killed
    args = [
        *BASE,
        f"hydra.run.dir={run}",
        "data.max_train_examples=16",
        "trainer.max_steps=3",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.progress_bar=true",
        "trainer.log_every_n_steps=2",
        "export.enabled=true",
        "eval_report=true",
    ]
    r = subprocess.run(
        [sys.executable, "-c", DISK_FULL_AT_EXPORT, *args],
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    # stdout is a pipe here, as in a SLURM .out file: plain progress lines, not a silent bar
    progress = [x.split(" - ", 1)[1] for x in r.stdout.splitlines() if " - step " in x]
    assert [p.split("  ")[0] for p in progress] == ["step 2/3", "step 3/3"], r.stdout[-2000:]
    assert all(" tok/s  eta " in p and p.split("  ")[1].startswith("loss ") for p in progress)
    line = one_line_error(r)  # was: a SafetensorError traceback, and the run's only checkpoint at step 2
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["step=2.ckpt", "step=3.ckpt"]
    assert line.startswith(
        f"error: cannot write the export into {run / 'export'} (No space left on device); the trained "
        f"model is saved in {run / 'checkpoints' / 'step=3.ckpt'}: free space"
    )
    command = line.split("export from it with: ")[1]
    assert command.startswith("python -m speed_train ") and command.endswith(
        f"hydra.run.dir={run} resume=auto"
    )
    again = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "export" / "model" / "config.json").is_file() and (run / "results.json").is_file()
    assert not (run / "failed.json").exists()  # the earlier failure no longer stands
    # the resumed run trains no step, yet reports the held-out table after training (the rows
    # before training came with the checkpoint)
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 3 and results["resumed_from"].endswith("step=3.ckpt")
    for row in ("heldout_full_depth", "heldout_speed_zero_shot", "heldout_after", "heldout_after_full_depth"):
        assert isinstance(results[row], float) and results[row] > 0, row
    assert sorted(p.name for p in (run / "export").iterdir()) == ["adapter", "model"]  # no temporaries


@pytest.mark.slow
def test_a_live_run_folder_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    from speed_train.train.runlock import lock_run_folder, release_run_folder

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from speed_train.train.runlock import lock_run_folder; "
            "lock_run_folder(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
            str(run),
        ],
        cwd=ROOT,
        env={**ENV, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = speed_train(*BASE, f"hydra.run.dir={run}", cwd=tmp_path)
        line = one_line_error(r)
        assert line.startswith(f"error: run folder {run} is in use by another run (pid {holder.pid} on ")
        assert line.endswith("wait for it to end, or choose another hydra.run.dir")
        # refused before Hydra or the run wrote anything there
        assert not (run / ".hydra").exists() and not (run / "failed.json").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup; the OS drops its lock
        holder.wait()
    assert lock_run_folder(run) is True  # no stale lock
    release_run_folder(run)


@pytest.mark.slow
def test_an_unwritable_run_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_line_error(speed_train(*BASE, f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path))
    assert line.startswith(f"error: output folder {blocker / 'run'} is not writable (")  # was Hydra's OSError
    assert line.endswith("choose another hydra.run.dir")


@pytest.mark.slow
def test_ctrl_c_saves_and_prints_the_resume_command(tmp_path):
    run = tmp_path / "run"
    args = [*BASE, f"hydra.run.dir={run}", "trainer.max_steps=6", "data.max_train_examples=16"]
    env = {**ENV, "SPEED_TEST_PROBES": json.dumps({"signal_at_step": [2, "SIGINT"]}), "PYTHONPATH": str(ROOT)}
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
    assert p.returncode == 128 + signal.SIGINT, p.stderr[-3000:]  # was: 1, no word, no checkpoint
    assert "Ctrl-C: stopping after this optimizer step, with a checkpoint" in p.stderr
    assert "stopped by signal 2 at step 3" in p.stdout and f"hydra.run.dir={run} resume=auto" in p.stdout
    assert (run / "checkpoints" / "preempt-step=3.ckpt").is_file()


class Unsafe:
    """Any class: torch.load(weights_only=True) refuses to build objects it does not know."""


@pytest.mark.slow
def test_a_checkpoint_named_with_equals_is_accepted_and_an_unsafe_one_refused(tmp_path):
    from speed_train.__main__ import quote_paths

    assert quote_paths(
        ["resume=/a/step=2.ckpt", "+init_from=b/it's/step=1.ckpt", "resume=auto", "x=a=b"]
    ) == [
        "resume='/a/step=2.ckpt'",
        "+init_from='b/it\\'s/step=1.ckpt'",
        "resume=auto",
        "x=a=b",
    ]
    evil = tmp_path / "elsewhere" / "step=2.ckpt"
    evil.parent.mkdir()
    torch.save({"state_dict": {}, "payload": Unsafe()}, evil)
    # resume=<path>/step=2.ckpt, unquoted: Hydra's parser failed on the '='
    line = one_line_error(
        speed_train(*BASE, f"output_dir={tmp_path / 'run'}", f"resume={evil}", cwd=tmp_path)
    )
    assert line.startswith(f"error: resume: {evil} holds objects other than tensors and plain data")


@pytest.mark.slow
def test_k_beyond_the_model_and_bad_arguments_are_one_line(export_dir, tmp_path, capsys, monkeypatch):
    from speed_train.eval import lm_eval_adapter
    from speed_train.eval import run as eval_run
    from speed_train.tools import chat

    r = subprocess.run(
        [sys.executable, "-m", "speed_train.chat", str(export_dir), "--k", "99"],
        input="hi\n",
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: cutoff k=99 exceeds the model's 4 layers; use 1..4 (k=4 is full depth) or a fraction such as 0.75"
    )
    with pytest.raises(SystemExit) as e:  # before the model loads and before the first message
        chat.main([str(export_dir), "--max-new-tokens", "0"])
    assert (
        e.value.code == 2 and capsys.readouterr().err == "error: argument --max-new-tokens: 0 must be >= 1\n"
    )
    with pytest.raises(eval_run.EvalError, match="--tasks '' names no task"):  # was ZeroDivisionError
        eval_run.main(["--model", str(export_dir), "--tasks", ""])
    for module, argv in (
        (
            eval_run,
            ["speed-eval", "--model", str(export_dir), "--k", "99", "--tasks", "arc_easy", "--limit", "1"],
        ),
        (
            lm_eval_adapter,
            [
                "speed-lm-eval",
                "--model",
                "speed",
                "--model_args",
                f"pretrained={export_dir},k=99",
                "--tasks",
                "arc_easy_offline",
                "--limit",
                "1",
            ],
        ),
    ):
        monkeypatch.setattr("sys.argv", argv)
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as e:
            module.cli() if module is eval_run else module.main()
        assert str(e.value.code).startswith("error: cutoff k=99 exceeds the model's 4 layers")


def test_a_tokenizer_folder_without_its_files_is_named(tmp_path):
    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.loading import ModelNotFoundError, load_tokenizer

    load_smollm2_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match=rf"tokenizer folder {tmp_path} has no tokenizer.json"):
        load_tokenizer(str(tmp_path))  # was: an error about sentencepiece


def test_locate_maps_packaged_models_to_their_cache_folder(tmp_path):
    from speed_train.assets import smollm2_path
    from speed_train.loading import PACKAGED_TOKENIZERS, ModelNotFoundError, locate

    assert locate("smollm2") == smollm2_path()  # was asked of the Hub as "smollm2/config.json"
    assert locate("llama3", packaged=PACKAGED_TOKENIZERS) == "llama3"  # a tokenizer: no folder to map
    assert locate(str(tmp_path)) == tmp_path and locate("owner/name") == "owner/name"
    with pytest.raises(ModelNotFoundError, match="--model 'nowhere': no such local folder"):
        locate("nowhere")


def test_model_card_of_a_gemma_model_states_the_gemma_terms():
    from speed_train.hf.card import model_card
    from speed_train.speed.tiny import tiny_config

    config = tiny_config("gemma3", layers=18)
    card = model_card(
        compose_cfg(["output_dir=/tmp/x", "model=gemma3_270m"]), config, SpeedConfig(k=14), None, None
    )
    assert card.startswith("---\nlicense: gemma\nlibrary_name: transformers\n")
    assert (
        "Gemma is provided under and subject to the Gemma Terms of Use found at https://ai.google.dev/gemma/terms"
        in card
    )
    # random weights of the architecture are no Gemma model
    tiny = model_card(
        compose_cfg(["output_dir=/tmp/x", "model=tiny_gemma3"]), config, SpeedConfig(k=14), None, None
    )
    assert "license:" not in tiny and "Gemma Terms" not in tiny
