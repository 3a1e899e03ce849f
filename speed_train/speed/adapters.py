"""Architecture adapters: find the pieces of an HF decoder-only LM that SPEED drives by hand.

Llama, Qwen2, Qwen3, Mistral and OLMo2 share one layout in transformers 5 (``model.model``
with ``embed_tokens``/``layers``/``norm``/``rotary_emb``, ``lm_head`` beside it) and one
decoder-layer call signature, so one adapter serves all; their differences (QK-norm, post-norm)
stay inside the HF layer that we call unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "olmo2")
SPEED_ATTENTION = "speed"


class UnsupportedModelError(ValueError):
    """The model's architecture has no SPEED adapter."""


@dataclass
class LayerMasks:
    """Per-layer masks of one SPEED forward: ``lower`` for layers < k, ``upper`` for the rest.

    Passed down the HF forward as the ``speed_masks`` kwarg and read by the attention
    function, because a Llama model hands the same mask to every layer."""

    lower: object
    upper: object
    k: int

    def for_layer(self, layer_idx: int):
        return self.upper if layer_idx >= self.k else self.lower


def speed_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa (boolean masks; None = causal kernel) or flex (BlockMask), per-layer SPEED masks.

    Without ``speed_masks`` this is plain sdpa, so a model left on this implementation still
    behaves as an ordinary HF model (``generate``, padding via the registered mask function).
    """
    masks = kwargs.pop("speed_masks", None)
    if masks is not None:
        attention_mask = masks.for_layer(module.layer_idx)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_registered = False


def register_speed_attention() -> None:
    """Register the attention function AND its mask function (else HF passes no padding mask)."""
    global _registered
    if not _registered:
        AttentionInterface.register(SPEED_ATTENTION, speed_attention)
        AttentionMaskInterface.register(SPEED_ATTENTION, sdpa_mask)
        _registered = True


@dataclass
class ModelParts:
    causal_lm: nn.Module
    decoder: nn.Module
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary(hidden, position_ids=position_ids)

    def check_length(self, length: int) -> None:
        window = attention_window(self.config)
        if window is not None and length > window:
            raise UnsupportedModelError(
                f"sequence of {length} tokens exceeds the model's sliding window ({window}); SPEED "
                "masks implement full causal attention only. Use shorter sequences or a config "
                "with sliding_window=None."
            )
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions is not None and length > positions:
            warnings.warn(
                f"a sequence of {length} tokens (prompt plus new tokens) runs past the model's "
                f"{positions} positions: the model was not trained there and usually degrades",
                stacklevel=3,
            )


def attention_window(config) -> int | None:
    """The sliding attention window a config uses (None: full causal attention)."""
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/3 keep a window size but switch it off
        return None
    return getattr(config, "sliding_window", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF causal LM inside peft / Lightning / DeepSpeed wrappers."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP/DeepSpeed engine
            model = model.module
        else:
            break
    return model


def model_parts(model: nn.Module) -> ModelParts:
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        model_type = model_type.removeprefix("speed_")  # an HF-native SPEED class of the same layout
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"SPEED has no adapter for architecture {model_type!r} ({type(lm).__name__}); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    dec = lm.model
    return ModelParts(lm, dec, dec.embed_tokens, dec.layers, dec.norm, dec.rotary_emb, lm.lm_head)


def enable_speed_attention(model: nn.Module) -> ModelParts:
    """Switch the model to the registered ``speed`` attention (idempotent) and return its parts."""
    parts = model_parts(model)
    register_speed_attention()
    if parts.config._attn_implementation != SPEED_ATTENTION:
        parts.causal_lm.set_attn_implementation(SPEED_ATTENTION)
    return parts
