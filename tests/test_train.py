"""Training system: every experiment runs; step-exact loss normalisation across accumulation,
ranks (DDP) and DeepSpeed ZeRO-2/3 on CPU; export (also from ZeRO-3 shards, LoRA too) reloads to
the same SPEED logits; exact resume after a hard kill and after SIGTERM/SIGUSR1; distillation.

Everything runs a tiny random llama on the packaged chat data, tokenised once per session.
Multi-process runs go through tests/train_script.py under torchrun (gloo on CPU); probes (gradient
dump, hard kill, self-signal, logits dump) are test-only callbacks (tests/train_helpers.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from speed_train.train.checkpointing import COMPLETE, ResumeError, newest_checkpoint, resolve_resume
from speed_train.train.loader import ResumableLoader, StepPlan
from speed_train.train.run import train
from tests.train_helpers import (
    BASE,
    ROOT,
    GradDump,
    HeldoutProbe,
    LogitsDump,
    _free_port,
    compose_cfg,
    heldout_examples,
    probe_batch,
    results_of,
    run_script,
    speed_logits,
)

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """Tokenised-data cache shared by every run of the session (subprocesses included)."""
    d = tmp_path_factory.mktemp("speed_data_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPEED_TEST_CACHE", str(d))  # probe_batch() in subprocesses reads it
    yield str(d)
    mp.undo()


def overrides(cache, out, *extra):
    return [*BASE, f"data.cache_dir={cache}", f"output_dir={out}", *extra]


def run(cache, out, *extra, callbacks=()) -> dict:
    """An in-process run; its result as results.json has it."""
    return train(compose_cfg(overrides(cache, out, *extra)), callbacks=list(callbacks)).to_dict()


def csv_losses(out, key: str = "train/loss") -> dict[int, str]:
    with open(Path(out) / "logs" / "metrics.csv", newline="") as f:
        return {int(r["step"]): r[key] for r in csv.DictReader(f) if r.get(key)}


def val_losses(results) -> dict[int, float]:
    return {int(s): v for s, v in results["val_losses"].items()}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a, (sorted(set(a) ^ set(b))[:5], len(a))
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- 1. every experiment config trains on a tiny model -----------------------------------------
class TrainModeProbe(L.Callback):
    """Records whether every module of the model is in training mode at each micro-batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(all(m.training for m in pl_module.model.modules()))


@pytest.mark.slow
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_trains_two_steps_on_a_tiny_model(exp, cache, tmp_path):
    # The experiment's K is kept: the tiny llama gets the real model's 32 layers (and, like the
    # real models, activation checkpointing).
    mode = TrainModeProbe()
    r = run(
        cache,
        tmp_path,
        f"+experiment={exp}",
        "model.num_layers=32",
        "model.gradient_checkpointing=true",
        "trainer.max_steps=2",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "data.max_train_examples=16",
        callbacks=[mode],
    )
    # HF and the tiny builder return models in eval mode; trained so, dropout and gradient
    # checkpointing would silently be off (full fine-tuning: peft does not switch modes for us)
    assert mode.modes == [True] * 4
    cfg = compose_cfg(overrides(cache, tmp_path, f"+experiment={exp}"))
    assert r["global_step"] == 2 and len(r["step_losses"]) == 2
    assert all(math.isfinite(x) and 5 < x < 15 for x in r["step_losses"]), r["step_losses"]
    from speed_train.speed.config import SpeedConfig

    assert (
        r["num_layers"] == 32
        and r["k"] == SpeedConfig(k=cfg.speed.k).resolve_k(32)
        and r["anchor"] == cfg.speed.anchor
    )
    assert list(csv_losses(tmp_path)) == [0, 1]
    assert json.loads((tmp_path / "results.json").read_text())["step_losses"] == r["step_losses"]


# -- 2. loss normalisation: GA x micro x ranks do not change the gradient ----------------------
@pytest.mark.slow
def test_heldout_losses_per_source_and_sharded_equal_independent_sums(cache):
    from speed_train.speed.batch import collate
    from speed_train.speed.executors import speed_loss
    from speed_train.speed.tiny import tiny_model
    from speed_train.train.validation import sharded_heldout_losses

    examples, pad_id = heldout_examples(6)
    for i, ex in enumerate(examples):  # two sources, interleaved
        ex.meta["source"] = "even" if i % 2 == 0 else "odd"
    model = tiny_model("llama", layers=4, vocab=49152, seed=1).eval()
    expected, sums = {}, {}
    with torch.no_grad():
        for name in ("even", "odd"):
            part = [ex for ex in examples if ex.meta["source"] == name]
            out = [speed_loss(model, collate([ex], pad_id), 3) for ex in part]  # one by one
            sums[name] = (sum(float(o.loss_sum) for o in out), sum(o.num_tokens for o in out))
            expected[name] = sums[name][0] / sums[name][1]
    expected["all"] = sum(t for t, _ in sums.values()) / sum(c for _, c in sums.values())
    got = sharded_heldout_losses(model, examples, 3, pad_id, micro_batch=2)
    assert got.keys() == expected.keys() and all(abs(got[k] - expected[k]) < 1e-5 for k in got)
    # two ranks, each summing its shard; the reduction adds them: the one-process result
    shards = []
    sharded_heldout_losses(
        model, examples, 3, pad_id, rank=0, world=2, reduce=lambda t: shards.append(t) or t
    )
    total = sharded_heldout_losses(
        model, examples, 3, pad_id, rank=1, world=2, reduce=lambda t: t + shards[0], micro_batch=2
    )
    assert all(abs(total[k] - expected[k]) < 1e-5 for k in got)


def test_step_plan_gives_each_step_the_same_examples_whatever_the_split():
    counts = [(i * 7) % 13 + 1 for i in range(24)]
    splits = [(1, 1), (4, 1), (2, 2), (1, 4), (1, 2)]  # (micro, ranks) for a global batch of 4 / 8
    for gb in (4, 8):
        seen = {}
        for micro, ranks in splits:
            if gb % (micro * ranks):
                continue
            plan = StepPlan(counts, gb, micro, ranks, seed=3)
            for step in range(plan.steps_per_epoch):
                ex, toks = [], set()
                for rank in range(ranks):
                    for m in range(plan.accumulation):
                        idx, t = plan.items(1, rank, step * plan.accumulation + m)
                        ex += idx
                        toks.add(t)
                assert len(toks) == 1 and toks.pop() == sum(counts[i] for i in ex)
                seen.setdefault(step, sorted(ex))
                assert sorted(ex) == seen[step], (gb, micro, ranks, step)
    with pytest.raises(ValueError, match="not divisible by micro batch 3 x 2 ranks"):
        StepPlan(counts, 8, 3, 2, seed=0)


# full fine-tuning (LoRA's B starts at 0, so most LoRA gradients would be trivially equal);
# validation after steps 3 and 4 (the end) on 3 held-out examples: over 2 ranks, shards of 2 and 1
# (under ZeRO-3 the rank with the shorter shard must still join every parameter gather)
FULL = [
    "lora.enabled=false",
    "trainer.global_batch_size=4",
    "data.max_train_examples=16",
    "trainer.max_steps=4",
    "trainer.eval_every_n_steps=3",
    "data.max_eval_examples=3",
]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """Single process, GA=4 x micro 1: gradients of step 1, losses of 4 steps, final logits,
    val/loss, and sharded_heldout_loss on the same held-out examples after every step."""
    d = tmp_path_factory.mktemp("ref_ga4")
    probe = HeldoutProbe(3)
    r = run(
        cache,
        d,
        *FULL,
        "trainer.micro_batch_size=1",
        callbacks=[GradDump(d / "grads.pt"), LogitsDump(d / "logits.pt"), probe],
    )
    return {
        "losses": r["step_losses"],
        "grads": torch.load(d / "grads.pt"),
        "logits": torch.load(d / "logits.pt"),
        "val": val_losses(r),
        "heldout": probe.losses,
        "dir": d,
    }


@pytest.mark.slow
def test_validation_logs_val_loss_every_n_steps_and_at_the_end(reference, cache, tmp_path):
    # eval_every_n_steps=3 with 4 steps: after step 3 and after the last step, not per micro-batch
    # (GA=4 here: Lightning's val_check_interval would count micro-batches)
    val, heldout = reference["val"], reference["heldout"]
    assert sorted(val) == [3, 4] and sorted(heldout) == [1, 2, 3, 4]
    for step, loss in val.items():  # == sharded_heldout_loss on the same examples at that step
        assert abs(loss - heldout[step]) < 1e-6, (step, loss, heldout[step])
    assert abs(val[3] - val[4]) > 1e-4  # the model moved: not one value logged twice
    logged = csv_losses(reference["dir"], "val/loss")  # CSV row of step N = the row of N's train/loss
    assert sorted(logged) == [2, 3] and all(abs(float(logged[s - 1]) - val[s]) < 1e-5 for s in val)
    # null (the default): no validation loop at all; 0 is refused before anything is built
    from speed_train.train.build import ConfigError, validate

    with pytest.raises(ConfigError, match="eval_every_n_steps=0"):
        validate(compose_cfg(overrides(cache, tmp_path, "trainer.eval_every_n_steps=0")))


@pytest.mark.slow
def test_accumulation_and_ddp_ranks_give_the_same_gradients(reference, cache, tmp_path):
    g = reference["grads"]
    assert max(t.abs().max().item() for t in g.values()) > 1e-2  # not trivially zero
    r1 = run(
        cache,
        tmp_path / "ga1",
        *FULL,
        "trainer.max_steps=1",
        "trainer.micro_batch_size=4",
        callbacks=[GradDump(tmp_path / "ga1.pt")],
    )
    assert max_diff(g, torch.load(tmp_path / "ga1.pt")) < 1e-6  # GA=4 x 1 == GA=1 x 4
    assert abs(r1["step_losses"][0] - reference["losses"][0]) < 1e-6
    # 2 processes (torchrun, DDP over gloo), GA=2 x micro 1: all-reduced gradients at step 1.
    # On the way: SIGTERM to rank 0 only during step 2; the ranks agree, both save step 2 and stop.
    run_script(
        overrides(
            cache, tmp_path / "ddp", *FULL, "trainer.micro_batch_size=1", "strategy=ddp", "trainer.devices=2"
        ),
        nproc=2,
        probes={"grads": str(tmp_path / "ddp.pt"), "signal_at_step": [1, "SIGTERM"]},
    )
    assert max_diff(g, torch.load(tmp_path / "ddp.pt")) < 1e-6
    res = results_of(tmp_path / "ddp")
    assert max(abs(a - b) for a, b in zip(res["step_losses"], reference["losses"][:2])) < 1e-6
    assert res["global_step"] == 2 and res["preempted_by_signal"] == signal.SIGTERM
    assert (
        Path(res["preempt_checkpoint"]).name == "preempt-step=2.ckpt"
        and Path(res["preempt_checkpoint"]).is_file()
    )


@pytest.mark.slow
def test_torchrun_script_two_ranks_equal_one_rank(reference, cache, tmp_path):
    # scripts/torchrun.sh itself (python -m speed_train under torchrun, Hydra in every rank, one
    # run folder): 2 CPU ranks x GA 2 x micro 1 == 1 rank x GA 4 x micro 1, step by step
    env = {
        **os.environ,
        "NPROC": "2",
        "ACCELERATOR": "cpu",
        "RUN_DIR": str(tmp_path / "run"),
        "PYTHON": sys.executable,
        "MASTER_PORT": str(_free_port()),
    }
    for var in ("OMP_NUM_THREADS", "SLURM_JOB_ID", "SLURM_NTASKS"):
        env.pop(var, None)  # the script sets OMP_NUM_THREADS=1 for CPU ranks itself
    args = overrides(cache, tmp_path / "unused", *FULL, "trainer.micro_batch_size=1", "strategy=ddp")
    args = [a for a in args if not a.startswith("output_dir=")]  # the run folder is the script's RUN_DIR
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "torchrun.sh"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = results_of(tmp_path / "run")
    assert res["world_size"] == 2 and res["global_step"] == 4
    assert max(abs(a - b) for a, b in zip(res["step_losses"], reference["losses"], strict=True)) < 1e-6
    val = val_losses(res)  # sharded over the 2 ranks, all-reduced
    assert sorted(val) == [3, 4] and max(abs(val[s] - reference["val"][s]) for s in val) < 1e-6


# -- 3. DeepSpeed ZeRO-2 / ZeRO-3 on CPU, 2 processes ------------------------------------------
DS = [*FULL, "trainer.micro_batch_size=1", "trainer.devices=2"]


@pytest.mark.slow
def test_deepspeed_zero2_matches_single_process_and_resumes(reference, cache, tmp_path):
    out = tmp_path / "z2"
    # killed hard right after the step-2 checkpoint; gradients of step 1 dumped on the way
    r = run_script(
        overrides(cache, out, *DS, "strategy=deepspeed_zero2", "trainer.checkpoint_every_n_steps=2"),
        nproc=2,
        probes={"grads": str(tmp_path / "g.pt"), "exit_at_step": 2},
        check=False,
    )
    assert r.returncode != 0 and not (out / "results.json").exists()
    assert "built successfully" not in r.stdout + r.stderr  # no DeepSpeed op was compiled
    # DeepSpeed's engine divides by GA in backward on top of Lightning: SpeedLM._scale undoes it
    assert max_diff(reference["grads"], torch.load(tmp_path / "g.pt")) < 1e-6
    assert (out / "checkpoints" / "step=2.ckpt" / COMPLETE).is_file()
    run_script(
        overrides(cache, out, *DS, "strategy=deepspeed_zero2", "trainer.checkpoint_every_n_steps=2"), nproc=2
    )
    res = results_of(out)
    assert res["resumed_from"].endswith("step=2.ckpt") and res["global_step"] == 4
    assert len(res["step_losses"]) == 4
    assert max(abs(a - b) for a, b in zip(res["step_losses"], reference["losses"])) < 1e-5
    # validation of the resumed run (steps 3 and 4) on all ranks == the single-process val/loss
    val = val_losses(res)
    assert sorted(val) == [3, 4] and max(abs(val[s] - reference["val"][s]) for s in val) < 1e-5


@pytest.fixture(scope="module")
def zero3(cache, tmp_path_factory):
    """2 processes, ZeRO-3, full fine-tuning: parameter census right after construction (before
    the DeepSpeed engine exists), gradients of step 1, final logits, export and evaluation."""
    d = tmp_path_factory.mktemp("z3")
    out = d / "run"
    run_script(
        overrides(cache, out, *DS, "strategy=deepspeed_zero3", "export.enabled=true", "eval_report=true"),
        nproc=2,
        probes={"grads": str(d / "g.pt"), "logits": str(d / "logits.pt"), "partition": str(d / "params")},
    )
    census = [json.loads((d / f"params.rank{r}.json").read_text()) for r in (0, 1)]
    return {"out": out, "dir": d, "census": census, "res": results_of(out)}


@pytest.mark.slow
def test_deepspeed_zero3_partitions_parameters_at_construction(zero3):
    # The memory check: the model is built partitioned (transformers' DeepSpeed integration, a live
    # HfDeepSpeedConfig), not built whole on every rank and partitioned by the engine later.
    assert zero3["res"]["zero3_partitioned_at_construction"] is True
    for c in zero3["census"]:
        assert c["world"] == 2 and c["params"] > 30
        assert c["partitioned"] == c["params"]  # every parameter, at construction
        assert c["visible"] == 0  # no full tensor left in p.data
        assert c["total"] > 6_000_000  # the tiny llama: ~6.4M elements
        # each rank holds its half (+ at most one element of padding per parameter)
        assert c["total"] / 2 <= c["local"] <= c["total"] / 2 + c["params"], c
    assert (
        sum(c["local"] for c in zero3["census"])
        < zero3["census"][0]["total"] + 2 * zero3["census"][0]["params"]
    )


@pytest.mark.slow
def test_deepspeed_zero3_matches_single_process_and_exports_full_weights(reference, zero3, cache):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, d, res = zero3["out"], zero3["dir"], zero3["res"]
    # partitioned construction + seeded init: the same initial weights, so the same training
    assert max_diff(reference["grads"], torch.load(d / "g.pt")) < 1e-6
    assert max(abs(a - b) for a, b in zip(res["step_losses"], reference["losses"])) < 1e-5
    val = val_losses(res)  # validation in lockstep on all ranks (shards of 2 and 1 examples)
    assert sorted(val) == [3, 4] and max(abs(val[s] - reference["val"][s]) for s in val) < 1e-5
    # the before-training rows come from fit start (the partitioned model needs the engine) and
    # equal sharded_heldout_loss of the same seeded model built whole in this process
    from speed_train.train.build import load_model, load_tokenizer
    from speed_train.train.validation import sharded_heldout_loss as heldout_loss

    examples, pad_id = heldout_examples(3)
    cfg = compose_cfg(overrides(cache, d, *FULL))
    initial = load_model(cfg, load_tokenizer(cfg))
    assert abs(res["heldout_full_depth"] - heldout_loss(initial, examples, 4, pad_id)) < 1e-5
    assert abs(res["heldout_speed_zero_shot"] - heldout_loss(initial, examples, 3, pad_id)) < 1e-5
    assert math.isfinite(res["heldout_after"])  # evaluated sharded on the ranks, before consolidation
    assert abs(res["heldout_after"] - val[4]) < 1e-5  # == the last validation
    model_dir = out / "export" / "model"
    tensors = load_file(model_dir / "model.safetensors")
    assert min(t.numel() for t in tensors.values()) > 0  # no empty ZeRO-3 shards written
    speed = json.loads((model_dir / "speed_config.json").read_text())
    assert (speed["k_layers"], speed["num_layers"], speed["anchor"]) == (3, 4, "bos")
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    logits = speed_logits(reloaded, probe_batch(), speed["k_layers"])
    assert (logits - torch.load(d / "logits.pt")).abs().max().item() < 1e-5  # == the trained model
    assert (logits - reference["logits"]).abs().max().item() < 1e-4  # == the single-process run


@pytest.mark.slow
def test_deepspeed_zero3_lora_adapter_is_full_and_loads_back(cache, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from speed_train.train.build import load_model, load_tokenizer

    lora = [
        "lora.enabled=true",
        "trainer.global_batch_size=4",
        "data.max_train_examples=16",
        "trainer.max_steps=2",
        "export.enabled=true",
        "optim.lr=1e-2",
    ]
    ref = run(cache, tmp_path / "ref", *lora, "trainer.micro_batch_size=1")
    assert ref["val_losses"] == {} and not csv_losses(tmp_path / "ref", "val/loss")  # eval_every null: none
    out = tmp_path / "z3lora"
    run_script(
        overrides(
            cache, out, *lora, "trainer.micro_batch_size=1", "trainer.devices=2", "strategy=deepspeed_zero3"
        ),
        nproc=2,
        probes={"logits": str(tmp_path / "logits.pt"), "partition": str(tmp_path / "params")},
    )
    res = results_of(out)
    # the base model was built partitioned; peft then added full (small) adapters, which the
    # engine partitions at setup
    for r in (0, 1):
        c = json.loads((tmp_path / f"params.rank{r}.json").read_text())
        lora_params = c["params"] - c["partitioned"]
        assert c["partitioned"] > 30 and lora_params == 2 * 7 * 4  # A and B of 7 projections x 4 layers
        assert (
            c["partitioned_total"] / 2
            <= c["partitioned_local"]
            <= c["partitioned_total"] / 2 + c["partitioned"]
        )
    assert max(abs(a - b) for a, b in zip(res["step_losses"], ref["step_losses"])) < 1e-5
    trained = torch.load(tmp_path / "logits.pt")
    adapter = load_file(out / "export" / "adapter" / "adapter_model.safetensors")
    assert adapter and min(t.numel() for t in adapter.values()) > 0
    assert (
        max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 0
    )  # trained, not the zero init
    assert (out / "export" / "adapter" / "speed_config.json").is_file()
    cfg = compose_cfg(overrides(cache, tmp_path, "lora.enabled=false"))
    base = load_model(cfg, load_tokenizer(cfg))  # the same random init (seeded)
    with_adapter = PeftModel.from_pretrained(base, out / "export" / "adapter")
    batch = probe_batch()
    assert (speed_logits(with_adapter, batch, 3) - trained).abs().max().item() < 1e-6
    merged = AutoModelForCausalLM.from_pretrained(out / "export" / "model")
    assert (speed_logits(merged, batch, 3) - trained).abs().max().item() < 1e-5


@pytest.mark.slow
def test_single_process_export_reloads_to_the_trained_logits(cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from speed_train.train.build import load_model, load_tokenizer

    r = run(
        cache,
        tmp_path,
        "trainer.max_steps=2",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "data.max_train_examples=16",
        "export.enabled=true",
        "eval_report=true",
        "optim.lr=1e-2",
        callbacks=[LogitsDump(tmp_path / "logits.pt")],
    )
    assert r["export"] == {
        "adapter": str(tmp_path / "export" / "adapter"),
        "model": str(tmp_path / "export" / "model"),
    }
    assert r["heldout_after"] < r["heldout_speed_zero_shot"]
    trained, batch = torch.load(tmp_path / "logits.pt"), probe_batch()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "model")
    assert (speed_logits(merged, batch, r["k"]) - trained).abs().max().item() < 1e-5
    cfg = compose_cfg(overrides(cache, tmp_path, "lora.enabled=false"))
    adapted = PeftModel.from_pretrained(load_model(cfg, load_tokenizer(cfg)), tmp_path / "export" / "adapter")
    assert (speed_logits(adapted, batch, r["k"]) - trained).abs().max().item() < 1e-6


# -- 5./6. exact resume: hard kill, SIGTERM, SIGUSR1 ------------------------------------------
# LoRA with dropout (so the RNG state must travel with the checkpoint), GA=2, 24 examples of
# which 4 per step: 6 steps per epoch, so 8 steps cross an epoch boundary.
RESUME = [
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "data.max_train_examples=24",
    "trainer.max_steps=8",
    "trainer.checkpoint_every_n_steps=4",
    "lora.dropout=0.1",
    "optim.lr=1e-2",
]


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    r = run(cache, d, *RESUME)
    assert len(r["step_losses"]) == 8 and len(set(r["step_losses"])) == 8
    return {"losses": r["step_losses"], "csv": csv_losses(d)}


def test_newest_complete_checkpoint_is_picked(tmp_path):
    d = tmp_path / "checkpoints"
    assert newest_checkpoint(d) is None and resolve_resume("auto", d) is None
    d.mkdir()
    torch.save({"step": 4}, d / "step=4.ckpt")
    (d / "step=6.ckpt.tmp").write_bytes(b"half-written")  # an interrupted atomic write
    (d / "step=7.ckpt").mkdir()  # a DeepSpeed directory without COMPLETE: save interrupted
    (d / "step=7.ckpt" / "checkpoint").mkdir()
    (d / "step=9.ckpt.tmp").mkdir()
    (d / "notes-step=99.txt").write_text("not a checkpoint")
    assert newest_checkpoint(d) == str(d / "step=4.ckpt")
    (d / "step=7.ckpt" / COMPLETE).write_text("ok\n")
    assert newest_checkpoint(d) == str(d / "step=7.ckpt")
    torch.save({"step": 8}, d / "preempt-step=8.ckpt")
    assert resolve_resume("auto", d) == str(d / "preempt-step=8.ckpt")
    assert resolve_resume("never", d) is None
    with pytest.raises(ResumeError, match="resume='/nope': no such checkpoint"):
        resolve_resume("/nope", d)


def test_loader_state_resumes_mid_epoch_and_at_epoch_end_and_refuses_another_split():
    counts = [3] * 16
    plan = StepPlan(counts, 4, 2, 1, seed=0)  # GA 2: 8 micro-batches per epoch
    a = ResumableLoader([None] * 16, plan, 0, 0)
    for _ in range(6):
        a.mark_consumed(1)
    state = a.state_dict()
    assert (state["epoch"], state["consumed"]) == (1, 6)
    b = ResumableLoader([None] * 16, StepPlan(counts, 4, 2, 1, seed=0), 0, 0)
    b.load_state_dict(state)
    assert list(b.sampler) == [(1, 6), (1, 7)]  # the very next micro-batch of the saved epoch
    assert list(b.sampler)[0] == (1, 0)  # skipping applies to the resumed epoch only
    for _ in range(2):
        a.mark_consumed(1)
    b.load_state_dict(a.state_dict())  # saved at the end of epoch 1: resume at the start of epoch 2
    assert list(b.sampler)[:2] == [(2, 0), (2, 1)]
    other = ResumableLoader([None] * 16, StepPlan(counts, 4, 1, 1, seed=0), 0, 0)
    with pytest.raises(ValueError, match=r"data plan differs from this run's \(micro_batch 2 -> 1\)"):
        other.load_state_dict(state)


@pytest.mark.slow
def test_hard_kill_then_resume_gives_identical_losses(uninterrupted, cache, tmp_path):
    r = run_script(overrides(cache, tmp_path, *RESUME), probes={"exit_at_step": 4}, check=False)
    assert r.returncode == 17, r.stderr[-3000:]  # os._exit right after the step-4 checkpoint
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=4.ckpt", "step=4.ckpt.complete"]
    # leftovers of a crash that resume must never pick
    (ckpts / "step=6.ckpt.tmp").write_bytes(b"half-written")
    (ckpts / "step=7.ckpt").mkdir()
    (ckpts / "step=7.ckpt" / "checkpoint").mkdir()
    # and a newest checkpoint that was truncated after it was written (a bad disk, a partial copy)
    whole = (ckpts / "step=4.ckpt").read_bytes()
    (ckpts / "step=8.ckpt").write_bytes(whole[: len(whole) // 2])
    (ckpts / "step=8.ckpt.complete").write_text(json.dumps({"bytes": len(whole)}))
    res = run(cache, tmp_path, *RESUME)
    assert res["resumed_from"] == str(ckpts / "step=4.ckpt") and res["global_step"] == 8
    assert res["step_losses"] == uninterrupted["losses"]  # bit-identical, every step
    assert csv_losses(tmp_path) == uninterrupted["csv"]  # the log continues, nothing lost or doubled
    # the damaged ones were set aside (never overwritten, never loaded), step 8 saved afresh under
    # its own name (no step=8-v1), retention (keep 2) applied, stray temporaries gone
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step=4.ckpt",
        "step=4.ckpt.complete",
        "step=7.ckpt.corrupt",
        "step=8.ckpt",
        "step=8.ckpt.complete",
        "step=8.ckpt.corrupt",
    ]


def test_checkpoint_verification_and_retention(tmp_path):
    from speed_train.train.checkpointing import prune, verify

    d = tmp_path / "checkpoints"
    d.mkdir()
    for step in (2, 4, 6):
        torch.save({"step": step}, d / f"step={step}.ckpt")
    torch.save({"step": 5}, d / "preempt-step=5.ckpt")
    assert verify(d / "step=6.ckpt") is None
    (d / "step=6.ckpt.complete").write_text(json.dumps({"bytes": 1}))
    assert "bytes" in verify(d / "step=6.ckpt")  # size differs from what was written
    (d / "step=6.ckpt.complete").unlink()
    (d / "step=6.ckpt").write_bytes((d / "step=6.ckpt").read_bytes()[:20])
    assert verify(d / "step=6.ckpt").startswith("unreadable")  # the zip directory is gone
    assert newest_checkpoint(d, quarantine=True) == str(d / "preempt-step=5.ckpt")  # step 6 skipped
    assert (d / "step=6.ckpt.corrupt").is_file() and not (d / "step=6.ckpt").exists()
    (d / "step=3.ckpt.tmp").write_bytes(b"x")
    (d / ".step=4.ckpt.tmp-abc").write_bytes(b"x")
    prune(d, keep=1)  # newest regular kept; the older pre-emption one and temporaries removed
    assert sorted(p.name for p in d.iterdir()) == [
        "preempt-step=5.ckpt",
        "step=4.ckpt",
        "step=6.ckpt.corrupt",
    ]
    torch.save({"step": 7}, d / "step=7.ckpt")
    prune(d, keep=1, protect=d / "step=4.ckpt")  # the checkpoint a run resumes from is never removed
    assert sorted(p.name for p in d.iterdir()) == ["step=4.ckpt", "step=6.ckpt.corrupt", "step=7.ckpt"]
    prune(d, keep=1)
    assert sorted(p.name for p in d.iterdir()) == ["step=6.ckpt.corrupt", "step=7.ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("signame, after_step", [("SIGTERM", 6), ("SIGUSR1", 5)])
def test_preemption_signal_saves_and_resume_gives_identical_losses(
    signame, after_step, uninterrupted, cache, tmp_path
):
    # the signal arrives in the first micro-batch of step after_step+1: that step is finished
    # (GA=2), checkpointed, and the run stops cleanly. SIGUSR1 at step 6 = the end of epoch 0.
    run_script(overrides(cache, tmp_path, *RESUME), probes={"signal_at_step": [after_step, signame]})
    stopped = results_of(tmp_path)
    step = after_step + 1
    assert stopped["preempted_by_signal"] == getattr(signal, signame) and stopped["global_step"] == step
    assert stopped["preempt_checkpoint"] == str(tmp_path / "checkpoints" / f"preempt-step={step}.ckpt")
    assert stopped["export"] == {} and stopped["step_losses"] == uninterrupted["losses"][:step]
    res = run(cache, tmp_path, *RESUME)
    assert res["resumed_from"] == stopped["preempt_checkpoint"] and res["preempted_by_signal"] is None
    assert res["step_losses"] == uninterrupted["losses"]
    assert csv_losses(tmp_path) == uninterrupted["csv"]


# -- 7. self-distillation ------------------------------------------------------------------------
@pytest.mark.slow
def test_distillation_loss_is_zero_at_step_0_when_k_equals_l(cache, tmp_path):
    common = [
        "objective.kind=distill",
        "trainer.max_steps=1",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "data.max_train_examples=16",
    ]
    full = run(cache, tmp_path / "full", *common, "speed=full")  # K = L: student = teacher
    assert full["k"] == full["num_layers"] == 4 and full["step_losses"] == [0.0]
    speed = run(cache, tmp_path / "speed", *common)  # K = 3 < L: a real KL to the full-depth teacher
    assert speed["k"] == 3 and 1e-5 < speed["step_losses"][0] < 1.0


# -- 8. packing across the dataset, reduce=sum ----------------------------------------------------
def test_pack_rows_best_fit_is_deterministic_and_complete():
    from speed_train.train.loader import pack_rows

    lengths = [(i * 37) % 200 + 5 for i in range(300)]
    rows = pack_rows(lengths, 256, seed=3)
    assert sorted(i for r in rows for i in r) == list(range(300))  # every example exactly once
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert rows == pack_rows(lengths, 256, seed=3) and rows != pack_rows(lengths, 256, seed=4)
    assert len(rows) <= 1.1 * sum(lengths) / 256 + 1  # best fit: rows nearly full
    with pytest.raises(ValueError, match="example 0 has 300 tokens > the packed row length 256"):
        pack_rows([300], 256, seed=0)


def test_packed_rows_give_the_unpacked_losses(cache):
    from speed_train.speed.batch import collate
    from speed_train.speed.executors import speed_loss
    from speed_train.speed.tiny import tiny_model
    from speed_train.train.loader import pack_rows

    examples, pad_id = heldout_examples(12)
    model = tiny_model("llama", layers=4, hidden=64, vocab=49152)
    rows = pack_rows([len(ex) for ex in examples], 512, seed=0)
    assert len(rows) < len(examples)  # several conversations share a row
    with torch.no_grad():
        unpacked = speed_loss(model, collate(examples, pad_id), 3)
        packed = speed_loss(model, collate([[examples[i] for i in r] for r in rows], pad_id, pack_to=512), 3)
    assert packed.num_tokens == unpacked.num_tokens
    assert abs(packed.loss_sum.item() - unpacked.loss_sum.item()) / unpacked.loss_sum.item() < 1e-6


def test_step_plan_normalisers_for_mean_and_sum():
    counts = [3, 5, 7, 2, 4, 6, 1, 8]
    mean = StepPlan(counts, 4, 2, 1, seed=0)
    total = StepPlan(counts, 4, 2, 1, seed=0, reduce="sum")
    perm = mean._perm(0)
    assert mean.items(0, 0, 0)[1] == sum(counts[i] for i in perm[:4])  # the step's supervised tokens
    assert total.items(0, 0, 1)[1] == 4  # the step's conversations
    rows = [[0, 1], [2], [3, 4, 5], [6, 7]]  # packed: 4 rows of 8 conversations
    packed = StepPlan(counts, 2, 1, 1, seed=0, rows=rows, reduce="sum")
    first = packed._perm(0)[:2]
    assert packed.items(0, 0, 0)[1] == sum(len(rows[r]) for r in first)
    assert packed.num_rows == 4 and packed.steps_per_epoch == 2


@pytest.mark.slow
def test_reduce_sum_gradients_are_split_invariant(cache, tmp_path):
    common = [
        "trainer.global_batch_size=4",
        "data.max_train_examples=16",
        "trainer.max_steps=1",
        "lora.enabled=false",
        "objective.reduce=sum",
    ]
    run(cache, tmp_path / "a", *common, "trainer.micro_batch_size=1", callbacks=[GradDump(tmp_path / "a.pt")])
    run(cache, tmp_path / "b", *common, "trainer.micro_batch_size=4", callbacks=[GradDump(tmp_path / "b.pt")])
    ga4, ga1 = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    scale = max(t.abs().max().item() for t in ga1.values())  # sum: not divided by tokens, so larger
    assert scale > 1e-2 and max_diff(ga4, ga1) / scale < 1e-6
    run(
        cache,
        tmp_path / "m",
        *common[:-1],
        "trainer.micro_batch_size=4",
        callbacks=[GradDump(tmp_path / "m.pt")],
    )
    mean = torch.load(tmp_path / "m.pt")
    # sum / 4 conversations vs sum / supervised tokens: the same direction, a larger scale
    name = next(iter(mean))
    ratio = (ga1[name].norm() / mean[name].norm()).item()
    assert ratio > 2 and all(torch.allclose(ga1[n] / ratio, mean[n], atol=1e-6, rtol=1e-3) for n in mean)


# -- 9. issue 18: guards on resume, divergence, the run's end ------------------------------------
SHORT = ["trainer.global_batch_size=2", "trainer.micro_batch_size=2", "data.max_train_examples=8"]


def local_recipe(tmp_path, answers: list[str]) -> str:
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(answers)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: mine\nheld_out: 0\nsources:\n  - {{name: a, path: {data}, format: messages}}\n")
    return str(recipe)


@pytest.mark.slow
def test_resume_refuses_changed_data_behind_the_same_recipe_and_a_checkpoint_without_record(cache, tmp_path):
    from speed_train.train.resume import ResumeError

    recipe = local_recipe(tmp_path, [f"answer {i}" for i in range(8)])
    out = tmp_path / "run"
    args = [*SHORT, f"data.recipe={recipe}", "trainer.max_steps=2"]
    run(cache, out, *args)
    # the same recipe file and the same number of rows, other content
    local_recipe(tmp_path, [f"a much longer answer, number {i}" for i in range(8)])
    ckpt = out / "checkpoints" / "step=2.ckpt"
    with pytest.raises(
        ResumeError, match=rf"resume: {ckpt} was saved by a run with other settings \(data\.content "
    ):
        run(cache, out, *args[:-1], "trainer.max_steps=4")
    # without its completion record (a copied file) the checkpoint's own record refuses it, at load
    local_recipe(tmp_path, [f"answer {i}" for i in range(8)])
    (out / "checkpoints" / "step=2.ckpt.complete").unlink()
    with pytest.raises(ResumeError, match=r"\(optim\.lr 0\.001 -> 0\.5\)"):
        run(cache, out, *args[:-1], "trainer.max_steps=4", "optim.lr=0.5")
    assert run(cache, out, *args[:-1], "trainer.max_steps=3")["resumed_from"] == str(ckpt)


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_a_checkpoints_weights(cache, tmp_path):
    from speed_train.train.build import ConfigError

    run(cache, tmp_path / "a", *SHORT, "trainer.max_steps=2", "optim.lr=1e-2")
    ckpt = tmp_path / "a" / "checkpoints" / "step=2.ckpt"
    # a new run with another schedule from those weights: lr ~0 keeps them, so its step-1 weights
    # are the checkpoint's
    b = run(cache, tmp_path / "b", *SHORT, "trainer.max_steps=1", "optim.lr=1e-20", f"init_from='{ckpt}'")
    assert b["resumed_from"] is None and b["global_step"] == 1
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "b" / "checkpoints" / "step=1.ckpt", weights_only=True)["state_dict"]
    assert trained.keys() == after.keys() and any("lora_B" in n for n in trained)
    assert max((trained[n] - after[n]).abs().max().item() for n in trained) < 1e-12
    assert any(trained[n].abs().max() > 0 for n in trained if "lora_B" in n)  # not the fresh init (B = 0)
    with pytest.raises(
        ConfigError, match=r"init_from=.*step=2\.ckpt: its weights are for another model \(lora\.r 16 -> 4\)"
    ):
        run(cache, tmp_path / "c", *SHORT, "trainer.max_steps=1", "lora.r=4", f"init_from='{ckpt}'")


class BreakWeights(L.Callback):
    """Makes a trained weight infinite after optimizer step 1, with the step's loss finite."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            next(p for p in pl_module.parameters() if p.requires_grad).data[0, 0] = float("inf")


def test_a_checkpoint_of_non_finite_weights_is_refused(cache, tmp_path):
    from speed_train.train.module import DivergenceError

    with pytest.raises(
        DivergenceError, match=r"diverged by optimizer step 1: 1 weight tensors hold NaN or infinite"
    ):
        run(
            cache,
            tmp_path,
            *SHORT,
            "trainer.max_steps=2",
            "trainer.checkpoint_every_n_steps=1",
            callbacks=[BreakWeights()],
        )
    assert list(tmp_path.glob("checkpoints/*")) == []  # nothing saved


def test_export_refuses_non_finite_weights(tmp_path):
    from speed_train.speed.tiny import tiny_model
    from speed_train.train.build import load_tokenizer
    from speed_train.train.export import export
    from speed_train.train.module import DivergenceError

    cfg = compose_cfg([*BASE, f"output_dir={tmp_path}", "lora.enabled=false"])
    tok = load_tokenizer(cfg)
    model = tiny_model("llama", layers=4, vocab=len(tok))
    model.model.norm.weight.data[0] = float("nan")
    with pytest.raises(
        DivergenceError, match=r"refusing to export: 1 weight tensors hold NaN .*model\.norm\.weight"
    ):
        export(model, tok, cfg, tmp_path / "export")
    assert not (tmp_path / "export" / "model").exists()


def test_zero_train_examples_is_refused_and_an_empty_held_out_set_is_reported(cache, tmp_path, caplog):
    from speed_train.train.build import ConfigError, validate

    with pytest.raises(ConfigError, match=r"data\.max_train_examples=0: must be >= 1 \(null: all\)"):
        validate(compose_cfg(overrides(cache, tmp_path, "data.max_train_examples=0")))  # was: all of them
    with caplog.at_level("WARNING", logger="speed_train"):
        r = run(
            cache, tmp_path, *SHORT, "trainer.max_steps=1", "eval_report=true", "data.max_eval_examples=0"
        )
    assert r["global_step"] == 1 and "heldout_full_depth" not in r
    assert "eval_report=true: the held-out set is empty" in caplog.text
