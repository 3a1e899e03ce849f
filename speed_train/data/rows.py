"""What a source row is checked into: the conversation type, the bad-row reason codes, and the
field readers every format adapter shares (:mod:`.formats` for chat dumps, :mod:`.qa_formats` for
question-answer sets)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Message = dict[str, str]
Conversation = list[Message]

# Reason codes, in the order they are reported.
UNPARSABLE = "unparsable"  # a JSONL line that is not JSON
NOT_UTF8 = "not_utf8"  # a JSONL line that is not UTF-8 text
WRONG_TYPE = "wrong_type"  # row / field / message / content of the wrong type
MISSING_FIELD = "missing_field"  # a required column is absent
UNKNOWN_ROLE = "unknown_role"
EMPTY_CONTENT = "empty_content"  # a message with empty or whitespace-only content
NO_ASSISTANT = "no_assistant_turn"
BAD_ORDER = "bad_order"  # system message not first, or an assistant message first
BAD_ROW_REASONS = (
    UNPARSABLE,
    NOT_UTF8,
    WRONG_TYPE,
    MISSING_FIELD,
    UNKNOWN_ROLE,
    EMPTY_CONTENT,
    NO_ASSISTANT,
    BAD_ORDER,
)


class BadRow(ValueError):
    """A row that cannot become a conversation; ``reason`` is one of ``BAD_ROW_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _mapping(row: Any) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise BadRow(WRONG_TYPE, f"row is a {type(row).__name__}, expected an object")
    return row


def _field(row: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in row or row[key] is None:
        raise BadRow(MISSING_FIELD, f"no {key!r} field")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # a bool is an int to isinstance
        raise BadRow(WRONG_TYPE, f"{key!r} is a {type(value).__name__}")
    return value
