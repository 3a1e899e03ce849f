"""An independent reference for SPEED: the spec's visibility rule written out pair by pair in
plain Python, applied as additive masks to *eager* attention, layer by layer.

It shares no code with speed_train.speed.visibility / executors / adapters (only the HF layers).
Sliding-window layers (Gemma-3) are read from the config as the stock model reads them: a key
at a distance of ``window`` positions or more is hidden, whatever its role."""

from __future__ import annotations

import copy

import torch

A, P, D = 0, 1, 2  # anchor, prompt, decode (spec's roles; same numbering as the contract)


def spec_visible(q: int, k: int, roles, turns, seqs, upper: bool, pos=None, window=None) -> bool:
    if seqs[q] < 0:  # padding: itself only
        return q == k
    if seqs[k] != seqs[q] or k > q:
        return False
    if window is not None and pos[q] - pos[k] >= window:  # the layer's own sliding window
        return False
    if not upper:
        return True
    if roles[q] == D:
        return roles[k] == A or (roles[k] == D and turns[k] == turns[q])
    if roles[q] == A:
        return roles[k] == A
    return q == k  # prompt query in upper layers: itself only


def spec_masks(batch, upper: bool, dtype, window=None) -> torch.Tensor:
    B, T = batch.input_ids.shape
    m = torch.full((B, 1, T, T), torch.finfo(dtype).min, dtype=dtype)
    for b in range(B):
        roles, turns, seqs, pos = (
            x[b].tolist() for x in (batch.roles, batch.turns, batch.seq_ids, batch.position_ids)
        )
        for q in range(T):
            for k in range(T):
                if spec_visible(q, k, roles, turns, seqs, upper, pos, window):
                    m[b, 0, q, k] = 0.0
    return m


def layer_kinds(config) -> list[str | None]:
    """Gemma-3 layers are sliding_attention or full_attention; the other models have one kind."""
    if getattr(config, "model_type", "").endswith(("gemma3_text", "gemma3")):
        return list(config.layer_types[: config.num_hidden_layers])
    return [None] * config.num_hidden_layers


def reference_logits(model, batch, K: int) -> torch.Tensor:
    """[B, T, V] logits of SPEED-K by the spec (valid at decode tokens)."""
    ref = copy.deepcopy(model)
    lm = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    lm.set_attn_implementation("eager")
    dec, config = lm.model, lm.config
    dtype = next(lm.parameters()).dtype
    kinds = layer_kinds(config)
    masks = {}
    for i, kind in enumerate(kinds):
        window = config.sliding_window if kind == "sliding_attention" else None
        if (i >= K, window) not in masks:
            masks[i >= K, window] = spec_masks(batch, i >= K, dtype, window)
    h = dec.embed_tokens(batch.input_ids)
    pe = {
        kind: dec.rotary_emb(h, batch.position_ids)
        if kind is None
        else dec.rotary_emb(h, batch.position_ids, kind)
        for kind in set(kinds)
    }
    for i, layer in enumerate(dec.layers):
        window = config.sliding_window if kinds[i] == "sliding_attention" else None
        h = layer(
            h,
            attention_mask=masks[i >= K, window],
            position_ids=batch.position_ids,
            position_embeddings=pe[kinds[i]],
        )
    logits = lm.lm_head(dec.norm(h))
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
