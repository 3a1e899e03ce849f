"""Two teacher-forced executions of SPEED-K that give the same decode-token logits.

- mask:   one HF forward over the full sequence; layers < K get the lower mask, layers >= K
          the upper mask (both from visibility.allowed), via the registered attention function.
- gather: layers < K over the full sequence; then one row per (conversation, assistant turn)
          holding the anchor(s) + that turn's decode tokens at their original positions; layers
          >= K run on those rows only. Upper layers never touch a prompt token. Default for
          training.

Both apply the final norm and LM head only at the positions asked for (decode tokens, or just
the supervised ones), never over the whole [B, T, V].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapters import LayerMasks, ModelParts, enable_speed_attention
from .batch import SpeedBatch, gather_rows
from .config import Executor, SpeedConfig, SpeedConfigError, choice
from .roles import DECODE, IGNORE
from .visibility import layer_masks

EXECUTORS = Executor.values()


@dataclass
class SpeedOutput:
    """Logits at selected positions: ``logits[i]`` is for token (``batch_idx[i]``, ``pos_idx[i]``)."""

    logits: torch.Tensor
    batch_idx: torch.Tensor
    pos_idx: torch.Tensor

    def dense(self, shape: tuple[int, int]) -> torch.Tensor:
        """Scatter into a zero [B, T, V] tensor (for comparisons and tests)."""
        out = self.logits.new_zeros(*shape, self.logits.shape[-1])
        out[self.batch_idx, self.pos_idx] = self.logits
        return out


def check_k(parts: ModelParts, k: int) -> int:
    """The cutoff an execution runs at: a layer count in 1..L. Resolve a fraction or full depth
    once, where the model is known (``SpeedConfig.resolve_k``), and pass the int."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise SpeedConfigError(
            f"k={k!r}: SPEED executions take a layer count; resolve a fraction or None (full depth) "
            "first with SpeedConfig(k=...).resolve_k(num_layers)"
        )
    return SpeedConfig(k=k).resolve_k(parts.num_layers)


def _wanted(batch: SpeedBatch, positions: str) -> torch.Tensor:
    if positions == "decode":
        return (batch.roles == DECODE) & (batch.seq_ids >= 0)
    if positions == "targets":
        return batch.targets() != IGNORE
    if positions == "all":
        return batch.seq_ids >= 0
    raise ValueError(f"positions must be 'decode', 'targets' or 'all', got {positions!r}")


def _prepare(model, batch: SpeedBatch, k) -> tuple[ModelParts, int]:
    parts = enable_speed_attention(model)
    parts.check_length(batch.input_ids.shape[1])
    return parts, check_k(parts, k)


def attention_dtype(parts: ModelParts) -> torch.dtype:
    """The dtype the attention computes in: autocast's where autocast is on, else the weights'.
    Dense masks are built in it once per forward (``build_mask(dtype=...)``), so that no layer
    converts (and, under autograd, keeps) a copy of its own."""
    device = parts.embed.weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return parts.embed.weight.dtype


def mask_forward(
    model, batch: SpeedBatch, k: int, *, positions: str = "decode", backend: str = "sdpa"
) -> SpeedOutput:
    """Execution 1: a single forward with layer-dependent masks through the HF model."""
    parts, K = _prepare(model, batch, k)
    masks = LayerMasks(
        layer_masks(batch.meta, range(parts.num_layers), K, parts.windows, backend, attention_dtype(parts))
    )
    hidden = parts.decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,  # ignored by our masks; stops HF's own packed-row guessing
        position_ids=batch.position_ids,
        speed_masks=masks,
        use_cache=False,
    ).last_hidden_state
    b, t = _wanted(batch, positions).nonzero(as_tuple=True)
    return SpeedOutput(parts.logits(hidden[b, t], normed=True), b, t)


def run_layers(parts: ModelParts, layers: range, hidden, position_ids, masks, **layer_kwargs):
    """Run HF decoder layers ``layers`` (indices) over ``hidden`` at ``position_ids``, layer i
    with ``masks[i]``; each RoPE table (one per attention type on Gemma-3) computed once."""
    pos_emb: dict = {}
    for i in layers:
        kind = parts.rope_kind(i)
        if kind not in pos_emb:
            pos_emb[kind] = parts.rope(hidden, position_ids, kind)
        hidden = parts.layers[i](
            hidden,
            attention_mask=masks[i],
            position_ids=position_ids,
            position_embeddings=pos_emb[kind],
            **layer_kwargs,
        )
    return hidden


def gather_forward(
    model, batch: SpeedBatch, k: int, *, positions: str = "decode", backend: str = "sdpa"
) -> SpeedOutput:
    """Execution 2: lower layers over everything, upper layers over anchor + decode rows."""
    parts, K = _prepare(model, batch, k)
    meta = batch.meta
    L = parts.num_layers
    wanted = _wanted(batch, positions)
    hidden = parts.embed(batch.input_ids)
    dtype = attention_dtype(parts)
    lower = layer_masks(meta, range(K), K, parts.windows, backend, dtype)
    hidden = run_layers(parts, range(K), hidden, batch.position_ids, lower)
    if K == L:
        b, t = wanted.nonzero(as_tuple=True)
        return SpeedOutput(parts.logits(hidden[b, t]), b, t)

    rows = batch.target_rows() if positions == "targets" else gather_rows(meta, need=wanted)
    rb, rt, valid = rows.b, rows.t, rows.valid
    upper = layer_masks(rows.meta(meta), range(K, L), K, parts.windows, backend, dtype)
    row_hidden = run_layers(parts, range(K, L), hidden[rb, rt], batch.position_ids[rb, rt], upper)
    # an anchor appears in several rows; keep only the wanted (decode) cells
    sel = valid & wanted[rb, rt]
    r, c = sel.nonzero(as_tuple=True)
    return SpeedOutput(parts.logits(row_hidden[r, c]), rb[r, c], rt[r, c])


def speed_forward(model, batch: SpeedBatch, k: int, *, executor: str = "gather", **kw) -> SpeedOutput:
    run = gather_forward if choice(Executor, executor, "executor") == Executor.gather else mask_forward
    return run(model, batch, k, **kw)


@dataclass
class SpeedLoss:
    """Summed token cross-entropy and the supervised-token count it sums over. Normalise by
    the count of the whole optimizer step (all micro-batches, all ranks), not per batch."""

    loss_sum: torch.Tensor
    num_tokens: int

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum / max(self.num_tokens, 1)


def speed_loss(
    model, batch: SpeedBatch, k: int, *, executor: str = "gather", backend: str = "sdpa"
) -> SpeedLoss:
    out = speed_forward(model, batch, k, executor=executor, positions="targets", backend=backend)
    targets = batch.targets()[out.batch_idx, out.pos_idx]
    loss = F.cross_entropy(out.logits.float(), targets, reduction="sum")
    return SpeedLoss(loss, int(targets.numel()))
