"""Chat templates that a tokenizer may lack, by name (``model.chat_template=tulu`` and the like).

- ``tulu``: open-instruct's Tulu template (plain-text role markers, the tokenizer's eos after each
  reply, no BoS: the ``add_bos`` rule prepends it), used with Llama-3.1-8B base in the SPEED
  paper's controlled study.
- ``llama3``: Meta-Llama-3-8B-Instruct's template (BoS, header tokens, trimmed content, <|eot_id|>).
- ``chatml``: ChatML without a default system prompt (<|im_start|>role\\n ... <|im_end|>\\n).
- ``gemma``: Gemma's own turn format (``<bos><start_of_turn>user\\n ... <end_of_turn>\\n``,
  ``<start_of_turn>model\\n ... <end_of_turn>\\n``), for instruction tuning the Gemma-3 base model:
  the BoS starts every sequence, content is trimmed and a system message opens the first user turn,
  as in Gemma-3-IT's template (same text). Unlike it, a system message rendered alone gives the
  prefix of that turn, so the ``system`` anchor finds its tokens; there is no alternation check.
"""

from __future__ import annotations

TULU = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<start_of_turn>user\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if not (loop.index0 == 1 and messages[0]['role'] == 'system') %}{{ '<start_of_turn>user\n' }}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% else %}"
    "{{ '<start_of_turn>model\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TEMPLATES = {"tulu": TULU, "llama3": LLAMA3, "chatml": CHATML, "gemma": GEMMA}


def resolve(template: str) -> str:
    """A packaged template by name, else ``template`` itself (a Jinja string)."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{" not in template:
        raise ValueError(
            f"chat template {template!r} is neither a packaged name ({', '.join(TEMPLATES)}) nor a Jinja "
            "template string"
        )
    return template
