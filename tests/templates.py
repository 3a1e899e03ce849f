"""Chat templates of other model families, as Jinja strings, for offline tokenizer fixtures.

They are written for these tests (not copied from the models' repositories) and reproduce the
features that matter for SPEED roles: where the assistant header is, how content ends, and
what glue follows. ``make_tokenizer`` attaches one to a copy of a base tokenizer and adds the
special tokens it needs, so no hub download is ever required.
"""

from __future__ import annotations

import copy
from typing import Any

# Llama-3: BoS once, role headers between special tokens, trimmed content, <|eot_id|>, no glue.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",  # the base-model eos: <|eot_id|> must be found by name
    "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
# Llama-3's pre-tokenizer pattern (tiktoken style): runs of newlines are one piece, so
# "\n\n" before content splits the same way alone and inside the conversation.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Tulu (open-instruct): plain-text role markers (not special tokens), eos after assistant
# content, "\n" glue after every message except a final assistant message.
TULU = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- '<|system|>\\n' + m['content'] + '\\n' }}"
    "{%- elif m['role'] == 'user' %}{{- '<|user|>\\n' + m['content'] + '\\n' }}"
    "{%- elif loop.last %}{{- '<|assistant|>\\n' + m['content'] + eos_token }}"
    "{%- else %}{{- '<|assistant|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- if loop.last and add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
    "{%- endfor %}"
)
TULU_SPECIALS = {"eos_token": "</s>"}

# Mistral-Instruct v0.1 style: no generation prompt at all (the reply follows [/INST]).
MISTRAL = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- m['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Mistral templates accept only user and assistant roles') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_SPECIALS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "additional_special_tokens": ["[INST]", "[/INST]"],
}

# --- deliberately broken ChatML variants -----------------------------------------------------

# The generation prompt rewrites the history: the last message loses its <|im_end|> glue.
BROKEN_GEN_PROMPT = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{%- if not (loop.last and add_generation_prompt) %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- ' <|im_start|>assistant\\n' }}{%- endif %}"
)

# Earlier assistant turns are rendered differently once later turns exist (like reasoning
# templates that strip the thoughts of past turns).
BROKEN_HISTORY = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and not loop.last %}"
    "{{- '<|im_start|>assistant\\n[earlier reply]<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The generation prompt names the role differently from how assistant turns are rendered.
BROKEN_TURN = (
    "{%- for m in messages %}"
    "{%- set role = 'bot' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<|im_start|>' + role + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Plain-text markers and no end-of-turn token anywhere (a turn just ends with a newline).
NO_END_TOKEN = (
    "{%- for m in messages %}"
    "{{- '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### assistant:\\n' }}{%- endif %}"
)


def make_tokenizer(
    base: Any, template: str, specials: dict[str, Any] | None = None, split_pattern: str | None = None
) -> Any:
    """A copy of ``base`` with ``template``, extra special tokens and (optionally) a different
    pre-tokenizer split pattern (byte-level BPE keeps its vocabulary and merges)."""
    tok = copy.deepcopy(base)
    if specials:
        tok.add_special_tokens(specials)
    if split_pattern is not None:
        from tokenizers import Regex, pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.chat_template = template
    return tok
