"""Deterministic optimizer-step plan and a resumable train loader.

Why a plan: the loss of an optimizer step is (sum of token losses) / (supervised tokens in the
whole step, all micro-batches, all ranks). The plan fixes which examples form each global
step, independently of how the step is split into ranks x accumulation x micro-batches, so
every micro-batch can carry the step's global token count without a collective, and a run
with GA=4 x micro 1 sees exactly the batches of a run with 2 ranks x GA=2.

Why a custom loader: Lightning saves and restores any train dataloader with
``state_dict``/``load_state_dict``; ours records (epoch, micro-batches consumed) and skips them
on resume, so mid-epoch resume continues on the very next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from speed_train.speed.batch import collate
from speed_train.speed.roles import EncodedExample


@dataclass
class StepPlan:
    num_supervised: list[int]
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        per_step = self.micro_batch * self.world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch} x "
                f"{self.world_size} ranks; choose a global batch that is a multiple of {per_step}"
            )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"only {len(self.num_supervised)} training examples: fewer than one global batch "
                f"({self.global_batch}); lower trainer.global_batch_size or add data"
            )

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.num_supervised) // self.global_batch  # the remainder is dropped

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def items(self, epoch: int, rank: int, j: int) -> tuple[list[int], int]:
        """Example indices of this rank's j-th micro-batch in ``epoch``, and its step's token count."""
        perm = self._perm(epoch)
        step, m = divmod(j, self.accumulation)
        step_ex = perm[step * self.global_batch : (step + 1) * self.global_batch]
        start = (rank * self.accumulation + m) * self.micro_batch
        tokens = sum(self.num_supervised[i] for i in step_ex)
        return step_ex[start : start + self.micro_batch], tokens

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.num_supervised), generator=g).tolist()


class _MicroBatches(Dataset):
    def __init__(self, examples: list[EncodedExample], plan: StepPlan, rank: int, pad_id: int,
                 pack_to: int | None) -> None:  # fmt: skip
        self.examples, self.plan, self.rank, self.pad_id, self.pack_to = examples, plan, rank, pad_id, pack_to

    def __len__(self) -> int:
        return self.plan.micro_batches_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, j = key
        idx, step_tokens = self.plan.items(epoch, self.rank, j)
        batch = collate([self.examples[i] for i in idx], self.pad_id, pack_to=self.pack_to)
        return {"batch": batch, "step_tokens": step_tokens, "epoch": epoch, "index": j}


class _EpochSampler(Sampler):
    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.skip = n, 0, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at each epoch start
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.skip = self.skip, 0
        return iter([(self.epoch, j) for j in range(start, self.n)])

    def __len__(self) -> int:
        return self.n


def _identity(x):
    return x


class ResumableLoader(DataLoader):
    """Yields {"batch": SpeedBatch, "step_tokens": int, ...}; stateful for Lightning."""

    def __init__(self, examples, plan: StepPlan, rank: int, pad_id: int, pack_to=None, num_workers=0):
        ds = _MicroBatches(examples, plan, rank, pad_id, pack_to)
        # Own generator: DataLoader draws a base seed from its generator at every iter(); from
        # the global one that would shift the torch RNG (dropout) by one draw on each resume.
        super().__init__(ds, batch_size=None, sampler=_EpochSampler(len(ds)), collate_fn=_identity,
                         num_workers=num_workers, generator=torch.Generator().manual_seed(plan.seed))  # fmt: skip
        self.consumed = 0  # micro-batches of the current epoch finished (counted by the module)
        self._epoch_of_count = 0

    def mark_consumed(self, epoch: int) -> None:
        """Called after each micro-batch is trained (before any checkpoint of that step)."""
        if epoch != self._epoch_of_count:
            self._epoch_of_count, self.consumed = epoch, 0
        self.consumed += 1

    def _shape(self) -> dict:
        p = self.dataset.plan
        return {"examples": len(p.num_supervised), "global_batch": p.global_batch, "micro_batch": p.micro_batch,
                "world_size": p.world_size, "seed": p.seed}  # fmt: skip

    def state_dict(self) -> dict:
        return {"epoch": self._epoch_of_count, "consumed": self.consumed, "plan": self._shape()}

    def load_state_dict(self, state: dict) -> None:
        """Lightning calls this on resume *before* it creates the iterator (FitLoop.setup_data),
        and that first iterator serves the resumed epoch: the sampler must already be on the saved
        epoch (Lightning's ``set_epoch`` comes only after), skipping what was consumed. A
        checkpoint taken at the end of an epoch resumes at the start of the next one."""
        saved = state.get("plan")
        if saved is not None and saved != self._shape():
            diff = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._shape().items() if saved.get(k) != v)
            raise ValueError(
                f"cannot resume: the checkpoint's data plan differs from this run's ({diff}). Resume with "
                "the same data, seed, global/micro batch size and number of ranks, or start afresh (resume=never)"
            )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self.sampler):
            epoch, consumed = epoch + 1, 0
        self._epoch_of_count, self.consumed = epoch, consumed
        self.sampler.epoch, self.sampler.skip = epoch, consumed
