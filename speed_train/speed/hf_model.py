"""HF-native SPEED models: a SPEED export works wherever transformers runs.

``AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)`` loads one of the
classes below (``model_type`` ``speed_<architecture>``); ``generate()``, pipelines, streamers,
stop strings and logits processors then do the shallow prefill and deep decode exactly as the
model was trained, with the compact upper-layer cache. This file and the core modules it imports
are copied into the export unchanged (relative imports, torch + transformers only): there is one
copy of the SPEED rule, the package's.

What a forward does, by what it is given:
- K = L (``speed_k`` null or equal to the layer count): the unmodified base model;
- a prompt with ``use_cache`` and no cache (generate's prefill): the shallow prefill. Roles come
  from the token ids (:mod:`.token_roles`): the trailing assistant header / answer cue is decode,
  token 0 the BoS anchor. Left padding (HF's convention) is handled per row;
- a :class:`SpeedCache` (generate's decode steps): the new tokens through all layers;
- otherwise (teacher forcing, e.g. scoring): the single-pass SPEED mask over the whole sequence,
  logits at every position, and the HF loss when ``labels`` are given. A sequence without an
  assistant header or answer cue does not show where a context ends and a continuation starts:
  only its last token is decode, so continuations score otherwise than with speed-train's scorer
  (lm-eval ``--model hf`` on cue-less tasks such as HellaSwag; use ``--model speed``). It warns.

The config carries ``speed_k``, ``speed_anchor``, ``speed_headers``, ``speed_cues``,
``speed_end_ids`` and ``speed_add_bos`` (see :func:`speed_config_fields`).
"""

from __future__ import annotations

import warnings

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adapters import enable_speed_attention
from .batch import SpeedBatch, collate
from .config import SpeedConfig
from .executors import mask_forward
from .generate import SpeedCache, decode_chunk, prefill
from .roles import DECODE, IGNORE, EncodedExample
from .token_roles import TokenRoleRule, has_decode_marker, prompt_roles, sequence_roles
from .visibility import TokenMeta

DEFAULT_DECODE_CAPACITY = 256  # generate() without max_new_tokens: the cache grows past it
CUELESS_WARNING = (
    "SPEED teacher forcing on a sequence with no assistant header or answer cue: only its last token "
    "is decode phase, so a continuation scores otherwise than with speed-train, which knows where the "
    "context ends (lm-eval: use speed-lm-eval --model speed, not --model hf, for cue-less tasks such "
    "as HellaSwag or WinoGrande)"
)


def speed_config_fields(speed: SpeedConfig, num_layers: int, rule: TokenRoleRule) -> dict:
    """The SPEED keys of an HF-native config: the model's :class:`SpeedConfig` and what marks the
    roles in token ids (``rule``; its anchor is what the export can see in ids alone)."""
    return {
        **speed.to_hf_fields(num_layers),
        "speed_anchor": rule.anchor,
        "speed_headers": rule.headers,
        "speed_cues": rule.cues,
        "speed_end_ids": rule.end_ids,
    }


class SpeedGenerationMixin:
    """The SPEED forward on top of an HF causal LM class (see the module doc)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the prefill builds its own two-depth cache

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        SpeedConfig.from_hf_config(config)  # a K out of range is refused at load

    @property
    def speed_k(self) -> int:
        """``config.speed_k`` as a layer count (a fraction is a share of the layers, as everywhere)."""
        speed = SpeedConfig.from_hf_config(self.config)
        return self.config.num_hidden_layers if speed is None else speed.k

    @property
    def speed_rule(self) -> TokenRoleRule:
        c = self.config
        return TokenRoleRule(
            anchor=getattr(c, "speed_anchor", "bos") or "none",
            headers=getattr(c, "speed_headers", None) or [],
            cues=getattr(c, "speed_cues", None) or [],
            end_ids=getattr(c, "speed_end_ids", None) or [],
        )

    def generate(self, *args, **kwargs):
        # the prefill sizes its cache from the generation length (it grows if that is exceeded)
        gen_cfg = kwargs.get("generation_config") or self.generation_config
        self._speed_capacity = (
            kwargs.get("max_new_tokens")
            or getattr(gen_cfg, "max_new_tokens", None)
            or (DEFAULT_DECODE_CAPACITY)
        )
        if (
            kwargs.get("num_beams") or getattr(gen_cfg, "num_beams", 1) or 1
        ) > 1 and self.speed_k < self.config.num_hidden_layers:
            raise ValueError(
                "SPEED generation supports greedy decoding and sampling, not beam search (num_beams=1)"
            )
        return super().generate(*args, **kwargs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if self.speed_k >= self.config.num_hidden_layers:  # full depth: the unmodified model
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        if input_ids is None:
            raise ValueError(
                "a SPEED model needs input_ids (its token roles come from the ids), not inputs_embeds"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if isinstance(cache, SpeedCache):
            logits = self._speed_decode(input_ids, position_ids, cache)
        elif use_cache and (cache is None or _cache_is_empty(cache)):
            logits, cache = self._speed_prefill(input_ids, attention_mask)
        else:
            logits, cache = self._speed_teacher_forced(input_ids, attention_mask), None
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    # -- the three cases ---------------------------------------------------------------------
    def _speed_prefill(self, input_ids, attention_mask):
        parts = enable_speed_attention(self)
        rule = self.speed_rule
        prompts = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            real = [t for t, m in zip(ids, mask) if m]
            roles, turns = prompt_roles(real, rule)
            prompts.append(EncodedExample(real, roles, turns, [IGNORE] * len(real)))
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        batch = collate(prompts, pad, gather=False).to(input_ids.device)
        capacity = getattr(self, "_speed_capacity", None) or DEFAULT_DECODE_CAPACITY
        cache, logits = prefill(parts, self.speed_k, batch, capacity)
        cache.turn = torch.zeros(len(prompts), dtype=torch.long, device=input_ids.device)
        cache.next_pos = batch.attention_mask.sum(1)
        return logits[:, None], cache

    def _speed_decode(self, input_ids, position_ids, cache: SpeedCache):
        parts = enable_speed_attention(self)
        B, n = input_ids.shape
        if position_ids is None:
            position_ids = cache.next_pos[:, None] + torch.arange(n, device=input_ids.device)[None]
        meta = TokenMeta(
            torch.full_like(input_ids, DECODE),
            cache.turn[:, None].expand(B, n).clone(),
            torch.zeros_like(input_ids),
        )
        logits = decode_chunk(parts, cache, input_ids, position_ids, meta)
        cache.next_pos = position_ids[:, -1] + 1
        return logits

    def _speed_teacher_forced(self, input_ids, attention_mask):
        rule = self.speed_rule
        B, T = input_ids.shape
        device = input_ids.device
        roles = torch.full((B, T), 1, dtype=torch.long)
        turns = torch.full((B, T), -1, dtype=torch.long)
        seq = torch.full((B, T), -1, dtype=torch.long)
        for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            where = [t for t, m in enumerate(mask) if m]
            kept = [ids[t] for t in where]
            if not has_decode_marker(kept, rule):
                warnings.warn(CUELESS_WARNING, UserWarning, stacklevel=2)  # shown once per process
            r, j = sequence_roles(kept, rule)
            roles[b, where], turns[b, where], seq[b, where] = torch.tensor(r), torch.tensor(j), 0
        seq = seq.to(device)
        positions = ((seq >= 0).long().cumsum(1) - 1).clamp(min=0)
        batch = SpeedBatch(
            input_ids, positions, roles.to(device), turns.to(device), seq, torch.full_like(input_ids, IGNORE)
        )
        out = mask_forward(self, batch, self.speed_k, positions="all")
        return out.dense((B, T))


def _cache_is_empty(cache) -> bool:
    length = getattr(cache, "get_seq_length", None)
    return length is None or length() == 0


# One class pair per supported architecture: the base class's layers and weights, model_type
# speed_<arch> (so that loading without this code fails loudly instead of running full depth).


class SpeedLlamaConfig(LlamaConfig):
    model_type = "speed_llama"


class SpeedLlamaForCausalLM(SpeedGenerationMixin, LlamaForCausalLM):
    config_class = SpeedLlamaConfig


class SpeedMistralConfig(MistralConfig):
    model_type = "speed_mistral"


class SpeedMistralForCausalLM(SpeedGenerationMixin, MistralForCausalLM):
    config_class = SpeedMistralConfig


class SpeedQwen2Config(Qwen2Config):
    model_type = "speed_qwen2"


class SpeedQwen2ForCausalLM(SpeedGenerationMixin, Qwen2ForCausalLM):
    config_class = SpeedQwen2Config


class SpeedQwen3Config(Qwen3Config):
    model_type = "speed_qwen3"


class SpeedQwen3ForCausalLM(SpeedGenerationMixin, Qwen3ForCausalLM):
    config_class = SpeedQwen3Config


class SpeedOlmo2Config(Olmo2Config):
    model_type = "speed_olmo2"


class SpeedOlmo2ForCausalLM(SpeedGenerationMixin, Olmo2ForCausalLM):
    config_class = SpeedOlmo2Config


class SpeedGemma3Config(Gemma3TextConfig):
    model_type = "speed_gemma3"


class SpeedGemma3ForCausalLM(SpeedGenerationMixin, Gemma3ForCausalLM):
    config_class = SpeedGemma3Config


# architecture (adapters.architecture) -> (config class, model class)
SPEED_CLASSES = {
    "llama": (SpeedLlamaConfig, SpeedLlamaForCausalLM),
    "mistral": (SpeedMistralConfig, SpeedMistralForCausalLM),
    "qwen2": (SpeedQwen2Config, SpeedQwen2ForCausalLM),
    "qwen3": (SpeedQwen3Config, SpeedQwen3ForCausalLM),
    "olmo2": (SpeedOlmo2Config, SpeedOlmo2ForCausalLM),
    "gemma3": (SpeedGemma3Config, SpeedGemma3ForCausalLM),
}
