"""Tiny random-init models of every supported architecture (tests, CPU demos, benchmarks)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .adapters import MODEL_TYPES, SUPPORTED_ARCHITECTURES


def tiny_config(
    arch: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 96,
    **overrides,
):
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"no tiny config for {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch in ("qwen3", "gemma3"):
        kw["head_dim"] = hidden // heads
    if arch == "gemma3":
        # Gemma-3's shape at small size: sliding layers with a short window (so test prompts are
        # longer than it) and full-attention layers between them; the attention scale 1/sqrt(head_dim)
        kw.update(sliding_window=8, query_pre_attn_scalar=hidden // heads, sliding_window_pattern=3)
    kw.update(overrides)
    model_type = next(t for t, a in MODEL_TYPES.items() if a == arch)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=dtype)
    return model.eval()
