"""SpeedBatch: right-padded or packed rows of role-labelled conversations."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .roles import IGNORE, PROMPT, EncodedExample
from .visibility import TokenMeta


@dataclass
class SpeedBatch:
    """[B, T] tensors. seq_ids numbers the conversations packed into a row (-1 = padding);
    position_ids restart at 0 for each conversation."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    roles: torch.Tensor
    turns: torch.Tensor
    seq_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def meta(self) -> TokenMeta:
        return TokenMeta(self.roles, self.turns, self.seq_ids)

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.seq_ids >= 0).long()

    def targets(self) -> torch.Tensor:
        """Next-token targets: targets[b, t] = labels[b, t + 1]. The first token of every
        conversation is never supervised, so targets never cross a packing boundary."""
        tgt = torch.full_like(self.labels, IGNORE)
        tgt[:, :-1] = self.labels[:, 1:]
        return tgt

    def to(self, device) -> SpeedBatch:
        return SpeedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def num_tokens(self) -> int:
        return int((self.seq_ids >= 0).sum())


def _rows(examples: list[EncodedExample], pack_to: int | None) -> list[list[EncodedExample]]:
    if pack_to is None:
        return [[ex] for ex in examples]
    rows: list[list[EncodedExample]] = []
    fill: list[int] = []
    for ex in examples:  # first fit, in order: deterministic and keeps neighbours together
        if len(ex) > pack_to:
            raise ValueError(f"example of {len(ex)} tokens does not fit a packed row of {pack_to}")
        for i, used in enumerate(fill):
            if used + len(ex) <= pack_to:
                rows[i].append(ex)
                fill[i] += len(ex)
                break
        else:
            rows.append([ex])
            fill.append(len(ex))
    return rows


def collate(
    examples: list[EncodedExample],
    pad_id: int,
    *,
    pack_to: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> SpeedBatch:
    """Right-pad one conversation per row, or pack several per row (``pack_to`` tokens)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    rows = _rows(examples, pack_to)
    T = max(sum(len(ex) for ex in row) for row in rows)
    if pack_to is not None:
        T = pack_to
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "position_ids": torch.zeros((B, T), dtype=torch.long),
        "roles": torch.full((B, T), PROMPT, dtype=torch.long),
        "turns": torch.full((B, T), -1, dtype=torch.long),
        "seq_ids": torch.full((B, T), -1, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE, dtype=torch.long),
    }
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row):
            n = len(ex)
            sl = slice(t, t + n)
            out["input_ids"][b, sl] = torch.tensor(ex.input_ids)
            out["position_ids"][b, sl] = torch.arange(n)
            out["roles"][b, sl] = torch.tensor(ex.roles)
            out["turns"][b, sl] = torch.tensor(ex.turns)
            out["seq_ids"][b, sl] = s
            out["labels"][b, sl] = torch.tensor(ex.labels)
            out["labels"][b, t] = IGNORE  # never predict a conversation's first token
            t += n
    return SpeedBatch(**out)
