"""Plain (non-chat) prompts -> SPEED roles, e.g. OLMES-style evaluation prompts.

The decode segment starts at a trailing answer cue (``ANSWER_CUE``: ``Answer:``, ``A:``,
``Response:``, ``Output:``, ``Solution:``) when the context ends with one, else it is the last
context token alone. A continuation scored by log-likelihood is decode phase and supervised.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .roles import (
    BAD_ARGUMENT,
    DECODE,
    IGNORE,
    PROMPT,
    EncodedExample,
    RoleError,
    mark_anchors,
    plain_adds_bos,
    tokenize,
)

if TYPE_CHECKING:
    from .config import SpeedConfig

# A trailing answer cue of a plain (OLMES-style) prompt, e.g. "Question: ...\nAnswer:".
CUE_WORDS = ("Answer", "A", "Response", "Output", "Solution")
ANSWER_CUE = re.compile(r"\b(?:" + "|".join(CUE_WORDS) + r")\s*:\s*$")


def encode_plain(
    context: str,
    continuation: str | None,
    tokenizer: Any,
    config: SpeedConfig,
    *,
    headers: tuple[str, ...] = (),
) -> EncodedExample:
    """Encode a plain prompt (and an optional continuation to score or train on).

    tokens = [BoS per the ``config.add_bos`` rule of :mod:`.roles`] + tok(context) + tok(continuation);
    context and continuation are tokenised separately (a leading space stays the continuation's).
    The tokens do not depend on K or the anchor: only the roles do. A context that already
    starts with the BoS text gets no second one. ``headers``: assistant
    headers of a chat template (a context rendered with ``add_generation_prompt``): a context
    ending with one has it as its decode segment, as a chat prompt would.
    Continuation tokens are decode and supervised; all decode tokens are turn 0.
    ``meta["context_len"]`` is the number of tokens before the continuation.
    """
    if not isinstance(context, str):
        raise RoleError(f"context must be a string, got {type(context).__name__}", BAD_ARGUMENT)
    if continuation is not None and not isinstance(continuation, str):
        raise RoleError(
            f"continuation must be a string or None, got {type(continuation).__name__}", BAD_ARGUMENT
        )
    with_bos = plain_adds_bos(tokenizer, config.add_bos)
    prefix = [int(tokenizer.bos_token_id)] if with_bos else []
    ctx_ids = tokenize(tokenizer, context)
    if prefix and ctx_ids[:1] == prefix:  # the text carries its BoS already (a rendered chat template)
        prefix = []
    cont_ids = tokenize(tokenizer, continuation) if continuation else []
    if not prefix and not ctx_ids:
        raise RoleError(
            "the context is empty and no BoS is added: there is no token to predict the continuation "
            "from; give a non-empty context or add_bos=True with a tokenizer that has a BoS",
            BAD_ARGUMENT,
        )

    # Decode start inside the context: the token boundary before the cue. When the tokenizer merges
    # across it, start at the first token that differs, so the decode segment covers the whole cue.
    cue = ANSWER_CUE.search(context)
    header = next((h for h in headers if h and context.endswith(h)), None)
    cue_start = (
        len(context) - len(header) if header is not None else (cue.start() if cue is not None else None)
    )
    cue_exact = True
    if cue_start is not None:
        before = tokenize(tokenizer, context[:cue_start])
        common = 0
        while common < min(len(before), len(ctx_ids)) and before[common] == ctx_ids[common]:
            common += 1
        cue_exact = common == len(before)
        start = min(common, len(ctx_ids) - 1) if ctx_ids else 0
        decode_start = len(prefix) + start
    else:
        decode_start = len(prefix) + len(ctx_ids) - 1

    ids = prefix + ctx_ids + cont_ids
    n, context_len = len(ids), len(prefix) + len(ctx_ids)
    roles = [PROMPT] * n
    turns = [-1] * n
    labels = [IGNORE] * n
    for t in range(decode_start, n):
        roles[t], turns[t] = DECODE, 0
    for t in range(context_len, n):
        labels[t] = ids[t]
    mark_anchors(roles, config.anchor)
    meta = {
        "kind": "plain",
        "num_turns": 1,
        "cue": header if header is not None else (cue.group(0) if cue else None),
        "cue_exact": cue_exact,
        "context_len": context_len,
        "anchor": config.anchor,
        "bos_added": bool(prefix),
    }
    return EncodedExample(ids, roles, turns, labels, meta)


def cue_token_sequences(tokenizer: Any) -> list[list[int]]:
    """The token sequences that ``encode_plain`` marks as an answer cue at the end of a context,
    for the usual spellings (``"...\\nAnswer:"``, ``"... A:"``, ``"Response :"``, ...): what a
    model served without this package matches on token ids (:mod:`.token_roles`). Longest first."""
    from .config import SpeedConfig

    cfg = SpeedConfig(anchor="none", add_bos=False)
    found: set[tuple[int, ...]] = set()
    for word in CUE_WORDS:
        for before in ("\n", "\n\n", " ", "?\n", ".\n", ":\n", "?\n\n", ".\n\n"):
            for colon in (":", " :"):
                for after in ("", " "):
                    ex = encode_plain(f"Question: x{before}{word}{colon}{after}", None, tokenizer, cfg)
                    if ex.meta["cue"] is not None:  # what encode_plain marks, merged with the text or not
                        found.add(tuple(t for t, r in zip(ex.input_ids, ex.roles) if r == DECODE))
    return [list(s) for s in sorted(found, key=lambda s: (-len(s), s))]
