"""Execution 3: shallow prefill, deep decode, with a preallocated two-depth KV cache.

Prefill: every prompt token runs through layers < K; only the anchor(s) and the assistant
header (the decode-phase tokens of the prompt) continue through layers >= K. Decode: each new
token runs through all layers. So the cache of a lower layer holds the whole sequence and
the cache of an upper layer holds anchor + decode tokens only.

The cache is preallocated ([B, H_kv, capacity, D] per layer, written in place): no
per-step concatenation, so it is also the long-context timing path. A slot that holds padding
is masked out by a per-depth ``valid`` map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import ModelParts, enable_speed_attention
from .batch import collate
from .executors import gather_rows, resolve_k
from .roles import DECODE, EncodedExample
from .visibility import TokenMeta, build_mask


class SpeedCache:
    """Preallocated KV cache with two depths: layers < k ("lower") and layers >= k ("upper").

    Duck-types the part of transformers' ``Cache`` that attention layers call (``update``).
    Tokens of one step are written at ``[pos, pos + n)`` of their depth; ``advance`` moves on.
    """

    def __init__(self, parts: ModelParts, k: int, batch: int, lower_capacity: int, upper_capacity: int,
                 dtype: torch.dtype, device) -> None:  # fmt: skip
        cfg = parts.config
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.k = k
        self.num_layers = parts.num_layers
        cap = [lower_capacity if i < k else upper_capacity for i in range(self.num_layers)]
        self.keys = [torch.zeros(batch, heads, c, head_dim, dtype=dtype, device=device) for c in cap]
        self.values = [torch.zeros_like(t) for t in self.keys]
        self.valid = {
            "lower": torch.zeros(batch, lower_capacity, dtype=torch.bool, device=device),
            "upper": torch.zeros(batch, upper_capacity, dtype=torch.bool, device=device),
        }
        self.pos = {"lower": 0, "upper": 0}
        self.step_len = {"lower": 0, "upper": 0}

    def depth(self, layer_idx: int) -> str:
        return "upper" if layer_idx >= self.k else "lower"

    def begin(self, depth: str, valid: torch.Tensor) -> None:
        """Announce the next step's tokens ([B, n] validity) for every layer of one depth."""
        p, n = self.pos[depth], valid.shape[1]
        if p + n > self.valid[depth].shape[1]:
            raise RuntimeError(f"SpeedCache {depth} capacity {self.valid[depth].shape[1]} exceeded")
        self.valid[depth][:, p : p + n] = valid
        self.step_len[depth] = n

    def advance(self, depth: str) -> None:
        self.pos[depth] += self.step_len[depth]
        self.step_len[depth] = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        d = self.depth(layer_idx)
        p, n = self.pos[d], key_states.shape[2]
        self.keys[layer_idx][:, :, p : p + n] = key_states
        self.values[layer_idx][:, :, p : p + n] = value_states
        return self.keys[layer_idx][:, :, : p + n], self.values[layer_idx][:, :, : p + n]

    def step_mask(self, depth: str) -> torch.Tensor:
        """[B, 1, 1, S] mask of a one-token decode step: every valid cached slot."""
        return self.valid[depth][:, None, None, : self.pos[depth] + self.step_len[depth]]

    # -- accounting ---------------------------------------------------------------------
    def _slot_bytes(self, layer_idx: int) -> int:
        k = self.keys[layer_idx]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()  # K and V, per token per row

    def allocated_bytes_per_layer(self) -> list[int]:
        return [2 * k.numel() * k.element_size() for k in self.keys]

    def active_bytes_per_layer(self) -> list[int]:
        """Bytes of K/V held for real tokens (padding and unwritten slots excluded)."""
        return [
            int(self.valid[self.depth(i)][:, : self.pos[self.depth(i)]].sum()) * self._slot_bytes(i)
            for i in range(self.num_layers)
        ]


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated tokens per prompt (stop token included when hit)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per step, if kept
    cache: SpeedCache | None = None


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
            top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def speed_generate(
    model,
    prompts: list[EncodedExample],
    k,
    *,
    max_new_tokens: int = 64,
    stop_token_ids: list[int] | None = None,
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    keep_logits: bool = False,
) -> GenerationOutput:
    """Generate a continuation for each prompt (roles from the core: the assistant header is
    decode-phase and must end the prompt). Prompts may differ in length."""
    parts = enable_speed_attention(model)
    K = resolve_k(parts, k)
    L = parts.num_layers
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if not p.roles or p.roles[-1] != DECODE:
            raise ValueError(
                f"prompt {i} does not end with a decode-phase token (the assistant header or answer "
                "cue); encode it with the core's generation-prompt encoder"
            )
    device = parts.embed.weight.device
    batch = collate(prompts, pad_token_id).to(device)
    B, T = batch.input_ids.shape
    lengths = batch.attention_mask.sum(1)
    parts.check_length(int(lengths.max()) + max_new_tokens)
    turn = torch.tensor([p.turns[-1] for p in prompts], device=device)
    dtype = parts.embed.weight.dtype

    # -- prefill, lower layers: the whole prompt -------------------------------------------
    meta = batch.meta
    # earlier assistant turns are history (prompt) for this turn: only the last turn's header
    # goes up, with the anchors
    this_turn = (meta.roles == DECODE) & (meta.turns == turn[:, None])
    rows = gather_rows(meta, need=this_turn) if K < L else None
    upper_len = rows.t.shape[1] if rows is not None else 0
    cache = SpeedCache(parts, K, B, T + max_new_tokens, upper_len + max_new_tokens, dtype, device)
    cache.begin("lower", batch.seq_ids >= 0)
    hidden = parts.embed(batch.input_ids)
    pe = parts.rope(hidden, batch.position_ids)
    mask = build_mask(meta, upper=False)
    for layer in parts.layers[:K]:
        hidden = layer(hidden, attention_mask=mask, position_ids=batch.position_ids, cache=cache,
                       use_cache=True, position_embeddings=pe)  # fmt: skip
    cache.advance("lower")
    last = lengths - 1
    if rows is None:
        last_hidden = hidden[torch.arange(B, device=device), last]
    else:
        # -- prefill, upper layers: anchor + header only, at their original positions ----------
        rb, rt, valid = rows.b, rows.t, rows.valid
        row_meta = TokenMeta(meta.roles[rb, rt], meta.turns[rb, rt], torch.where(valid, 0, -1))
        cache.begin("upper", valid)
        h, pos = hidden[rb, rt], batch.position_ids[rb, rt]
        pe = parts.rope(h, pos)
        mask = build_mask(row_meta, upper=True)
        for layer in parts.layers[K:]:
            h = layer(h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                      position_embeddings=pe)  # fmt: skip
        cache.advance("upper")
        last_hidden = h[torch.arange(B, device=device), valid.sum(1) - 1]
    logits = parts.lm_head(parts.norm(last_hidden))

    # -- decode: one token per step through all layers ---------------------------------------
    stops = torch.tensor(sorted(set(stop_token_ids or [])), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    step_logits: list[torch.Tensor] = []
    next_pos = lengths.clone()
    for step in range(max_new_tokens):
        if keep_logits:
            step_logits.append(logits.float().cpu())
        tok = _sample(logits, do_sample, temperature, top_k, top_p, generator)
        for b in (~done).nonzero().flatten().tolist():
            out[b].append(int(tok[b]))
        done |= torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        h = parts.embed(tok[:, None])
        pos = next_pos[:, None]
        pe = parts.rope(h, pos)
        alive = ~done[:, None]
        for depth in ("lower", "upper"):
            cache.begin(depth, alive)
        for i, layer in enumerate(parts.layers):
            h = layer(h, attention_mask=cache.step_mask(cache.depth(i)), position_ids=pos, cache=cache,
                      use_cache=True, position_embeddings=pe)  # fmt: skip
        for depth in ("lower", "upper"):
            cache.advance(depth)
        next_pos += 1
        logits = parts.lm_head(parts.norm(h[:, -1]))
    return GenerationOutput(out, step_logits, cache)
