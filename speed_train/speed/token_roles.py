"""SPEED roles from token ids alone, for a model served without this package.

An HF-native SPEED model (:mod:`.hf_model`) sees ``input_ids``, not messages. What marks the
decode phase of a prompt is written into its config at export, as token sequences computed by
the package's own encoders (:mod:`.chat_roles`, :mod:`.plain_roles`) from the model's tokenizer:

- ``headers``: the assistant header(s) the chat template's generation prompt appends;
- ``cues``: the answer cues of plain prompts (``"Answer:"`` ...), as :func:`cue_token_sequences`
  of :mod:`.plain_roles` finds them;
- ``end_ids``: the tokens that end an assistant turn.

Rules (they give the roles the package's encoders give, checked in tests/test_hf.py):

- a prompt (generation): its decode segment is the header or cue it ends with (longest match),
  else its last token; earlier assistant turns are history (prompt) for this one;
- a whole sequence (teacher forcing, e.g. scoring continuations): each header occurrence starts
  an assistant turn that runs through its first end token; without any header, the decode
  segment starts at the last cue occurrence and runs to the end, else it is the last token;
- the anchor: the first token under ``anchor="bos"``; ``"system"`` needs the template and is not
  available here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .roles import ANCHOR, DECODE, PROMPT


@dataclass
class TokenRoleRule:
    anchor: str = "bos"
    headers: list[list[int]] = field(default_factory=list)
    cues: list[list[int]] = field(default_factory=list)
    end_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.anchor not in ("none", "bos"):
            raise ValueError(
                f"anchor={self.anchor!r}: a model served from token ids supports the anchors 'none' and 'bos' "
                "('system' needs the chat template's message boundaries)"
            )
        # longest first, so a longer marker wins over its own suffix
        self.headers = sorted((list(h) for h in self.headers if h), key=len, reverse=True)
        self.cues = sorted((list(c) for c in self.cues if c), key=len, reverse=True)

    def to_dict(self) -> dict:
        return {"anchor": self.anchor, "headers": self.headers, "cues": self.cues, "end_ids": self.end_ids}


def _ends_with(ids: Sequence[int], marker: list[int]) -> bool:
    return len(ids) >= len(marker) and list(ids[len(ids) - len(marker) :]) == marker


def prompt_roles(ids: Sequence[int], rule: TokenRoleRule) -> tuple[list[int], list[int]]:
    """(roles, turns) of a generation prompt: only its trailing decode segment is decode (turn 0)."""
    n = len(ids)
    if n == 0:
        raise ValueError("an empty prompt has no token to predict from")
    start = n - 1
    for marker in (*rule.headers, *rule.cues):
        if _ends_with(ids, marker):
            start = n - len(marker)
            break
    roles = [PROMPT] * start + [DECODE] * (n - start)
    turns = [-1] * start + [0] * (n - start)
    _mark_anchor(roles, rule)
    return roles, turns


def sequence_roles(ids: Sequence[int], rule: TokenRoleRule) -> tuple[list[int], list[int]]:
    """(roles, turns) of a whole sequence for teacher forcing (see the module doc)."""
    n = len(ids)
    ids = list(ids)
    roles, turns = [PROMPT] * n, [-1] * n
    starts = _occurrences(ids, rule.headers)
    if starts:
        end_ids = set(rule.end_ids)
        j = 0
        for k, (s, _) in enumerate(starts):
            stop = starts[k + 1][0] if k + 1 < len(starts) else n
            end = next((t for t in range(s, stop) if ids[t] in end_ids), stop - 1)
            for t in range(s, end + 1):
                roles[t], turns[t] = DECODE, j
            j += 1
    else:
        cues = _occurrences(ids, rule.cues)
        start = cues[-1][0] if cues else n - 1
        for t in range(max(start, 0), n):
            roles[t], turns[t] = DECODE, 0
    _mark_anchor(roles, rule)
    return roles, turns


def has_decode_marker(ids: Sequence[int], rule: TokenRoleRule) -> bool:
    """Whether a whole sequence shows where its decode segment starts (an assistant header or an
    answer cue); without one, :func:`sequence_roles` can only take its last token."""
    ids = list(ids)
    return bool(_occurrences(ids, rule.headers) or _occurrences(ids, rule.cues))


def _occurrences(ids: list[int], markers: list[list[int]]) -> list[tuple[int, int]]:
    """(start, length) of marker occurrences, left to right, not overlapping (longest first)."""
    found: list[tuple[int, int]] = []
    t = 0
    heads = {m[0] for m in markers}
    while t < len(ids):
        if ids[t] in heads:
            hit = next((m for m in markers if ids[t : t + len(m)] == m), None)
            if hit is not None:
                found.append((t, len(hit)))
                t += len(hit)
                continue
        t += 1
    return found


def _mark_anchor(roles: list[int], rule: TokenRoleRule) -> None:
    if rule.anchor == "bos" and roles and roles[0] == PROMPT:
        roles[0] = ANCHOR
