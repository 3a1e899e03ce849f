"""Execution 3: shallow prefill, deep decode, with a preallocated two-depth KV cache.

Prefill: every prompt token runs through layers < K; only the anchor(s) and the assistant
header (the decode-phase tokens of the prompt) continue through layers >= K. Decode: each new
token runs through all layers. So the cache of a lower layer holds the whole sequence and
the cache of an upper layer holds anchor + decode tokens only.

The cache is preallocated ([B, H_kv, capacity, D] per layer, written in place): no
per-step concatenation, so it is also the long-context timing path. A slot that holds padding
is masked out by a per-depth ``valid`` map. Sliding-window layers (Gemma-3) keep every slot too
and mask those a window back (the slots record positions): exact, not the smallest cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import ModelParts, enable_speed_attention
from .batch import SpeedBatch, collate, gather_rows
from .executors import check_k, run_layers
from .roles import DECODE, EncodedExample
from .visibility import TokenMeta, allowed, layer_masks


class SpeedCache:
    """Preallocated KV cache with two depths: layers < k ("lower") and layers >= k ("upper").

    Duck-types the part of transformers' ``Cache`` that attention layers call (``update``).
    Each slot also records its token's role, turn, conversation (-1 = empty/padding) and
    position, so the mask of any step is :func:`visibility.allowed` between the step's tokens and
    the slots — the same rule as the teacher-forced executions. Tokens of one step are written at
    ``[pos, pos + n)`` of their depth; ``advance`` moves on.
    """

    def __init__(
        self,
        parts: ModelParts,
        k: int,
        batch: int,
        lower_capacity: int,
        upper_capacity: int,
        dtype: torch.dtype,
        device,
    ) -> None:
        cfg = parts.config
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.k = k
        self.num_layers = parts.num_layers
        cap = [lower_capacity if i < k else upper_capacity for i in range(self.num_layers)]
        self.keys = [torch.zeros(batch, heads, c, head_dim, dtype=dtype, device=device) for c in cap]
        self.values = [torch.zeros_like(t) for t in self.keys]
        self.meta = {
            d: TokenMeta(*(torch.full((batch, c), -1, dtype=torch.long, device=device) for _ in range(4)))
            for d, c in (("lower", lower_capacity), ("upper", upper_capacity))
        }
        self.pos = {"lower": 0, "upper": 0}
        self.step_len = {"lower": 0, "upper": 0}
        self.high = [0] * self.num_layers  # per layer: slots written by update() so far

    def depth(self, layer_idx: int) -> str:
        return "upper" if layer_idx >= self.k else "lower"

    def begin(self, depth: str, meta: TokenMeta) -> None:
        """Announce the next step's tokens ([B, n] roles/turns/conversation ids/positions) for one
        depth."""
        if meta.positions is None:
            raise ValueError("cache steps need the tokens' positions (TokenMeta.positions)")
        p, n = self.pos[depth], meta.roles.shape[1]
        self._ensure(depth, p + n)
        for name in ("roles", "turns", "seq_ids", "positions"):
            getattr(self.meta[depth], name)[:, p : p + n] = getattr(meta, name)
        self.step_len[depth] = n

    def _ensure(self, depth: str, need: int) -> None:
        """Grow one depth's slots (doubling) when a step needs more than were allocated: a caller
        that knows its length up front (speed_generate) never grows; HF generate() may."""
        cap = self.meta[depth].roles.shape[1]
        if need <= cap:
            return
        extra = max(need, 2 * cap) - cap
        for i in range(self.num_layers):
            if self.depth(i) == depth:
                pad = self.keys[i].new_zeros(*self.keys[i].shape[:2], extra, self.keys[i].shape[3])
                self.keys[i] = torch.cat([self.keys[i], pad], 2)
                self.values[i] = torch.cat([self.values[i], pad.clone()], 2)
        m = self.meta[depth]
        grow = [
            torch.cat([t, t.new_full((t.shape[0], extra), -1)], 1)
            for t in (m.roles, m.turns, m.seq_ids, m.positions)
        ]
        self.meta[depth] = TokenMeta(*grow)

    def advance(self, depth: str) -> None:
        self.pos[depth] += self.step_len[depth]
        self.step_len[depth] = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        d = self.depth(layer_idx)
        p, n = self.pos[d], key_states.shape[2]
        self.keys[layer_idx][:, :, p : p + n] = key_states
        self.values[layer_idx][:, :, p : p + n] = value_states
        self.high[layer_idx] = max(self.high[layer_idx], p + n)
        return self.keys[layer_idx][:, :, : p + n], self.values[layer_idx][:, :, : p + n]

    def step_mask(self, depth: str, window: int | None = None) -> torch.Tensor:
        """[B, 1, n, S] mask of the announced step's tokens over every slot written so far
        (``window``: a sliding-window layer's)."""
        p, n = self.pos[depth], self.step_len[depth]
        m = self.meta[depth]
        S = p + n
        q = slice(p, S)
        kidx = torch.arange(S, device=m.roles.device)
        allowed_ = allowed(
            m.roles[:, q, None],
            m.turns[:, q, None],
            m.seq_ids[:, q, None],
            kidx[q][None, :, None],
            m.roles[:, None, :S],
            m.turns[:, None, :S],
            m.seq_ids[:, None, :S],
            kidx[None, None, :],
            upper=depth == "upper",
            window=window,
            q_pos=m.positions[:, q, None],
            k_pos=m.positions[:, None, :S],
        )
        return allowed_[:, None]

    def select_rows(self, index: torch.Tensor) -> SpeedCache:
        """A cache whose row i is a copy of row ``index[i]`` (e.g. one context, many choices)."""
        new = object.__new__(SpeedCache)
        new.k, new.num_layers = self.k, self.num_layers
        new.keys = [t.index_select(0, index) for t in self.keys]
        new.values = [t.index_select(0, index) for t in self.values]
        new.meta = {d: m.index(index, slice(None)) for d, m in self.meta.items()}
        new.pos, new.step_len = dict(self.pos), dict(self.step_len)
        new.high = list(self.high)
        return new

    # -- accounting ---------------------------------------------------------------------
    def _slot_bytes(self, layer_idx: int) -> int:
        k = self.keys[layer_idx]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()  # K and V, per token per row

    def allocated_bytes_per_layer(self) -> list[int]:
        return [2 * k.numel() * k.element_size() for k in self.keys]

    def written_bytes_per_layer(self) -> list[int]:
        """Bytes of K/V in the slots each layer's attention actually wrote (per-layer high-water
        mark of ``update`` x rows): a check of :meth:`active_bytes_per_layer` that does not use the
        slot map. The two agree when no slot holds padding (equal-length prompts, no row stopped)."""
        return [self.keys[i].shape[0] * self.high[i] * self._slot_bytes(i) for i in range(self.num_layers)]

    def active_bytes_per_layer(self) -> list[int]:
        """Bytes of K/V held for real tokens (padding and unwritten slots excluded)."""
        return [
            int((self.meta[self.depth(i)].seq_ids[:, : self.pos[self.depth(i)]] >= 0).sum())
            * self._slot_bytes(i)
            for i in range(self.num_layers)
        ]


def prefill(
    parts: ModelParts, k: int, batch: SpeedBatch, extra_capacity: int
) -> tuple[SpeedCache, torch.Tensor]:
    """Shallow prefill of right-padded prompts that end in their decode segment.

    Lower layers see every prompt token; the anchors + the last turn's decode tokens (the
    header, or a plain prompt's answer cue) go on through the upper layers. Returns the cache
    (room for ``extra_capacity`` more tokens per depth) and the logits of each prompt's last token.
    """
    L = parts.num_layers
    B = batch.input_ids.shape[0]
    device = batch.input_ids.device
    meta = batch.meta
    lengths = batch.attention_mask.sum(1)
    last = lengths - 1
    turn = meta.turns[torch.arange(B, device=device), last]
    # earlier assistant turns are history (prompt) for this turn: only the last turn goes up
    this_turn = (meta.roles == DECODE) & (meta.turns == turn[:, None])
    rows = gather_rows(meta, need=this_turn) if k < L else None
    upper_len = rows.t.shape[1] if rows is not None else 0
    T = batch.input_ids.shape[1]
    cache = SpeedCache(
        parts, k, B, T + extra_capacity, upper_len + extra_capacity, parts.embed.weight.dtype, device
    )
    cache.begin("lower", meta)
    hidden = run_layers(
        parts,
        range(k),
        parts.embed(batch.input_ids),
        batch.position_ids,
        layer_masks(meta, range(k), k, parts.windows),
        cache=cache,
        use_cache=True,
    )
    cache.advance("lower")
    if rows is None:
        last_hidden = hidden[torch.arange(B, device=device), last]
    else:
        rb, rt, valid = rows.b, rows.t, rows.valid
        row_meta = rows.meta(meta)
        cache.begin("upper", row_meta)
        h = run_layers(
            parts,
            range(k, L),
            hidden[rb, rt],
            batch.position_ids[rb, rt],
            layer_masks(row_meta, range(k, L), k, parts.windows),
            cache=cache,
            use_cache=True,
        )
        cache.advance("upper")
        last_hidden = h[torch.arange(B, device=device), valid.sum(1) - 1]
    return cache, parts.logits(last_hidden)


def decode_chunk(
    parts: ModelParts,
    cache: SpeedCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    meta: TokenMeta,
    branches: torch.Tensor | None = None,
    head: bool = True,
) -> torch.Tensor:
    """Run n decode-phase tokens per row ([B, n]) through all layers on top of the cache;
    returns their logits [B, n, V] (``head=False``: the last layer's hidden states, before the
    final norm, for a caller that needs logits at a few positions only). ``meta`` marks padding
    (seq_ids -1) and the turn; its positions default to ``positions``.

    ``branches`` ([B, n] ints): several continuations of the cached prompt side by side in one
    row (a tree: e.g. the choices of a multiple-choice question). A token sees what
    :func:`visibility.allowed` lets it see among the cached slots, and, among this chunk's tokens,
    only those of its own branch: exactly what it would see with its branch alone in a copy of
    the cache (its positions are given by ``positions``)."""
    if meta.positions is None:
        meta = TokenMeta(meta.roles, meta.turns, meta.seq_ids, positions)
    h = parts.embed(tokens)
    for depth in ("lower", "upper"):
        cache.begin(depth, meta)
    windows = parts.windows
    masks = {key: cache.step_mask(*key) for key in {(cache.depth(i), w) for i, w in enumerate(windows)}}
    if branches is not None:
        same = (branches[:, :, None] == branches[:, None, :])[:, None]  # [B, 1, n, n]
        for m in masks.values():
            m[..., m.shape[-1] - tokens.shape[1] :] &= same
    pe: dict = {}
    for i, layer in enumerate(parts.layers):
        kind = parts.rope_kind(i)
        if kind not in pe:
            pe[kind] = parts.rope(h, positions, kind)
        h = layer(
            h,
            attention_mask=masks[cache.depth(i), windows[i]],
            position_ids=positions,
            cache=cache,
            use_cache=True,
            position_embeddings=pe[kind],
        )
    for depth in ("lower", "upper"):
        cache.advance(depth)
    return parts.logits(h) if head else h


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated tokens per prompt (stop token included when hit)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per step, if kept
    cache: SpeedCache | None = None


def sampling_processors(temperature: float, top_k: int | None, top_p: float | None):
    """transformers' logits warpers, in the order generate() applies them (temperature, top-k, top-p)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


def _next_tokens(
    logits: torch.Tensor, do_sample: bool, procs, generator: torch.Generator | None
) -> torch.Tensor:
    scores = logits.float()
    if not do_sample:
        return scores.argmax(-1)
    scores = procs(None, scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def speed_generate(
    model,
    prompts: list[EncodedExample],
    k: int,
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
    stop_fn: Callable[[list[int]], bool] | None = None,
    streamer=None,
) -> GenerationOutput:
    """Generate a continuation for each prompt (roles from the core: the assistant header is
    decode-phase and must end the prompt). Prompts may differ in length. A row stops at a token
    of ``stop_token_ids`` or when ``stop_fn(tokens so far)`` is true (e.g. a stop string).
    ``streamer``: a transformers streamer (``put``/``end``, e.g. TextStreamer) for one prompt."""
    parts = enable_speed_attention(model)
    K = check_k(parts, k)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if not p.roles or p.roles[-1] != DECODE:
            raise ValueError(
                f"prompt {i} does not end with a decode-phase token (the assistant header or answer "
                "cue); encode it with the core's generation-prompt encoder"
            )
    device = parts.embed.weight.device
    batch = collate(prompts, pad_token_id, gather=False).to(device)
    B = batch.input_ids.shape[0]
    lengths = batch.attention_mask.sum(1)
    parts.check_length(int(lengths.max()) + max_new_tokens)
    turn = torch.tensor([p.turns[-1] for p in prompts], device=device)
    cache, logits = prefill(parts, K, batch, max_new_tokens)
    if do_sample and temperature <= 0:  # temperature 0 means greedy, never a division by zero
        do_sample = False
    procs = sampling_processors(temperature, top_k, top_p) if do_sample else None
    if streamer is not None:
        if B != 1:
            raise ValueError("a streamer follows one prompt; generate a batch without it")
        streamer.put(torch.tensor(prompts[0].input_ids))  # as generate() does: the prompt first

    stops = torch.tensor(sorted(set(stop_token_ids or [])), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    step_logits: list[torch.Tensor] = []
    next_pos = lengths.clone()
    for step in range(max_new_tokens):
        if keep_logits:
            step_logits.append(logits.float().cpu())
        tok = _next_tokens(logits, do_sample, procs, generator)
        if streamer is not None and not bool(done[0]):
            streamer.put(tok.cpu())
        for b in (~done).nonzero().flatten().tolist():
            out[b].append(int(tok[b]))
            if stop_fn is not None and stop_fn(out[b]):
                done[b] = True
        done |= torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        # finished rows keep stepping (batch shape) as padding that nothing attends to
        meta = TokenMeta(
            torch.full_like(tok, DECODE)[:, None], turn[:, None], torch.where(done, -1, 0)[:, None]
        )
        logits = decode_chunk(parts, cache, tok[:, None], next_pos[:, None], meta)[:, -1]
        next_pos += 1
    if streamer is not None:
        streamer.end()
    return GenerationOutput(out, step_logits, cache)
