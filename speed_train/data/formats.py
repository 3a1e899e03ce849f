"""Format adapters: one raw dataset row -> a list of ``{"role", "content"}`` messages.

Every adapter either returns messages or raises :class:`BadRow` with a short reason code; the
loader counts reasons per source (see :class:`speed_train.data.report.DataReport`), so a bad
row is never dropped silently. :func:`normalize_messages` applies the checks common to all
formats after the adapter has mapped field and role names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .qa_formats import QA_ADAPTERS  # sciq, trivia_qa, nq_open, mmlu, mtbench
from .rows import (  # noqa: F401  (re-exported: the reason codes and the row type live in rows)
    BAD_ORDER,
    BAD_ROW_REASONS,
    EMPTY_CONTENT,
    MISSING_FIELD,
    NO_ASSISTANT,
    NOT_UTF8,
    UNKNOWN_ROLE,
    UNPARSABLE,
    WRONG_TYPE,
    BadRow,
    Conversation,
    Message,
    _field,
    _mapping,
)

# Speaker names of ShareGPT-style dumps; anything else (tool, observation, ...) is unknown.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
MESSAGE_ROLES = ("system", "user", "assistant")


def _optional_str(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRow(WRONG_TYPE, f"{key!r} is a {type(value).__name__}")
    return value


def _with_system(system: str | None, messages: Conversation) -> Conversation:
    # An explicit empty system field means "no system prompt", not a bad row.
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + messages


def from_messages(row: Any) -> Conversation:
    """``{"messages": [{"role": ..., "content": ...}, ...]}`` (Tulu 3, OpenAI chat)."""
    msgs = _field(_mapping(row), "messages", list)
    out: Conversation = []
    for m in msgs:
        if not isinstance(m, Mapping):
            raise BadRow(WRONG_TYPE, f"message is a {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise BadRow(WRONG_TYPE if role is not None else MISSING_FIELD, "message without a string role")
        if role not in MESSAGE_ROLES:
            raise BadRow(UNKNOWN_ROLE, repr(role))
        out.append({"role": role, "content": content})
    return out


def from_sharegpt(row: Any) -> Conversation:
    """``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system"?: str}``."""
    row = _mapping(row)
    turns = _field(row, "conversations", list)
    out: Conversation = []
    for m in turns:
        if not isinstance(m, Mapping):
            raise BadRow(WRONG_TYPE, f"turn is a {type(m).__name__}")
        speaker = m.get("from")
        if not isinstance(speaker, str):
            raise BadRow(WRONG_TYPE if speaker is not None else MISSING_FIELD, "turn without a string 'from'")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise BadRow(UNKNOWN_ROLE, repr(speaker))
        out.append({"role": role, "content": m.get("value")})
    return _with_system(_optional_str(row, "system"), out)


def from_prompt_response(row: Any) -> Conversation:
    """``{"prompt": str, "response": str, "system"?: str}``: one user turn, one reply."""
    row = _mapping(row)
    prompt, response = _field(row, "prompt", str), _field(row, "response", str)
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return _with_system(_optional_str(row, "system"), msgs)


def from_alpaca(row: Any) -> Conversation:
    """``{"instruction": str, "input"?: str, "output": str, "system"?: str}``.

    A non-empty ``input`` is appended to the instruction after a blank line (the usual
    Alpaca-to-chat conversion), so the user turn carries both."""
    row = _mapping(row)
    instruction, output = _field(row, "instruction", str), _field(row, "output", str)
    extra = _optional_str(row, "input")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _with_system(_optional_str(row, "system"), msgs)


def from_chatterbot(row: Any) -> Conversation:
    """One entry of a chatterbot-corpus ``conversations`` list: ``[statement, reply, reply, ...]``.

    Each statement answers the previous one, so they alternate user / assistant starting with
    the user. A trailing user statement is kept here; ``encode_conversation`` drops it (and
    records that in its meta), as it does for every format."""
    if not isinstance(row, list):
        raise BadRow(WRONG_TYPE, f"chatterbot entry is a {type(row).__name__}, expected a list")
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": s} for i, s in enumerate(row)]


ADAPTERS: dict[str, Callable[[Any], Conversation]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "prompt_response": from_prompt_response,
    "alpaca": from_alpaca,
    "chatterbot": from_chatterbot,
    **QA_ADAPTERS,
}
FORMATS = tuple(ADAPTERS)


def normalize_messages(messages: Conversation, system_prompt: str | None = None) -> Conversation:
    """Checks shared by all formats; prepends ``system_prompt`` when there is no system message.

    Raises :class:`BadRow` for non-string or empty content (any role: an empty user turn is
    as broken as an empty reply), a system message after index 0, a conversation that starts
    with the assistant, or one without an assistant turn."""
    out: Conversation = []
    for i, m in enumerate(messages):
        content = m["content"]
        if not isinstance(content, str):
            raise BadRow(WRONG_TYPE if content is not None else MISSING_FIELD, f"message {i} content")
        if not content.strip():
            raise BadRow(EMPTY_CONTENT, f"message {i} ({m['role']})")
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow(NO_ASSISTANT)
    if any(m["role"] == "system" for m in out[1:]):
        raise BadRow(BAD_ORDER, "system message after the first message")
    first_turn = out[1] if out[0]["role"] == "system" else out[0]
    if first_turn["role"] == "assistant":
        raise BadRow(BAD_ORDER, "assistant message before any user message")
    if system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def to_conversation(row: Any, fmt: str, system_prompt: str | None = None) -> Conversation:
    """Adapter + shared checks. Raises :class:`BadRow`."""
    return normalize_messages(ADAPTERS[fmt](row), system_prompt)
