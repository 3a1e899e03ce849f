"""The SPEED visibility rule: the ONE place that says which key a query may attend to.

Every execution derives its masks from :func:`allowed` — dense boolean masks for sdpa, the
``mask_mod`` of a flex_attention BlockMask, the masks of the gather rows and of the
generation cache. Tokens are described by ``TokenMeta`` (role, assistant turn, conversation
id within the row, -1 = padding, and the RoPE position); the key/query order is the token index
within the row.

Sliding-window layers (Gemma-3) pass their ``window``: a key is then visible only when
``q_pos - k_pos < window``, measured on positions (what the stock model measures on cache
indices: the same distance within one conversation, and still right in gather rows and caches,
whose indices skip tokens). The window narrows the model's own pattern before SPEED narrows it
further, in every layer and for every role, the anchor included: SPEED only ever removes keys
from what the stock layer sees (docs/DESIGN.md, "Sliding windows").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import AttentionBackend, choice
from .roles import ANCHOR, DECODE, PROMPT


@dataclass
class TokenMeta:
    """Per-token description of a [B, T] batch row (all LongTensors of shape [B, T])."""

    roles: torch.Tensor
    turns: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor | None = None  # RoPE positions; needed by sliding-window layers only

    def index(self, b: torch.Tensor, t) -> TokenMeta:
        pos = None if self.positions is None else self.positions[b, t]
        return TokenMeta(self.roles[b, t], self.turns[b, t], self.seq_ids[b, t], pos)


def allowed(
    q_role,
    q_turn,
    q_seq,
    q_idx,
    k_role,
    k_turn,
    k_seq,
    k_idx,
    upper: bool,
    window: int | None = None,
    q_pos=None,
    k_pos=None,
):
    """May query q attend to key k? Elementwise; works on broadcast tensors and in flex mask_mod.

    Lower layers (l < K): ordinary causal attention within one conversation.
    Upper layers (l >= K): anchors see earlier anchors; a decode token of turn j sees anchors
    and the decode tokens of turn j up to itself; a prompt token (never read by a decode token
    in these layers) sees only itself. Padding sees only itself, so no softmax row is empty.
    A sliding-window layer (``window``) also hides every key at ``q_pos - k_pos >= window``, at
    every depth and for every role (an anchor that far back included), as the stock layer does.
    """
    same_conv = (q_seq == k_seq) & (q_seq >= 0)
    causal = same_conv & (k_idx <= q_idx)
    if window is not None:
        causal = causal & (q_pos - k_pos < window)
    self_only = q_idx == k_idx
    if not upper:
        return causal | self_only
    sees_anchor = (k_role == ANCHOR) & (q_role != PROMPT)
    same_turn_decode = (q_role == DECODE) & (k_role == DECODE) & (q_turn == k_turn)
    return (causal & (sees_anchor | same_turn_decode)) | self_only


def _positions(meta: TokenMeta, window: int | None) -> torch.Tensor | None:
    if window is not None and meta.positions is None:
        raise ValueError("a sliding-window mask needs the tokens' positions (TokenMeta.positions)")
    return meta.positions if window is not None else None


def dense_mask(meta: TokenMeta, upper: bool, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, T] boolean mask (True = attend) from :func:`allowed`."""
    idx = torch.arange(meta.roles.shape[1], device=meta.roles.device)
    q = dict(q_role=meta.roles[:, :, None], q_turn=meta.turns[:, :, None], q_seq=meta.seq_ids[:, :, None])
    k = dict(k_role=meta.roles[:, None, :], k_turn=meta.turns[:, None, :], k_seq=meta.seq_ids[:, None, :])
    pos = _positions(meta, window)
    win = {} if pos is None else dict(window=window, q_pos=pos[:, :, None], k_pos=pos[:, None, :])
    return allowed(**q, q_idx=idx[None, :, None], **k, k_idx=idx[None, None, :], upper=upper, **win)[:, None]


def flex_block_mask(meta: TokenMeta, upper: bool, window: int | None = None):
    """A flex_attention BlockMask whose mask_mod is :func:`allowed` (GPU path)."""
    from torch.nn.attention.flex_attention import create_block_mask

    roles, turns, seqs = meta.roles, meta.turns, meta.seq_ids
    pos = _positions(meta, window)

    def mask_mod(b, h, q_idx, kv_idx):
        win = {} if pos is None else dict(window=window, q_pos=pos[b, q_idx], k_pos=pos[b, kv_idx])
        return allowed(
            roles[b, q_idx],
            turns[b, q_idx],
            seqs[b, q_idx],
            q_idx,
            roles[b, kv_idx],
            turns[b, kv_idx],
            seqs[b, kv_idx],
            kv_idx,
            upper,
            **win,
        )

    B, T = roles.shape
    return create_block_mask(mask_mod, B, None, T, T, device=roles.device)


def is_plain_causal(meta: TokenMeta, upper: bool, window: int | None = None) -> bool:
    """True when :func:`allowed` reduces to the plain causal mask for every *real* query.

    That holds when each row is one right-padded conversation and, for upper layers, holds
    only anchors followed by decode tokens of a single turn (a gather row), and no two tokens are
    a window apart. Then the mask can be dropped and sdpa/flash run their fast causal kernels.
    Queries at padding differ (they see earlier tokens instead of only themselves), but nothing
    reads them.
    """
    real = meta.seq_ids >= 0
    pos = _positions(meta, window)
    if pos is not None and bool((pos[real] >= window).any()):  # positions start at 0: a distance >= window
        return False
    if bool((meta.seq_ids > 0).any()):  # packed rows: needs a block-diagonal mask
        return False
    if bool((real[:, 1:] & ~real[:, :-1]).any()):  # a real token after padding
        return False
    if not upper:
        return True
    roles = meta.roles.masked_fill(~real, ANCHOR)
    if bool((roles == PROMPT).any()):
        return False
    # anchors must precede all decode tokens, and decode tokens share one turn per row
    dec = (roles == DECODE) & real
    anchor_after_decode = (roles == ANCHOR) & real & (torch.cumsum(dec.long(), 1) > 0)
    if bool(anchor_after_decode.any()):
        return False
    turns = meta.turns.masked_fill(~dec, -1)
    first = torch.where(dec.any(1), turns.max(1).values, torch.full_like(turns[:, 0], -1))
    return not bool((dec & (turns != first[:, None])).any())


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as sdpa's additive form: 0 where attending, -inf elsewhere (what sdpa itself
    converts a boolean mask to, so the attention is unchanged bit for bit)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def build_mask(
    meta: TokenMeta,
    upper: bool,
    backend: str = "sdpa",
    window: int | None = None,
    dtype: torch.dtype | None = None,
):
    """The mask an attention layer needs: None (plain causal), dense, or a BlockMask.

    ``dtype``: give the dense mask in sdpa's additive form in that dtype (the attention's compute
    dtype) rather than as booleans. Where one mask serves many layers under autograd, this is what
    keeps its memory at one [B, 1, T, T] tensor: sdpa converts a boolean mask to a new float tensor
    at every call and each layer's backward keeps its own copy (O(layers x T^2)); an additive mask
    of the query's dtype passes through unconverted, so every layer saves the same tensor."""
    backend = choice(AttentionBackend, backend, "attention backend")
    if is_plain_causal(meta, upper, window):
        return None
    if backend == AttentionBackend.flex:
        return flex_block_mask(meta, upper, window)
    mask = dense_mask(meta, upper, window)
    return mask if dtype is None else additive_mask(mask, dtype)


def layer_masks(
    meta: TokenMeta,
    layers: range,
    k: int,
    windows: list,
    backend: str = "sdpa",
    dtype: torch.dtype | None = None,
) -> dict[int, object]:
    """The mask of each layer in ``layers``: lower (< k) or upper, with that layer's window
    (``windows[i]``, None = full attention); one mask per distinct (depth, window), shared by
    its layers (never one per layer: see ``build_mask``'s ``dtype``)."""
    built: dict[tuple[bool, int | None], object] = {}
    out = {}
    for i in layers:
        key = (i >= k, windows[i])
        if key not in built:
            built[key] = build_mask(meta, upper=key[0], backend=backend, window=key[1], dtype=dtype)
        out[i] = built[key]
    return out
