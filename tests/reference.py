"""An independent reference for SPEED: the spec's visibility rule written out pair by pair in
plain Python, applied as additive masks to *eager* attention, layer by layer.

It shares no code with speed_train.speed.visibility / executors (only the HF layers)."""

from __future__ import annotations

import copy

import torch

A, P, D = 0, 1, 2  # anchor, prompt, decode (spec's roles; same numbering as the contract)


def spec_visible(q: int, k: int, roles, turns, seqs, upper: bool) -> bool:
    if seqs[q] < 0:  # padding: itself only
        return q == k
    if seqs[k] != seqs[q] or k > q:
        return False
    if not upper:
        return True
    if roles[q] == D:
        return roles[k] == A or (roles[k] == D and turns[k] == turns[q])
    if roles[q] == A:
        return roles[k] == A
    return q == k  # prompt query in upper layers: itself only


def spec_masks(batch, upper: bool, dtype) -> torch.Tensor:
    B, T = batch.input_ids.shape
    m = torch.full((B, 1, T, T), torch.finfo(dtype).min, dtype=dtype)
    for b in range(B):
        roles, turns, seqs = (x[b].tolist() for x in (batch.roles, batch.turns, batch.seq_ids))
        for q in range(T):
            for k in range(T):
                if spec_visible(q, k, roles, turns, seqs, upper):
                    m[b, 0, q, k] = 0.0
    return m


def reference_logits(model, batch, K: int) -> torch.Tensor:
    """[B, T, V] logits of SPEED-K by the spec (valid at decode tokens)."""
    ref = copy.deepcopy(model)
    lm = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    lm.set_attn_implementation("eager")
    dec = lm.model
    dtype = next(lm.parameters()).dtype
    lower, upper = spec_masks(batch, False, dtype), spec_masks(batch, True, dtype)
    h = dec.embed_tokens(batch.input_ids)
    pe = dec.rotary_emb(h, position_ids=batch.position_ids)
    for i, layer in enumerate(dec.layers):
        h = layer(
            h,
            attention_mask=upper if i >= K else lower,
            position_ids=batch.position_ids,
            position_embeddings=pe,
        )
    return lm.lm_head(dec.norm(h))
