"""FLOP model of a training step, per execution, from a batch's token roles.

Forward FLOPs of one decoder layer over n tokens of one conversation (one row of the
attention): 2 * n * P_layer (matmuls with the layer's weights) + 4 * d_attn * pairs (QK^T and
PV over the causal pairs: n(n+1)/2, or fewer in a sliding-window layer, where a query has at
most ``window`` keys; the gather rows' upper layers are charged their causal pairs). The LM head costs 2 * hidden * vocab per token where logits are
computed. A training step is 3x forward (backward = 2x forward). Attention FLOPs count
per-conversation pairs, so packed rows are not charged for cross-conversation pairs.

- ``full_hf``: plain HF causal LM: all layers over every token, logits at every token.
- ``mask``:   same layer work as full depth (masks skip nothing), logits at targets only.
- ``gather``: layers < K over every token; layers >= K over anchor + decode rows; logits at
              targets only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .adapters import layer_windows
from .batch import SpeedBatch
from .roles import IGNORE


@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    windows: tuple = ()  # per layer: sliding window or None (empty: full attention everywhere)

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        windows = tuple(layer_windows(cfg))
        return cls(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            head_dim,
            cfg.intermediate_size,
            cfg.vocab_size,
            windows if any(w is not None for w in windows) else (),
        )

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate

    def layer_fwd(self, lengths: list[int], window: int | None = None) -> float:
        d_attn = self.heads * self.head_dim
        return sum(2 * n * self.layer_params + 4 * d_attn * _pairs(n, window) for n in lengths)

    def layers_fwd(self, lengths: list[int], layers: range) -> float:
        """Forward FLOPs of ``layers`` over conversations of ``lengths`` (each layer's window)."""
        return sum(self.layer_fwd(lengths, self.window(i)) for i in layers)

    def head_fwd(self, n_tokens: int) -> float:
        return 2 * self.hidden * self.vocab * n_tokens


def _pairs(n: int, window: int | None) -> float:
    """Causal query-key pairs of n tokens; with a window a query has at most ``window`` keys."""
    if window is None or n <= window:
        return n * (n + 1) / 2
    return window * (window + 1) / 2 + (n - window) * window


def _conversation_lengths(batch: SpeedBatch) -> list[int]:
    seqs = batch.seq_ids.cpu()
    return [int((seqs[b] == s).sum()) for b in range(seqs.shape[0]) for s in seqs[b][seqs[b] >= 0].unique()]


def step_flops(shape: ModelShape, batch: SpeedBatch, k: int, execution: str) -> float:
    """Predicted FLOPs of one forward+backward step of ``execution`` on ``batch``."""
    lengths = _conversation_lengths(batch)
    n_tokens = sum(lengths)
    n_targets = int((batch.targets() != IGNORE).sum())
    every = range(shape.layers)
    if execution == "full_hf":
        fwd = shape.layers_fwd(lengths, every) + shape.head_fwd(n_tokens)
    elif execution == "mask":
        fwd = shape.layers_fwd(lengths, every) + shape.head_fwd(n_targets)
    elif execution == "gather":
        row_lengths = batch.target_rows().valid.sum(1).tolist()
        lower_layers = min(k, shape.layers)
        upper = (shape.layers - lower_layers) * shape.layer_fwd(row_lengths)
        fwd = shape.layers_fwd(lengths, range(lower_layers)) + upper
        fwd += shape.head_fwd(n_targets)
    else:
        raise ValueError(f"unknown execution {execution!r}: full_hf, mask or gather")
    return 3.0 * fwd


def flop_ratio(
    shape: ModelShape, batch: SpeedBatch, k: int, execution: str = "gather", baseline: str = "full_hf"
) -> float:
    """Predicted step-FLOP ratio of a SPEED execution to a baseline on the same batch.

    The default baseline "full_hf" is a standard Full-IT step (LM head at every token), so the
    ratio includes the saving of computing logits only at targets. For SPEED's own saving, pass
    ``baseline="gather"`` (K = L through the same path: head at targets only).
    """
    return step_flops(shape, batch, k, execution) / step_flops(shape, batch, shape.layers, baseline)


def kv_bytes_formula(
    shape: ModelShape, k: int, n_prompt: int, n_kept: int, batch: int, dtype_bytes: int
) -> int:
    """Active KV of one prompt: all n_prompt tokens in K layers, only anchor + decode (n_kept)
    in the L - K upper layers."""
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * dtype_bytes
    return batch * per_token_layer * (k * n_prompt + (shape.layers - k) * n_kept)


def prefill_flops(shape: ModelShape, k: int, n: int, n_kept: int, batch: int) -> float:
    upper = (shape.layers - k) * shape.layer_fwd([n_kept])
    return batch * (shape.layers_fwd([n], range(k)) + upper + shape.head_fwd(1))
