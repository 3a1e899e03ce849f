"""SpeedBatch: right-padded or packed rows of role-labelled conversations, and the gather rows
(anchor + one assistant turn's decode tokens) that the upper layers run on.

The gather rows are index tensors built once per batch, with tensor operations, in ``collate``
(a data-loader worker): the executors, the FLOP model and the generation prefill read them
instead of rebuilding them every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .roles import ANCHOR, DECODE, IGNORE, PROMPT, EncodedExample
from .visibility import TokenMeta


@dataclass
class GatherRows:
    """Index of the upper-layer rows: row r, column c holds token (b[r, c], t[r, c])."""

    b: torch.Tensor
    t: torch.Tensor
    valid: torch.Tensor

    def meta(self, meta: TokenMeta) -> TokenMeta:
        """Roles, turns and positions of the gathered tokens; each row is one conversation (0),
        padding -1."""
        seq = torch.where(self.valid, 0, -1).to(meta.seq_ids.dtype)
        pos = None if meta.positions is None else meta.positions[self.b, self.t]
        return TokenMeta(meta.roles[self.b, self.t], meta.turns[self.b, self.t], seq, pos)

    def to(self, device) -> GatherRows:
        return GatherRows(self.b.to(device), self.t.to(device), self.valid.to(device))


def gather_rows(meta: TokenMeta, need: torch.Tensor | None = None) -> GatherRows:
    """One row per (batch row, conversation, assistant turn): its anchors, then that turn's
    decode tokens, in original order. With ``need`` ([B, T] bool) only turns with a needed token.

    Vectorised: every (turn, token) membership is a comparison of group keys, so the cost is a
    few tensor ops whatever the number of turns."""
    roles, turns, seqs = meta.roles, meta.turns, meta.seq_ids
    device = roles.device
    B, T = roles.shape
    real = seqs >= 0
    dec = (roles == DECODE) & real
    # one key per (row, conversation, turn); -1 outside decode tokens
    S = int(seqs.max().item()) + 1 if bool(real.any()) else 1
    J = int(turns.max().item()) + 1 if bool(dec.any()) else 1
    b_idx = torch.arange(B, device=device)[:, None].expand(B, T)
    key = torch.where(dec, (b_idx * S + seqs.clamp(min=0)) * J + turns.clamp(min=0), -1)
    if need is not None:
        wanted = torch.zeros(B * S * J + 1, dtype=torch.bool, device=device)
        wanted[key[need & dec]] = True
        key = torch.where(dec & wanted[key.clamp(min=0)], key, -1)
    groups = torch.unique(key[key >= 0])  # sorted: rows come out by (b, seq, turn)
    R = groups.numel()
    if R == 0:
        z = torch.zeros(0, 0, dtype=torch.long, device=device)
        return GatherRows(z, z, z.bool())
    g_b = groups // (S * J)
    g_s = (groups // J) % S
    anchor = (roles == ANCHOR) & real
    # member[r, t]: token t of row g_b[r] belongs to gather row r (an anchor of its conversation,
    # or a decode token of its turn); positions keep their order
    member = (anchor[g_b] & (seqs[g_b] == g_s[:, None])) | (key[g_b] == groups[:, None])
    lengths = member.sum(1)
    M = int(lengths.max())
    order = torch.argsort((~member).to(torch.int8), dim=1, stable=True)[:, :M]  # members first, in order
    valid = torch.arange(M, device=device)[None, :] < lengths[:, None]
    t = torch.where(valid, order, 0)
    return GatherRows(g_b[:, None].expand(R, M).clone(), t, valid)


@dataclass
class SpeedBatch:
    """[B, T] tensors. seq_ids numbers the conversations packed into a row (-1 = padding);
    position_ids restart at 0 for each conversation. ``rows``: the gather rows of the
    supervised turns (built by ``collate``)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    roles: torch.Tensor
    turns: torch.Tensor
    seq_ids: torch.Tensor
    labels: torch.Tensor
    rows: GatherRows | None = None

    @property
    def meta(self) -> TokenMeta:
        return TokenMeta(self.roles, self.turns, self.seq_ids, self.position_ids)

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.seq_ids >= 0).long()

    def targets(self) -> torch.Tensor:
        """Next-token targets: targets[b, t] = labels[b, t + 1]. The first token of every
        conversation is never supervised, so targets never cross a packing boundary."""
        tgt = torch.full_like(self.labels, IGNORE)
        tgt[:, :-1] = self.labels[:, 1:]
        return tgt

    def target_rows(self) -> GatherRows:
        """The gather rows of the turns that hold a supervised token (cached)."""
        if self.rows is None:
            self.rows = gather_rows(self.meta, need=self.targets() != IGNORE)
        return self.rows

    def to(self, device) -> SpeedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if value is not None:
                moved[name] = value.to(device)
        return SpeedBatch(**moved)

    def num_tokens(self) -> int:
        return int((self.seq_ids >= 0).sum())

    def padding_share(self) -> float:
        """Share of the [B, T] cells that hold no token."""
        return 1.0 - self.num_tokens() / max(1, self.seq_ids.numel())


def collate(
    rows: Sequence[EncodedExample | Sequence[EncodedExample]],
    pad_id: int,
    *,
    pack_to: int | None = None,
    pad_to_multiple_of: int | None = None,
    gather: bool = True,
) -> SpeedBatch:
    """One row per item: an example (right-padded), or a list of examples packed into one row
    (each its own conversation: positions restart, masks keep them apart). ``pack_to``: every
    row is padded to this length (and must fit it). ``gather``: also build the gather rows of
    the supervised turns."""
    if not rows:
        raise ValueError("cannot collate an empty list of examples")
    groups = [[r] if isinstance(r, EncodedExample) else list(r) for r in rows]
    lengths = [sum(len(ex) for ex in g) for g in groups]
    T = max(lengths)
    if pack_to is not None:
        if T > pack_to:
            raise ValueError(f"a row of {T} tokens does not fit a packed row of {pack_to}")
        T = pack_to
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(groups)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "position_ids": torch.zeros((B, T), dtype=torch.long),
        "roles": torch.full((B, T), PROMPT, dtype=torch.long),
        "turns": torch.full((B, T), -1, dtype=torch.long),
        "seq_ids": torch.full((B, T), -1, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE, dtype=torch.long),
    }
    for b, group in enumerate(groups):
        t = 0
        for s, ex in enumerate(group):
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
    batch = SpeedBatch(**out)
    if gather:
        batch.target_rows()
    return batch


def pack_first_fit(examples: Sequence[EncodedExample], capacity: int) -> list[list[EncodedExample]]:
    """Examples grouped into rows of at most ``capacity`` tokens, first fit, in order."""
    rows: list[list[EncodedExample]] = []
    fill: list[int] = []
    for ex in examples:
        if len(ex) > capacity:
            raise ValueError(f"example of {len(ex)} tokens does not fit a packed row of {capacity}")
        for i, used in enumerate(fill):
            if used + len(ex) <= capacity:
                rows[i].append(ex)
                fill[i] += len(ex)
                break
        else:
            rows.append([ex])
            fill.append(len(ex))
    return rows
