"""Held-out decode-token loss during training, on all ranks.

Each rank evaluates a strided shard of the held-out examples (``examples[rank::world]``) and
the (loss sum, token count) pairs are all-reduced, so ``val/loss`` is the token-weighted mean
over all held-out examples: the value ``sharded_heldout_loss`` gives on one process.

Why not Lightning's validation loop: its ``val_check_interval`` counts micro-batches (N
optimizer steps = N x accumulation), it does not run at the end of a ``max_steps`` run, and
under ZeRO-3 every forward gathers parameters collectively, so every rank must run the same
number of forwards: with a shard one example shorter, a rank runs an extra forward whose
result it discards (``lockstep``). Scheduling is keyed off ``trainer.global_step`` (with
DeepSpeed, optimizer-step hooks fire per micro-batch).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import lightning as L
import torch

from speed_train.speed.batch import collate
from speed_train.speed.executors import speed_loss

# Held-out conversations per forward. Evaluation keeps no activations for a backward, so it
# batches more than training's micro-batch; under ZeRO-3 every forward gathers the parameters,
# so fewer, larger forwards are much cheaper.
EVAL_MICRO_BATCH = 8


@torch.no_grad()
def sharded_heldout_losses(
    model,
    examples,
    k: int,
    pad_id: int,
    *,
    rank: int = 0,
    world: int = 1,
    reduce=None,
    micro_batch: int = EVAL_MICRO_BATCH,
    lockstep: bool = False,
) -> dict[str, float]:
    """Token-weighted mean decode-token cross-entropy over ``examples``, per source (the
    examples' ``meta["source"]``, in order of first appearance) and over all (key ``"all"``).
    This rank takes every ``world``-th example of each source, from its ``rank``-th; ``reduce``
    sums a tensor over the ranks (None: one process). ``lockstep``: all ranks run the same number
    of forwards (ZeRO-3)."""
    groups: dict[str, list] = {}
    for ex in examples:
        groups.setdefault(str(ex.meta.get("source", "")), []).append(ex)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stats = torch.zeros(len(groups), 2, dtype=torch.float64, device=device)
    for g, members in enumerate(groups.values()):
        n = len(members)
        mine = members[rank::world]
        batches = math.ceil(len(mine) / micro_batch)
        if lockstep:
            batches = math.ceil(math.ceil(n / world) / micro_batch) if n else 0
        for i in range(batches):
            part = mine[i * micro_batch : (i + 1) * micro_batch]
            out = speed_loss(model, collate(part or [members[0]], pad_id).to(device), k)
            if part:  # an empty part only keeps this rank in step with the others
                stats[g, 0] += float(out.loss_sum)
                stats[g, 1] += out.num_tokens
    model.train(was_training)
    if reduce is not None:
        stats = reduce(stats)
    sums = stats.tolist()
    out = {name: (t / c if c else float("nan")) for name, (t, c) in zip(groups, sums)}
    total, count = sum(t for t, _ in sums), sum(c for _, c in sums)
    out["all"] = total / count if count else float("nan")
    return out


def sharded_heldout_loss(model, examples, k: int, pad_id: int, **kw) -> float:
    """The token-weighted mean over all of ``examples`` (see :func:`sharded_heldout_losses`)."""
    return sharded_heldout_losses(model, examples, k, pad_id, **kw)["all"]


def _on_all_ranks(trainer, model, examples, k, pad_id, micro_batch, lockstep) -> dict[str, float]:
    strategy = trainer.strategy
    reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
    return sharded_heldout_losses(
        model,
        examples,
        k,
        pad_id,
        rank=trainer.global_rank,
        world=trainer.world_size,
        reduce=reduce,
        micro_batch=micro_batch,
        lockstep=lockstep,
    )


class Validation(L.Callback):
    """``val/loss`` after every ``every_n_steps`` optimizer steps and after the last one
    (``total_steps``); ``history``: {step: loss}, kept in checkpoints across resumes."""

    def __init__(
        self,
        examples,
        pad_id: int,
        *,
        every_n_steps: int,
        total_steps: int,
        micro_batch: int,
        lockstep: bool = False,
    ) -> None:
        self.examples, self.pad_id = examples, pad_id
        self.every, self.total_steps = every_n_steps, total_steps
        self.micro_batch, self.lockstep = micro_batch, lockstep
        self.history: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.step_ended:  # still accumulating (StepBookkeeping decided, before us)
            return
        step = trainer.global_step
        if step % self.every and step != self.total_steps:
            return
        loss = _on_all_ranks(
            trainer, pl_module.model, self.examples, pl_module.k, self.pad_id, self.micro_batch, self.lockstep
        )["all"]
        self.history[step] = loss
        pl_module.log("val/loss", loss, on_step=True, prog_bar=True, logger=True, rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"history": dict(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {int(s): float(v) for s, v in state_dict.get("history", {}).items()}


class HeldoutTable(L.Callback):
    """The held-out table of a run, computed on the training devices, sharded over the ranks:

    - before training (at fit start, on a fresh run; with DeepSpeed after the engine is set up, on
      the initial weights): full depth with adapters off, and SPEED-K zero-shot;
    - after training (at train end, or at fit end for a run resumed from its final checkpoint;
      before any export or consolidation, unless a pre-emption stopped the run): the trained model as it will be served (SPEED-K with shallow prefill, or
      Full-IT at full depth when K = L), and the same weights at full depth (what serving them
      shallow costs) when K < L.

    The before-training rows travel in checkpoints, so a resumed run reports them too."""

    def __init__(self, examples, pad_id: int, micro_batch: int, lockstep: bool) -> None:
        self.examples, self.pad_id, self.micro_batch, self.lockstep = examples, pad_id, micro_batch, lockstep
        self.results: dict[str, float] = {}
        self.by_source: dict[str, dict[str, float]] = {}  # row -> source -> loss
        self.seconds = 0.0

    def _measure(self, row: str, trainer, pl_module, k: int) -> None:
        losses = _on_all_ranks(
            trainer, pl_module.model, self.examples, k, self.pad_id, self.micro_batch, self.lockstep
        )
        self.results[row] = losses.pop("all")
        self.by_source[row] = losses

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None or "heldout_full_depth" in self.results or not len(self.examples):
            return  # resumed: the rows came with the checkpoint (or cannot be computed afresh)
        t0 = time.perf_counter()
        model = pl_module.model
        base = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with base:
            self._measure("heldout_full_depth", trainer, pl_module, pl_module.shape.layers)
            if pl_module.k < pl_module.shape.layers:
                self._measure("heldout_speed_zero_shot", trainer, pl_module, pl_module.k)
        self.seconds += time.perf_counter() - t0

    def on_train_end(self, trainer, pl_module) -> None:
        stopped = any(getattr(cb, "received", None) for cb in trainer.callbacks)  # pre-empted: no time
        if stopped or not len(self.examples) or "heldout_after" in self.results:
            return
        t0 = time.perf_counter()
        self._measure("heldout_after", trainer, pl_module, pl_module.k)
        if pl_module.k < pl_module.shape.layers:
            self._measure("heldout_after_full_depth", trainer, pl_module, pl_module.shape.layers)
        self.seconds += time.perf_counter() - t0

    def on_fit_end(self, trainer, pl_module) -> None:
        # resumed from the final checkpoint (to export again, say): Lightning skips the training
        # loop and with it on_train_end, so the after-training rows are measured here
        if trainer.global_step >= trainer.max_steps:
            self.on_train_end(trainer, pl_module)

    def state_dict(self) -> dict:
        before = ("heldout_full_depth", "heldout_speed_zero_shot")
        return {
            **{k: v for k, v in self.results.items() if k in before},
            "by_source": {k: v for k, v in self.by_source.items() if k in before},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.by_source.update(state.pop("by_source", {}))
        self.results.update({k: float(v) for k, v in state.items()})
