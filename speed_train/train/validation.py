"""Held-out decode-token loss during training, on all ranks.

Each rank evaluates a strided shard of the held-out examples (``examples[rank::world]``) and
the (loss sum, token count) pairs are all-reduced, so ``val/loss`` is the token-weighted mean
over all held-out examples: the value ``run.heldout_loss`` gives on one process.

Why not Lightning's validation loop: its ``val_check_interval`` counts micro-batches (N
optimizer steps = N x accumulation), it does not run at the end of a ``max_steps`` run, and
under ZeRO-3 every forward gathers parameters collectively, so every rank must run the same
number of forwards: with a shard one example shorter, a rank runs an extra forward whose
result it discards (``lockstep``). Scheduling is keyed off ``trainer.global_step`` (with
DeepSpeed, optimizer-step hooks fire per micro-batch).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import lightning as L
import torch

from speed_train.speed.batch import collate
from speed_train.speed.executors import speed_loss


@torch.no_grad()
def sharded_heldout_loss(model, examples, k: int, pad_id: int, *, rank: int = 0, world: int = 1, reduce=None,
                         micro_batch: int = 8, lockstep: bool = False) -> float:  # fmt: skip
    """Token-weighted mean decode-token cross-entropy over ``examples``, this rank taking
    ``examples[rank::world]``; ``reduce`` sums a tensor over the ranks (None: one process).
    ``lockstep``: all ranks run the same number of forwards (ZeRO-3)."""
    n = len(examples)
    mine = [examples[i] for i in range(rank, n, world)]
    batches = math.ceil(len(mine) / micro_batch)
    if lockstep:
        batches = math.ceil(math.ceil(n / world) / micro_batch) if n else 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(batches):
        part = mine[i * micro_batch : (i + 1) * micro_batch]
        out = speed_loss(model, collate(part or [examples[0]], pad_id).to(device), k)
        if part:  # an empty part only keeps this rank in step with the others
            total += float(out.loss_sum)
            count += out.num_tokens
    model.train(was_training)
    stats = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if reduce is not None:
        stats = reduce(stats)
    total, count = stats.tolist()
    return total / count if count else float("nan")


def _on_all_ranks(trainer, model, examples, k, pad_id, micro_batch, lockstep) -> float:
    strategy = trainer.strategy
    reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
    return sharded_heldout_loss(model, examples, k, pad_id, rank=trainer.global_rank, world=trainer.world_size,
                                reduce=reduce, micro_batch=micro_batch, lockstep=lockstep)  # fmt: skip


class Validation(L.Callback):
    """``val/loss`` after every ``every_n_steps`` optimizer steps and after the last one
    (``total_steps``); ``history``: {step: loss}, kept in checkpoints across resumes."""

    def __init__(self, examples, pad_id: int, *, every_n_steps: int, total_steps: int, micro_batch: int,
                 lockstep: bool = False) -> None:  # fmt: skip
        if every_n_steps < 1:
            raise ValueError(
                f"trainer.eval_every_n_steps={every_n_steps}: must be >= 1 (or null: no validation)"
            )
        self.examples, self.pad_id = examples, pad_id
        self.every, self.total_steps = every_n_steps, total_steps
        self.micro_batch, self.lockstep = micro_batch, lockstep
        self.history: dict[int, float] = {}
        self._last_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # still accumulating
            return
        self._last_step = step
        if step % self.every and step != self.total_steps:
            return
        loss = _on_all_ranks(trainer, pl_module.model, self.examples, pl_module.k, self.pad_id, self.micro_batch,
                             self.lockstep)  # fmt: skip
        self.history[step] = loss
        pl_module.log("val/loss", loss, on_step=True, prog_bar=True, logger=True, rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"history": dict(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {int(s): float(v) for s, v in state_dict.get("history", {}).items()}


class HeldoutBeforeTraining(L.Callback):
    """The before-training rows of the held-out table (full depth with adapters off; SPEED-K
    zero-shot) for a model built ZeRO-3-partitioned: its forward needs the DeepSpeed engine's
    parameter gathering, so this runs at fit start, on all ranks — with DeepSpeed, after the
    engine is set up and before a checkpoint is restored, i.e. on the initial weights."""

    def __init__(self, examples, pad_id: int, micro_batch: int) -> None:
        self.examples, self.pad_id, self.micro_batch = examples, pad_id, micro_batch
        self.results: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        base = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with base:
            full = _on_all_ranks(trainer, model, self.examples, pl_module.shape.layers, self.pad_id,
                                 self.micro_batch, lockstep=True)  # fmt: skip
            zero_shot = _on_all_ranks(trainer, model, self.examples, pl_module.k, self.pad_id, self.micro_batch,
                                      lockstep=True)  # fmt: skip
        self.results = {"heldout_full_depth": full, "heldout_speed_zero_shot": zero_shot}
