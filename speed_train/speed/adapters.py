"""Architecture adapters: find the pieces of an HF decoder-only LM that SPEED drives by hand.

Llama, Qwen2, Qwen3, Mistral, OLMo2 and Gemma-3 (text) share one layout in transformers 5
(``model.model`` with ``embed_tokens``/``layers``/``norm``/``rotary_emb``, ``lm_head`` beside it)
and one decoder-layer call signature, so one adapter serves all; their differences (QK-norm,
post-norms, Gemma's scaled embedding) stay inside the HF modules that we call unchanged. What
differs between layers is read from the config: Gemma-3's per-layer attention type gives each
layer its RoPE table (``rotary_emb(x, positions, layer_type)``) and its window (sliding layers:
``config.sliding_window``; full-attention layers: none); its final-logit soft-capping, when set,
is applied by :meth:`ModelParts.logits`.
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

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "olmo2", "gemma3")
# HF model_type -> architecture (Gemma3ForCausalLM's config is gemma3_text; "gemma3" is the
# multimodal model, whose text stack sits elsewhere: not supported)
MODEL_TYPES = {arch: arch for arch in SUPPORTED_ARCHITECTURES if arch != "gemma3"} | {"gemma3_text": "gemma3"}
# architectures whose sliding windows the SPEED masks implement (per layer, from the config)
WINDOWED_ARCHITECTURES = ("gemma3",)
SPEED_ATTENTION = "speed"


class UnsupportedModelError(ValueError):
    """The model's architecture has no SPEED adapter."""


@dataclass
class LayerMasks:
    """Per-layer masks of one SPEED forward (lower or upper, each with its layer's window).

    Passed down the HF forward as the ``speed_masks`` kwarg and read by the attention
    function, because a Llama model hands the same mask to every layer."""

    masks: dict[int, object]  # layer index -> its mask (visibility.layer_masks)

    def for_layer(self, layer_idx: int):
        return self.masks[layer_idx]


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

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window (None: full attention)."""
        return layer_windows(self.config)

    def rope_kind(self, layer_idx: int) -> str | None:
        """Which RoPE table a layer uses: its attention type (Gemma-3), else the one table (None)."""
        return self.config.layer_types[layer_idx] if architecture(self.config) == "gemma3" else None

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str | None = None):
        if kind is None:
            return self.rotary(hidden, position_ids=position_ids)
        return self.rotary(hidden, position_ids, kind)

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """The LM head (after the final norm unless ``normed``), soft-capped where the config says so."""
        logits = self.lm_head(hidden if normed else self.norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def check_length(self, length: int) -> None:
        window = unsupported_window(self.config)
        if window is not None and length > window:
            raise UnsupportedModelError(
                f"sequence of {length} tokens exceeds the model's sliding window ({window}); SPEED "
                f"masks implement sliding windows for {', '.join(WINDOWED_ARCHITECTURES)} only. Use "
                "shorter sequences or a config with sliding_window=None."
            )
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions is not None and length > positions:
            warnings.warn(
                f"a sequence of {length} tokens (prompt plus new tokens) runs past the model's "
                f"{positions} positions: the model was not trained there and usually degrades",
                stacklevel=3,
            )


def architecture(config) -> str | None:
    """The SPEED architecture of an HF config (None: not supported)."""
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        return None
    if model_type.startswith("speed_"):  # an HF-native SPEED class names its architecture
        return model_type.removeprefix("speed_")
    return MODEL_TYPES.get(model_type)


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window as the stock model applies it (None: full attention)."""
    L = config.num_hidden_layers
    if architecture(config) != "gemma3":
        return [None] * L
    return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types[:L]]


def attention_window(config) -> int | None:
    """The sliding attention window a config uses (None: full causal attention)."""
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/3 keep a window size but switch it off
        return None
    return getattr(config, "sliding_window", None)


def unsupported_window(config) -> int | None:
    """A sliding window the SPEED masks do not implement for this architecture (None: none)."""
    return None if architecture(config) in WINDOWED_ARCHITECTURES else attention_window(config)


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
    if architecture(config) not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"SPEED has no adapter for architecture {getattr(config, 'model_type', None)!r} "
            f"({type(lm).__name__}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if getattr(config, "use_bidirectional_attention", False):  # e.g. EmbeddingGemma: not a causal LM
        raise UnsupportedModelError(
            f"{type(lm).__name__} uses bidirectional attention; SPEED needs a causal LM"
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
