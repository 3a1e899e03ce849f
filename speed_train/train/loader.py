"""Deterministic optimizer-step plan and a resumable train loader.

The unit of a batch is a *row*: one conversation, or with ``data.pack=true`` several
conversations packed into one row of up to ``max_length`` tokens (each conversation still sees
only itself: per-conversation positions and masks, exact; tests/test_train.py checks packed ==
unpacked losses). Packing is done once, over the whole dataset (best fit over a seeded shuffle),
so a step never depends on how it is split into ranks and micro-batches.

Why a plan: the loss of an optimizer step is (sum of token losses) / (its normaliser: the
supervised tokens of the whole step, all micro-batches, all ranks, for ``reduce=mean``; its
conversations for ``reduce=sum``). The plan fixes which rows form each global step,
independently of how the step is split into ranks x accumulation x micro-batches, so every
micro-batch carries its step's normaliser without a collective, and a run with GA=4 x micro 1
sees exactly the batches of a run with 2 ranks x GA=2.

Why a custom loader: Lightning saves and restores any train dataloader with
``state_dict``/``load_state_dict``; ours records (epoch, micro-batches consumed) and skips them
on resume, so mid-epoch resume continues on the very next batch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from speed_train.speed.batch import collate
from speed_train.train.checkpointing import ResumeError


def pack_rows(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``capacity`` tokens: a seeded shuffle, then
    best fit (each example goes to the fullest row it fits in). Deterministic; O(n log capacity)."""
    order = list(range(len(lengths)))
    random.Random(f"pack:{seed}").shuffle(order)
    rows: list[list[int]] = []
    tree = _FreeTree(capacity)  # rows by free space
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens > the packed row length {capacity}")
        r = tree.pop_smallest_at_least(n)
        if r is None:
            rows.append([i])
            r, free = len(rows) - 1, capacity - n
        else:
            rows[r].append(i)
            free = tree.last_free - n
        if free > 0:
            tree.push(free, r)
    return rows


class _FreeTree:
    """Rows by free space, for best fit: a max-segment-tree over free-space values 1..capacity,
    each leaf holding a stack of rows with exactly that much free space."""

    def __init__(self, capacity: int) -> None:
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)
        self.rows: dict[int, list[int]] = {}
        self.last_free = 0

    def push(self, free: int, row: int) -> None:
        self.rows.setdefault(free, []).append(row)
        i = free + self.size
        while i:
            self.count[i] += 1
            i //= 2

    def pop_smallest_at_least(self, n: int) -> int | None:
        # smallest free value >= n with a row: walk the tree
        i, lo, hi = 1, 0, self.size - 1
        if self._count_range(n, self.size - 1) == 0:
            return None
        while i < self.size:
            mid = (lo + hi) // 2
            left = 2 * i
            if n <= mid and self._count_range(max(n, lo), mid) > 0:
                i, hi = left, mid
            else:
                i, lo = left + 1, mid + 1
        free = i - self.size
        row = self.rows[free].pop()
        j = i
        while j:
            self.count[j] -= 1
            j //= 2
        self.last_free = free
        return row

    def _count_range(self, a: int, b: int) -> int:
        res, a, b = 0, a + self.size, b + self.size + 1
        while a < b:
            if a & 1:
                res += self.count[a]
                a += 1
            if b & 1:
                b -= 1
                res += self.count[b]
            a //= 2
            b //= 2
        return res


@dataclass
class StepPlan:
    """Which example rows form each micro-batch of each optimizer step.

    ``num_supervised``: supervised tokens per example. ``rows``: example indices per row
    (None: one example per row). ``global_batch`` and ``micro_batch`` count rows.
    ``reduce``: ``mean`` (normalise by the step's supervised tokens) or ``sum`` (by its
    conversations)."""

    num_supervised: list[int]
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int
    rows: list[list[int]] | None = None
    reduce: str = "mean"
    _row_tokens: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        per_step = self.micro_batch * self.world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch} x "
                f"{self.world_size} ranks; choose a global batch that is a multiple of {per_step}"
            )
        self._row_tokens = (
            list(self.num_supervised)
            if self.rows is None
            else [sum(self.num_supervised[i] for i in r) for r in self.rows]
        )
        if self.steps_per_epoch == 0:
            what = "packed rows" if self.rows is not None else "training examples"
            raise ValueError(
                f"only {self.num_rows} {what}: fewer than one global batch ({self.global_batch}); "
                "lower trainer.global_batch_size or add data"
            )

    @property
    def num_rows(self) -> int:
        return len(self._row_tokens)

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch  # the remainder is dropped

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def row_examples(self, row: int) -> list[int]:
        return [row] if self.rows is None else self.rows[row]

    def items(self, epoch: int, rank: int, j: int) -> tuple[list[int], int]:
        """Row indices of this rank's j-th micro-batch in ``epoch``, and its step's normaliser."""
        perm = self._perm(epoch)
        step, m = divmod(j, self.accumulation)
        step_rows = perm[step * self.global_batch : (step + 1) * self.global_batch]
        start = (rank * self.accumulation + m) * self.micro_batch
        if self.reduce == "sum":
            norm = sum(len(self.row_examples(r)) for r in step_rows)
        else:
            norm = sum(self._row_tokens[r] for r in step_rows)
        return step_rows[start : start + self.micro_batch], norm

    def step_examples(self, step: int) -> list[int]:
        """The example indices of optimizer step ``step`` (counted over epochs), row by row:
        the same whatever the split into ranks, accumulation and micro-batches."""
        epoch, s = divmod(step, self.steps_per_epoch)
        rows = self._perm(epoch)[s * self.global_batch : (s + 1) * self.global_batch]
        return [e for r in rows for e in self.row_examples(r)]

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def shape(self) -> dict:
        """What a checkpoint's plan must match to resume."""
        return {
            "examples": len(self.num_supervised),
            "rows": self.num_rows,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
            "seed": self.seed,
            "reduce": self.reduce,
        }


class _MicroBatches(Dataset):
    def __init__(self, examples, plan: StepPlan, rank: int, pad_id: int, pack_to: int | None) -> None:
        self.examples, self.plan, self.rank, self.pad_id, self.pack_to = examples, plan, rank, pad_id, pack_to

    def __len__(self) -> int:
        return self.plan.micro_batches_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, j = key
        rows, norm = self.plan.items(epoch, self.rank, j)
        grouped = [[self.examples[i] for i in self.plan.row_examples(r)] for r in rows]
        batch = collate(grouped, self.pad_id, pack_to=self.pack_to)
        return {"batch": batch, "step_norm": norm, "epoch": epoch, "index": j}


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
    """Yields {"batch": SpeedBatch, "step_norm": int, ...}; stateful for Lightning."""

    def __init__(self, examples, plan: StepPlan, rank: int, pad_id: int, pack_to=None, num_workers=0):
        ds = _MicroBatches(examples, plan, rank, pad_id, pack_to)
        # Own generator: DataLoader draws a base seed from its generator at every iter(); from
        # the global one that would shift the torch RNG (dropout) by one draw on each resume.
        super().__init__(
            ds,
            batch_size=None,
            sampler=_EpochSampler(len(ds)),
            collate_fn=_identity,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(plan.seed),
        )
        self.consumed = 0  # micro-batches of the current epoch finished (counted by the module)
        self._epoch_of_count = 0

    def mark_consumed(self, epoch: int) -> None:
        """Called after each micro-batch is trained (before any checkpoint of that step)."""
        if epoch != self._epoch_of_count:
            self._epoch_of_count, self.consumed = epoch, 0
        self.consumed += 1

    def state_dict(self) -> dict:
        return {"epoch": self._epoch_of_count, "consumed": self.consumed, "plan": self.dataset.plan.shape()}

    def load_state_dict(self, state: dict) -> None:
        """Lightning calls this on resume *before* it creates the iterator (FitLoop.setup_data),
        and that first iterator serves the resumed epoch: the sampler must already be on the saved
        epoch (Lightning's ``set_epoch`` comes only after), skipping what was consumed. A
        checkpoint taken at the end of an epoch resumes at the start of the next one."""
        saved, mine = state.get("plan"), self.dataset.plan.shape()
        if saved is not None and {k: saved.get(k, mine[k]) for k in mine} != mine:
            diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in mine.items() if saved.get(k, v) != v)
            raise ResumeError(
                f"cannot resume: the checkpoint's data plan differs from this run's ({diff}). Resume with "
                "the same data, seed, global/micro batch size and number of ranks, or start afresh (resume=never)"
            )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self.sampler):
            epoch, consumed = epoch + 1, 0
        self._epoch_of_count, self.consumed = epoch, consumed
        self.sampler.epoch, self.sampler.skip = epoch, consumed


def data_fingerprint(examples, plan: StepPlan, steps: int, max_examples: int = 20_000) -> str:
    """sha256 of what a run trains on, in order: every step's example indices, and the token ids
    of the first ``max_examples`` examples consumed. Roles, labels and SPEED settings are not
    hashed: arms of a study (Full-IT, SPEED-K, SPEED-K+BoS) with the same seed must agree."""
    h = hashlib.sha256()
    n = 0
    for step in range(steps):
        h.update(f"step {step}:".encode())
        for e in plan.step_examples(step):
            h.update(f"{e},".encode())
            if n < max_examples:
                h.update(b"ids:" + ",".join(map(str, examples[e].input_ids)).encode())
                n += 1
    return h.hexdigest()


def examples_fingerprint(examples) -> str:
    """sha256 of the token ids of ``examples`` (e.g. a held-out set), in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(",".join(map(str, ex.input_ids)).encode() + b";")
    return h.hexdigest()
