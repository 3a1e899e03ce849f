"""The role contract every SPEED execution reads (the specification is summarised in docs/DESIGN.md).

- ``roles[t]``  ANCHOR (0), PROMPT (1) or DECODE (2)
- ``turns[t]``  assistant-turn index (0, 1, ...) for decode tokens, -1 for anchor/prompt
- ``labels[t]`` HF-style, aligned with ``input_ids`` (the loss shifts them): the token id
  where supervised (assistant content + end token), IGNORE (-100) elsewhere.

Encoders live beside this file: :mod:`.chat_roles` (chat templates), :mod:`.plain_roles`
(plain prompts with an answer cue) and :mod:`.token_roles` (roles from token ids alone, for
models served outside this package). They raise :class:`RoleError`, whose ``reason`` is one
of ``ROLE_ERROR_REASONS`` so that data pipelines count drops by reason without reading text.

``add_bos`` (``"auto"``, ``True``, ``False``) is the one rule for the beginning-of-sequence
token; every encoder applies it through :func:`bos_prefix` (chat) or :func:`plain_adds_bos`
(plain prompts). It depends on the tokenizer and the template only, never on the SPEED arm:
Full-IT, SPEED-K and SPEED-K+BoS see the same token ids (the anchor policy changes visibility,
not tokens), as in Tulu-3, where ``--add_bos`` puts the BoS on every run's input.

- ``auto``: the tokenizer's BoS starts every sequence when the tokenizer defines one (chat: it is
  prepended when the rendered template does not start with it, open-instruct's ``add_bos``, never
  a second one; plain prompts: prepended unless the text starts with it). No BoS token: nothing.
- ``True``: the same, and a tokenizer without a BoS token is an error.
- ``False``: nothing is added (chat: the template's rendering as it is; plain prompts: the text's
  tokens only). This is what lm-eval's ``hf`` model scores with a tokenizer that adds no BoS by
  default (SmolLM2): an explicit choice, applied to every arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import AddBos, check_add_bos

ANCHOR, PROMPT, DECODE = 0, 1, 2
ROLE_NAMES = {ANCHOR: "anchor", PROMPT: "prompt", DECODE: "decode"}
IGNORE = -100

# Why a conversation or prompt cannot be encoded (RoleError.reason): the data layer counts
# drops per reason.
BAD_MESSAGE = "bad_message"  # wrong type, unknown role, misplaced system/assistant message
EMPTY_CONTENT = "empty_content"
NO_ASSISTANT = "no_assistant_turn"
TEMPLATE_ERROR = "template_error"  # no template, cannot be split, renders history differently
NO_END_TOKEN = "no_end_token"
END_TOKEN_IN_CONTENT = "end_token_in_content"
TOKEN_MERGE = "token_merge"  # no token boundary where a role boundary must be
TOO_LONG = "too_long"
BAD_ARGUMENT = "bad_argument"  # a caller's argument, not the data
ROLE_ERROR_REASONS = (
    BAD_MESSAGE,
    EMPTY_CONTENT,
    NO_ASSISTANT,
    TEMPLATE_ERROR,
    NO_END_TOKEN,
    END_TOKEN_IN_CONTENT,
    TOKEN_MERGE,
    TOO_LONG,
    BAD_ARGUMENT,
)


class RoleError(ValueError):
    """A conversation, prompt or chat template cannot be labelled with SPEED roles.

    ``reason`` (one of ``ROLE_ERROR_REASONS``) says why, as data."""

    def __init__(self, message: str, reason: str = BAD_ARGUMENT) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason across process boundaries (datasets.map workers)
        return (type(self), (str(self), self.reason))


@dataclass
class EncodedExample:
    input_ids: list[int]
    roles: list[int]
    turns: list[int]
    labels: list[int]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _has_bos(tokenizer: Any, policy: AddBos) -> bool:
    """Does the rule put a BoS on sequences of this tokenizer (``policy`` checked)?"""
    has = getattr(tokenizer, "bos_token_id", None) is not None
    if policy is True and not has:
        raise RoleError(
            "add_bos=true, but the tokenizer defines no BoS token: use add_bos=auto (a BoS where the "
            "tokenizer has one) or false",
            BAD_ARGUMENT,
        )
    return has and policy is not False


def bos_prefix(tokenizer: Any, add_bos: AddBos, first_id: int | None) -> list[int]:
    """The tokens to put before a chat rendering whose first token is ``first_id``: the
    tokenizer's BoS when the rule puts one on every sequence and the rendering does not start with it."""
    if not _has_bos(tokenizer, check_add_bos(add_bos)) or first_id == tokenizer.bos_token_id:
        return []
    return [int(tokenizer.bos_token_id)]


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added: every encoder's one way to tokenise
    (templates write their own BoS etc.; the BoS rule adds it as an id, never as text)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Does ``tokenizer(text)`` (special tokens on, as lm-eval's ``hf`` model calls it) start
    with the BoS?"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def plain_adds_bos(tokenizer: Any, add_bos: AddBos) -> bool:
    """Whether a plain prompt starts with the tokenizer's BoS (see the module doc): the same
    answer for every SPEED arm and depth."""
    return _has_bos(tokenizer, check_add_bos(add_bos))


def anchor_end(anchor: str, n: int, system_end_token: int | None = None) -> int:
    """Number of leading tokens that are anchor candidates under the policy."""
    if anchor == "none" or n == 0:
        return 0
    if anchor == "system" and system_end_token:
        return system_end_token
    return 1  # bos, or system without a system message


def mark_anchors(roles: list[int], anchor: str, system_end_token: int | None = None) -> None:
    """Turn the leading anchor candidates from prompt into anchor (a decode token stays decode)."""
    for t in range(anchor_end(anchor, len(roles), system_end_token)):
        if roles[t] == PROMPT:
            roles[t] = ANCHOR
