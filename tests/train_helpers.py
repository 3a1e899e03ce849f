"""Test-only helpers for the training tests: config composition, probe callbacks (gradient dump,
hard kill, self-signal, logits dump) and subprocess launchers (plain python and torchrun).

``python -m tests.train_script`` runs ``train(cfg)`` with these callbacks in a subprocess; the probes are
chosen by the ``SPEED_TEST_PROBES`` environment variable (JSON), so the same script serves
single-process, DDP and DeepSpeed runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "tests.train_script"  # run as a module from the repository root

# Small, fast defaults shared by every training test: tiny random llama, packaged chat data
# (tokenised once per session into data.cache_dir), csv logs, no eval table.
BASE = [
    "model=tiny_llama",
    "data=packaged_chat",
    "trainer=cpu",
    "trainer.precision=32-true",  # exact comparisons; the default (auto) is bf16 on AMX CPUs
    "strategy=auto",
    "logger=csv",
    "data.max_length=256",
    "data.max_eval_examples=4",
    "trainer.progress_bar=false",
    "eval_report=false",
    "export.enabled=false",
]


def compose_cfg(overrides=()):
    from hydra import compose, initialize_config_module

    from speed_train.train.schema import register_schema

    register_schema()
    with initialize_config_module(config_module="speed_train.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


# -- probes --------------------------------------------------------------------------------------
def _full_grads(trainer, pl_module) -> dict[str, torch.Tensor]:
    """Accumulated (and, across ranks, averaged) gradients, full-size, by parameter name."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    grads = {}
    ds = isinstance(trainer.strategy, DeepSpeedStrategy)
    if ds:
        from deepspeed.utils import safe_get_full_grad
    for name, p in pl_module.model.named_parameters():
        if not p.requires_grad:
            continue
        g = safe_get_full_grad(p) if ds else p.grad  # ZeRO: collective, every rank calls it
        if g is not None:
            grads[name] = g.detach().float().cpu().clone()
    return grads


class GradDump(L.Callback):
    """Saves the gradients of the first optimizer step (rank 0) at on_before_optimizer_step."""

    def __init__(self, path) -> None:
        self.path, self.done = Path(path), False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.done or trainer.global_step != 0:
            return
        if (trainer.fit_loop.epoch_loop.batch_progress.current.ready % trainer.accumulate_grad_batches) != 0:
            return  # DeepSpeed calls this hook per micro-batch: only the step boundary counts
        grads = _full_grads(trainer, pl_module)
        self.done = True
        if trainer.is_global_zero:
            torch.save(grads, self.path)


class ExitAtStep(L.Callback):
    """Hard kill (no cleanup, like SIGKILL / a node failure) as soon as ``step`` optimizer steps
    are done and their checkpoint is on disk: at the start of the next micro-batch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(17)


class SignalAtStep(L.Callback):
    """Rank 0 sends ``signum`` to itself once ``step`` optimizer steps are done: at the start of
    the first micro-batch of step ``step + 1`` (so, with GA > 1, that step must be finished)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.sent and trainer.global_step == self.step and trainer.is_global_zero:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class PartitionProbe(L.Callback):
    """Right after the model is built — at ``setup``, before the DeepSpeed engine exists, so any
    partitioning is construction-time — each rank writes ``<path>.rank<R>.json``: parameters,
    how many are ZeRO-3-partitioned, elements held locally (the rank's shards, or the full tensor
    of an unpartitioned parameter), elements in the full model, elements visible in ``p.data``."""

    def __init__(self, path) -> None:
        self.path = Path(path)

    def setup(self, trainer, pl_module, stage) -> None:
        stats = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "params": 0,
            "partitioned": 0,
            "local": 0,
            "total": 0,
            "visible": 0,
            "partitioned_total": 0,
            "partitioned_local": 0,
        }
        for _, p in pl_module.model.named_parameters():
            part = hasattr(p, "ds_id")
            local = p.ds_tensor.numel() if part else p.numel()
            total = p.ds_numel if part else p.numel()
            stats["params"] += 1
            stats["partitioned"] += part
            stats["local"] += local
            stats["total"] += total
            stats["visible"] += p.numel()
            if part:
                stats["partitioned_total"] += total
                stats["partitioned_local"] += local
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(stats))


def heldout_examples(n: int = 4, max_length: int = 256):
    """The ``n`` held-out conversations a run with ``data.max_eval_examples=n`` evaluates (BASE
    config's data), and the pad id."""
    from speed_train.data.pipeline import build_dataset
    from speed_train.data.recipes import load_recipe
    from speed_train.speed.config import SpeedConfig
    from speed_train.train.build import load_tokenizer

    cfg = compose_cfg(BASE)
    tok = load_tokenizer(cfg)
    _, held, _ = build_dataset(
        "packaged_chat",
        tok,
        SpeedConfig(k=0.75, anchor="bos"),
        max_length=max_length,
        cache_dir=os.environ.get("SPEED_TEST_CACHE"),
    )
    return list(held.stratified_sample(n, seed=load_recipe("packaged_chat").seed)), tok.pad_token_id


def probe_batch(n: int = 4, max_length: int = 256):
    """A fixed collated batch of held-out conversations (for logits comparisons)."""
    from speed_train.speed.batch import collate

    examples, pad_id = heldout_examples(n, max_length)
    return collate(examples, pad_id)


class HeldoutProbe(L.Callback):
    """After every optimizer step (single process): ``sharded_heldout_loss`` of the model on the first
    ``n`` held-out examples, by step — the reference for ``val/loss``."""

    def __init__(self, n: int) -> None:
        self.n, self.losses, self._last, self._data = n, {}, 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from speed_train.train.validation import sharded_heldout_loss as heldout_loss

        if trainer.global_step == self._last:
            return
        self._last = trainer.global_step
        self._data = self._data or heldout_examples(self.n)
        examples, pad_id = self._data
        self.losses[trainer.global_step] = heldout_loss(pl_module.model, examples, pl_module.k, pad_id)


@torch.no_grad()
def speed_logits(model, batch, k: int) -> torch.Tensor:
    from speed_train.speed.executors import gather_forward

    was = model.training
    model.eval()
    out = gather_forward(model, batch, k).logits.float().cpu()
    model.train(was)
    return out


class LogitsDump(L.Callback):
    """At the end of training: SPEED (gather) logits of the trained model on a fixed batch.
    Under ZeRO-3 every rank runs the forward (parameters are gathered collectively)."""

    def __init__(self, path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        logits = speed_logits(pl_module.model, probe_batch(), pl_module.k)
        if trainer.is_global_zero:
            torch.save(logits, self.path)


def probes_from_env() -> list[L.Callback]:
    spec = json.loads(os.environ.get("SPEED_TEST_PROBES", "{}"))
    cbs: list[L.Callback] = []
    if "grads" in spec:
        cbs.append(GradDump(spec["grads"]))
    if "logits" in spec:
        cbs.append(LogitsDump(spec["logits"]))
    if "partition" in spec:
        cbs.append(PartitionProbe(spec["partition"]))
    if "exit_at_step" in spec:
        cbs.append(ExitAtStep(int(spec["exit_at_step"])))
    if "signal_at_step" in spec:
        step, name = spec["signal_at_step"]
        cbs.append(SignalAtStep(int(step), getattr(signal, name)))
    return cbs


# -- subprocess launchers ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(
    overrides, *, nproc: int = 1, probes: dict | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs tests.train_script with ``overrides`` in 1 process (python) or ``nproc`` (torchrun)."""
    env = {
        **os.environ,
        "SPEED_TEST_PROBES": json.dumps(probes or {}),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("SLURM_JOB_ID", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", SCRIPT, *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            SCRIPT,
            *overrides,
        ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
        )
    return r


def results_of(out_dir) -> dict:
    return json.loads((Path(out_dir) / "results.json").read_text())
