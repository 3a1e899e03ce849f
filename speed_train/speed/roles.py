"""Token roles (anchor / prompt / decode) and supervision labels.

Contract used by every executor (see docs/SPEED.md in the shared spec):
- ``roles[t]``  ANCHOR (0), PROMPT (1) or DECODE (2)
- ``turns[t]``  assistant-turn index (0, 1, ...) for decode tokens, -1 for anchor/prompt
- ``labels[t]`` HF-style, aligned with ``input_ids`` (the loss shifts them): the token id
  where supervised (assistant content + end token), IGNORE (-100) elsewhere.

How chat conversations are labelled (``encode_conversation``): the assistant header is never
hard-coded. For assistant message ``i`` we render the history ``messages[:i]`` with and without
``add_generation_prompt``; the difference is the header that inference will prefill, so it is
exactly what training marks as decode (no loss). The content up to and including the first
end-of-turn token is decode + supervised; template glue after it (ChatML's ``"\\n"``) is prompt.
The full conversation is tokenised once; every character boundary is mapped to a token boundary
by tokenising the prefix and checking that it is a token-prefix of the whole, so training sees
the same tokens as a shallow prefill of the same history would.

Anchor choices (``SpeedConfig.anchor``):
- ``bos``: token 0 of the sequence. That is the tokenizer's BoS when the template emits one
  (Llama-3 ``<|begin_of_text|>``), otherwise the first token of the system segment (ChatML
  ``<|im_start|>``), or the first header token when nothing precedes it.
- ``system``: every token of the leading system message's rendering (``render(messages[:1])``);
  without a system message in ``messages``, token 0 as for ``bos`` (a system prompt that the
  template injects by itself, like SmolLM2's default one, does not count).
- ``none``: no anchor.
An anchor replaces the prompt role only: a token that is decode stays decode.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from speed_train.speed.config import SpeedConfig

ANCHOR, PROMPT, DECODE = 0, 1, 2
ROLE_NAMES = {ANCHOR: "anchor", PROMPT: "prompt", DECODE: "decode"}
IGNORE = -100

MESSAGE_ROLES = ("system", "user", "assistant")
# Looked up by name in the vocabulary (in addition to eos) when no end_token_ids are given.
DEFAULT_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "</s>", "<|endoftext|>")
# A trailing answer cue of a plain (OLMES-style) prompt, e.g. "Question: ...\nAnswer:".
ANSWER_CUE = re.compile(r"\b(?:Answer|A|Response|Output|Solution)\s*:\s*$")

Truncate = Literal["error", "drop_turns"]
EmptyHeader = Literal["error", "last_prompt_token"]


class RoleError(ValueError):
    """A conversation, prompt or chat template cannot be labelled with SPEED roles."""


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


# --------------------------------------------------------------------------------------------
# Chat conversations


def encode_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: SpeedConfig,
    *,
    end_token_ids: int | Iterable[int] | None = None,
    max_length: int | None = None,
    truncate: Truncate = "error",
    empty_header: EmptyHeader = "error",
) -> EncodedExample:
    """Encode a chat conversation for SPEED training (roles, turns, labels).

    ``messages``: an optional leading system message, then user/assistant messages with at least
    one assistant turn. Messages after the last assistant turn are dropped (they would be
    unsupervised prompt that no decode token reads); ``meta["dropped_trailing_messages"]``
    counts them.

    ``end_token_ids``: the id(s) that end an assistant turn; default: eos plus whichever of
    ``DEFAULT_END_TOKENS`` the vocabulary has.

    ``max_length`` / ``truncate``: ``"error"`` raises when the encoding is longer;
    ``"drop_turns"`` keeps the longest prefix of the conversation that ends with a complete
    assistant turn and fits (a header is never separated from its content).

    ``empty_header``: templates without a generation prompt (Mistral ``[INST] ... [/INST]``)
    give an empty assistant header. ``"error"`` raises; ``"last_prompt_token"`` makes the last
    token before the content (e.g. ``[/INST]``) the decode-phase header, as for plain prompts.
    """
    if truncate not in ("error", "drop_turns"):
        raise RoleError(f"unknown truncate={truncate!r}: use 'error' or 'drop_turns'")
    if empty_header not in ("error", "last_prompt_token"):
        raise RoleError(f"unknown empty_header={empty_header!r}: use 'error' or 'last_prompt_token'")
    if max_length is not None and max_length < 1:
        raise RoleError(f"max_length={max_length} must be a positive token count (or None)")
    msgs = _validate_messages(messages)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    dropped_trailing = len(msgs) - last - 1
    msgs = msgs[: last + 1]
    end_ids = _end_ids(tokenizer, end_token_ids)

    example = _encode_chat(msgs, tokenizer, config, end_ids, empty_header, generation=False)
    example.meta["dropped_trailing_messages"] = dropped_trailing
    if max_length is None or len(example) <= max_length:
        return example
    if truncate == "error":
        raise RoleError(
            f"conversation encodes to {len(example)} tokens > max_length={max_length}: raise "
            "max_length, drop the example, or pass truncate='drop_turns' to drop trailing turns"
        )
    # drop_turns: the token end of each assistant turn equals the length of the conversation cut
    # after that turn (the prefix property was checked), so we know which cut fits beforehand.
    assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    turn_ends = [span[3] for span in example.meta["turn_spans"]]
    for j in range(len(turn_ends) - 2, -1, -1):
        if turn_ends[j] <= max_length:
            kept = _encode_chat(
                msgs[: assistant_idx[j] + 1], tokenizer, config, end_ids, empty_header, generation=False
            )
            if len(kept) > max_length:  # cannot happen after the prefix checks; never truncate silently
                raise RoleError(f"internal error: cut after turn {j} has {len(kept)} > {max_length} tokens")
            kept.meta["dropped_turns"] = len(turn_ends) - (j + 1)
            kept.meta["dropped_trailing_messages"] = dropped_trailing
            return kept
    raise RoleError(
        f"even the first assistant turn needs {turn_ends[0]} tokens > max_length={max_length}: "
        "raise max_length or drop this conversation (truncation never cuts inside a turn)"
    )


def encode_generation_prompt(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: SpeedConfig,
    *,
    end_token_ids: int | Iterable[int] | None = None,
    empty_header: EmptyHeader = "error",
) -> EncodedExample:
    """Encode a history that ends before an assistant turn, plus the assistant header, for inference.

    The roles match ``encode_conversation`` of the same history followed by an assistant message
    token for token: earlier assistant turns are decode with their turn index (no labels), and
    the header appended by ``add_generation_prompt`` is decode with the next turn's index. No
    token is supervised. ``meta["generation_turn"]`` is that index.
    """
    msgs = _validate_messages(messages, for_generation=True)
    if empty_header not in ("error", "last_prompt_token"):
        raise RoleError(f"unknown empty_header={empty_header!r}: use 'error' or 'last_prompt_token'")
    end_ids = _end_ids(tokenizer, end_token_ids)
    return _encode_chat(msgs, tokenizer, config, end_ids, empty_header, generation=True)


def _validate_messages(messages: Any, *, for_generation: bool = False) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise RoleError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise RoleError("messages is empty: give at least a user message and an assistant reply")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RoleError(
                f"message {i} is a {type(m).__name__}, not a dict: give each message as "
                "{'role': 'user'|'assistant'|'system', 'content': str}"
            )
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise RoleError(
                f"message {i} has no string 'role' (got {role!r}): set it to 'system', 'user' or 'assistant'"
            )
        if role not in MESSAGE_ROLES:
            raise RoleError(
                f"message {i} has unknown role {role!r}: use 'system', 'user' or 'assistant' "
                "(map dataset-specific names such as 'human'/'gpt' before encoding)"
            )
        if not isinstance(content, str):
            raise RoleError(
                f"message {i} ({role}) has content of type {type(content).__name__}: content must "
                "be a string (flatten structured or multimodal content to text first)"
            )
        if role == "system" and i != 0:
            raise RoleError(
                f"message {i} is a system message, but only a leading system message (index 0) is "
                "supported: merge it into message 0 or into the following user message"
            )
        if role == "assistant" and i == 0:
            raise RoleError(
                "message 0 is an assistant message with no prompt before it: chat templates cannot "
                "render an empty history; prepend the user message it answers, or drop the turn"
            )
        if role == "assistant" and not content.strip():
            raise RoleError(
                f"message {i} (assistant) has empty content: there is nothing to supervise; drop the "
                "turn (and the user message it answers) or the whole conversation"
            )
        out.append(dict(m))
    if for_generation:
        if out[-1]["role"] == "assistant":
            raise RoleError(
                f"message {len(out) - 1} is an assistant message: a generation prompt must end with the "
                "user (or system) message to answer; drop the trailing assistant message"
            )
    elif not any(m["role"] == "assistant" for m in out):
        raise RoleError(
            "conversation has no assistant message: SPEED supervises assistant turns only; add the "
            "assistant reply, or use encode_plain for a bare prompt/continuation pair"
        )
    return out


def _encode_chat(
    msgs: list[dict[str, Any]],
    tokenizer: Any,
    config: SpeedConfig,
    end_ids: frozenset[int],
    empty_header: EmptyHeader,
    *,
    generation: bool,
) -> EncodedExample:
    if not getattr(tokenizer, "chat_template", None):
        raise RoleError(
            "the tokenizer has no chat template: set tokenizer.chat_template (a Jinja string), or use "
            "encode_plain for non-chat prompts"
        )
    assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    # In generation mode the turn being generated sits at the (virtual) index len(msgs).
    turn_msg_idx = assistant_idx + [len(msgs)] if generation else assistant_idx

    # Character spans per turn: (header_start, content_start, turn_end); turn_end is None for
    # the generation turn. `prefixes` are renderings that must be prefixes of the full text.
    char_spans: list[tuple[int, int, int | None]] = []
    headers: list[str] = []
    prefixes: list[tuple[str, str]] = []
    for i in turn_msg_idx:
        nogen = _render(tokenizer, msgs[:i], False)
        gen = _render(tokenizer, msgs[:i], True)
        if not gen.startswith(nogen):
            raise RoleError(
                f"chat template cannot be split: rendering messages[:{i}] with add_generation_prompt=True "
                "does not start with the rendering without it, so the assistant header is not an "
                "appended suffix; fix the template so the generation prompt only appends text"
            )
        header = gen[len(nogen) :]
        if not header and empty_header == "error":
            raise RoleError(
                f"chat template cannot be split: add_generation_prompt adds no assistant header before "
                f"message {i} (e.g. Mistral's '[INST] ... [/INST]' format), so the first response token "
                "would be predicted from a prompt token; pass empty_header='last_prompt_token' to make "
                "the last prompt token the decode-phase header, or use a template with a generation prompt"
            )
        headers.append(header)
        prefixes += [(nogen, f"messages[:{i}]"), (gen, f"messages[:{i}] + generation prompt")]
        if i == len(msgs):  # the generation turn: no content
            char_spans.append((len(nogen), len(gen), None))
            continue
        through = _render(tokenizer, msgs[: i + 1], False)
        if not through.startswith(gen):
            raise RoleError(
                f"chat template cannot be split: the rendering through assistant message {i} does not "
                f"start with the history plus the generation prompt ({header!r}), i.e. the template "
                "renders an assistant turn differently from what it prompts generation with; fix the "
                "template so both agree"
            )
        prefixes.append((through, f"messages[:{i + 1}]"))
        char_spans.append((len(nogen), len(gen), len(through)))

    full = prefixes[-1][0]  # the last rendering: through the last turn, or its generation prompt
    for text, what in prefixes:
        if not full.startswith(text):
            raise RoleError(
                f"the chat template renders history differently in later turns: the rendering of {what} "
                "is not a prefix of the whole conversation's rendering (the template rewrites or drops "
                "earlier turns); SPEED needs every turn exactly as inference re-prefills it - fix the "
                "template, or split the conversation into one example per assistant turn"
            )
    system_end: int | None = None
    if config.anchor == "system" and msgs[0]["role"] == "system":
        sys_text = _render(tokenizer, msgs[:1], False)
        if not full.startswith(sys_text):
            raise RoleError(
                "the chat template renders the system message differently once other messages follow, "
                "so its tokens cannot be anchored; use anchor='bos' or fix the template"
            )
        system_end = len(sys_text)

    ids = _tokenize(tokenizer, full)
    bounds = _Boundaries(tokenizer, full, ids)
    n = len(ids)
    roles = [PROMPT] * n
    turns = [-1] * n
    labels = [IGNORE] * n
    token_spans: list[tuple[int, int, int, int]] = []
    # Generation prompts supervise nothing; training supervises per the loss scope.
    if generation:
        supervised_turns: Sequence[int] = ()
    elif config.loss_scope == "all_assistant":
        supervised_turns = range(len(assistant_idx))
    else:
        supervised_turns = [len(assistant_idx) - 1]
    for j, ((hs_c, cs_c, te_c), msg_i) in enumerate(zip(char_spans, turn_msg_idx)):
        hs = bounds.at(hs_c, f"start of the assistant header before message {msg_i}")
        cs = bounds.at(cs_c, f"header/content boundary of assistant message {msg_i}")
        if hs == cs:  # empty header (allowed by empty_header='last_prompt_token'): use the last prompt token
            if cs == 0 or roles[cs - 1] == DECODE:
                raise RoleError(
                    f"assistant message {msg_i} has an empty header and no prompt token right before it "
                    "to act as one (e.g. two assistant messages in a row): merge consecutive assistant messages"
                )
            hs = cs - 1
        if te_c is None:  # generation turn: header only
            for t in range(hs, cs):
                roles[t], turns[t] = DECODE, j
            token_spans.append((hs, cs, cs, cs))
            continue
        te = bounds.at(te_c, f"end of assistant message {msg_i}'s turn")
        end = next((t for t in range(cs, te) if ids[t] in end_ids), None)
        if end is None:
            names = _token_names(tokenizer, end_ids)
            raise RoleError(
                f"no end-of-turn token in the rendering of assistant message {msg_i} (looked for {names}): "
                "pass end_token_ids=[...] with the id(s) the template appends after assistant content"
            )
        _check_no_end_text(tokenizer, msgs[msg_i]["content"], end_ids, msg_i)
        for t in range(hs, end + 1):
            roles[t], turns[t] = DECODE, j
        if j in supervised_turns:
            for t in range(cs, end + 1):
                labels[t] = ids[t]
        token_spans.append((hs, cs, end + 1, te))  # te..: glue after the end token stays prompt

    system_tokens = None if system_end is None else bounds.at(system_end, "end of the system message")
    anchor_end = _anchor_end(config, n, system_tokens)
    for t in range(anchor_end):
        if roles[t] == PROMPT:
            roles[t] = ANCHOR

    meta: dict[str, Any] = {
        "kind": "chat",
        "num_turns": len(assistant_idx),
        "header_text": headers[-1],
        "turn_spans": token_spans,  # per turn: (header_start, content_start, content_end, turn_end)
        "anchor": config.anchor,
        "loss_scope": config.loss_scope,
        "dropped_turns": 0,
        "end_token_ids": sorted(end_ids),
    }
    if generation:
        meta["generation_turn"] = len(assistant_idx)
    example = EncodedExample(ids, roles, turns, labels, meta)
    if not generation and example.num_supervised() == 0:  # guarded above; keep the invariant explicit
        raise RoleError("internal error: the encoded conversation has no supervised token")
    return example


def _render(tokenizer: Any, msgs: list[dict[str, Any]], gen: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    except Exception as exc:  # template errors come as jinja / ValueError / TypeError
        raise RoleError(
            f"the chat template failed to render messages[:{len(msgs)}] (add_generation_prompt={gen}): {exc}"
        ) from exc
    if not isinstance(text, str):
        raise RoleError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False: the template already wrote BoS etc. (no double <|begin_of_text|>).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Boundaries:
    """Maps character offsets of ``text`` to token offsets of ``ids`` (its tokenisation)."""

    def __init__(self, tokenizer: Any, text: str, ids: list[int]) -> None:
        self.tokenizer, self.text, self.ids = tokenizer, text, ids
        self.cache: dict[int, int] = {0: 0, len(text): len(ids)}

    def at(self, pos: int, what: str) -> int:
        if pos not in self.cache:
            prefix = _tokenize(self.tokenizer, self.text[:pos])
            if self.ids[: len(prefix)] != prefix:
                before, after = self.text[max(0, pos - 24) : pos], self.text[pos : pos + 24]
                raise RoleError(
                    f"tokenizer merges tokens across the {what} (character {pos}: ...{before!r} | "
                    f"{after!r}...): the text before it does not tokenise to a prefix of the whole "
                    "sequence, so no token boundary falls there; strip leading/trailing whitespace "
                    "from the message content, or use a template/tokenizer that splits there"
                )
            self.cache[pos] = len(prefix)
        return self.cache[pos]


def _anchor_end(config: SpeedConfig, n: int, system_end_token: int | None) -> int:
    """Number of leading tokens that are anchor candidates under the policy."""
    if config.anchor == "none" or n == 0:
        return 0
    if config.anchor == "system" and system_end_token:
        return system_end_token
    return 1  # bos, or system without a system message


def default_end_token_ids(tokenizer: Any) -> list[int]:
    """eos plus whichever of ``DEFAULT_END_TOKENS`` the tokenizer's vocabulary contains."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    for token in DEFAULT_END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        # Missing tokens map to unk (or None): only the unk token itself may legitimately have unk's id.
        if tid is not None and (tid != unk_id or token == unk) and tid not in ids:
            ids.append(int(tid))
    return ids


def _end_ids(tokenizer: Any, end_token_ids: int | Iterable[int] | None) -> frozenset[int]:
    if end_token_ids is None:
        ids = default_end_token_ids(tokenizer)
        if not ids:
            raise RoleError(
                "the tokenizer has no eos token and none of "
                f"{', '.join(DEFAULT_END_TOKENS)}: pass end_token_ids=[...] with the end-of-turn id(s)"
            )
        return frozenset(ids)
    if isinstance(end_token_ids, int):
        return frozenset([end_token_ids])
    ids = [int(x) for x in end_token_ids]
    if not ids:
        raise RoleError(
            "end_token_ids is empty: give at least one end-of-turn token id, or None for the default"
        )
    return frozenset(ids)


def _token_names(tokenizer: Any, ids: Iterable[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in sorted(ids))


def _check_no_end_text(tokenizer: Any, content: str, end_ids: frozenset[int], msg_i: int) -> None:
    # End-token text inside the content (e.g. a literal "<|im_end|>") is tokenised as the end token
    # itself and would silently end the turn early: refuse it.
    for tid in end_ids:
        text = tokenizer.convert_ids_to_tokens(tid)
        if isinstance(text, str) and text and text in content and _tokenize(tokenizer, text) == [tid]:
            raise RoleError(
                f"assistant message {msg_i} contains the end-of-turn text {text!r} inside its content: "
                "it would end the turn early; remove or escape it in the data"
            )


# --------------------------------------------------------------------------------------------
# Plain (non-chat) prompts, e.g. OLMES-style evaluation


def encode_plain(
    context: str,
    continuation: str | None,
    tokenizer: Any,
    config: SpeedConfig,
    *,
    add_bos: bool = True,
) -> EncodedExample:
    """Encode a plain prompt (and an optional continuation to score or train on).

    tokens = [BoS if ``add_bos`` and the tokenizer has one] + tok(context) + tok(continuation);
    context and continuation are tokenised separately (a leading space stays the continuation's).
    The decode segment starts at a trailing answer cue (``ANSWER_CUE``: ``Answer:``, ``A:``,
    ``Response:``, ``Output:``, ``Solution:``) when the context ends with one, else it is the last
    context token alone. Continuation tokens are decode and supervised. All decode tokens are
    turn 0. ``meta["context_len"]`` is the number of tokens before the continuation.
    """
    if not isinstance(context, str):
        raise RoleError(f"context must be a string, got {type(context).__name__}")
    if continuation is not None and not isinstance(continuation, str):
        raise RoleError(f"continuation must be a string or None, got {type(continuation).__name__}")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    prefix = [int(bos)] if bos is not None else []
    ctx_ids = _tokenize(tokenizer, context)
    cont_ids = _tokenize(tokenizer, continuation) if continuation else []
    if not prefix and not ctx_ids:
        raise RoleError(
            "the context is empty and no BoS is added: there is no token to predict the continuation "
            "from; give a non-empty context or add_bos=True with a tokenizer that has a BoS"
        )

    # Decode start inside the context: the token boundary before the cue. When the tokenizer merges
    # across it, start at the first token that differs, so the decode segment covers the whole cue.
    cue = ANSWER_CUE.search(context)
    cue_exact = True
    if cue is not None:
        before = _tokenize(tokenizer, context[: cue.start()])
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
    for t in range(_anchor_end(config, n, None)):
        if roles[t] == PROMPT:
            roles[t] = ANCHOR
    meta = {
        "kind": "plain",
        "num_turns": 1,
        "cue": cue.group(0) if cue else None,
        "cue_exact": cue_exact,
        "context_len": context_len,
        "anchor": config.anchor,
    }
    return EncodedExample(ids, roles, turns, labels, meta)


# --------------------------------------------------------------------------------------------
# Human-readable inspector

_ANSI = {"A": "\x1b[35m", "P": "\x1b[2m", "D": "\x1b[33m", "L": "\x1b[32m", "?": "\x1b[31m"}
_RESET = "\x1b[0m"
_KIND_NAMES = {"A": "anchor", "P": "prompt", "D": "decode, no loss", "L": "decode + loss"}


def _kind(role: int, label: int) -> str:
    if label != IGNORE:
        return "L"
    return {ANCHOR: "A", PROMPT: "P", DECODE: "D"}.get(role, "?")


def render_roles(example: EncodedExample, tokenizer: Any, *, color: bool = True) -> str:
    """Show every token with its role: ANSI colours (anchor magenta, prompt dim, decode header
    yellow, supervised green) or, with ``color=False``, ``[A:..] [P:..] [D:..] [L:..]`` markup.
    Runs of one kind (and one turn) are merged and decoded together; newlines show as ``↵``.
    Ends with a legend and per-role / per-turn counts."""
    kinds = [_kind(r, lab) for r, lab in zip(example.roles, example.labels)]
    parts: list[str] = []
    t = 0
    while t < len(kinds):
        u = t
        while u < len(kinds) and kinds[u] == kinds[t] and example.turns[u] == example.turns[t]:
            u += 1
        text = tokenizer.decode(
            example.input_ids[t:u], skip_special_tokens=False, clean_up_tokenization_spaces=False
        ).replace("\n", "↵\n")
        parts.append(f"{_ANSI[kinds[t]]}{text}{_RESET}" if color else f"[{kinds[t]}:{text}]")
        t = u
    if color:
        legend = "legend: " + " ".join(f"{_ANSI[k]}{name}{_RESET}" for k, name in _KIND_NAMES.items())
    else:
        legend = "legend: " + " ".join(f"[{k}:{name}]" for k, name in _KIND_NAMES.items())
    counts = {k: kinds.count(k) for k in _KIND_NAMES}
    summary = (
        f"tokens {len(kinds)} | anchor {counts['A']} | prompt {counts['P']} | "
        f"decode {counts['D'] + counts['L']} (supervised {counts['L']})"
    )
    turn_ids = sorted({x for x in example.turns if x >= 0})
    if turn_ids:
        per_turn = []
        for j in turn_ids:
            dec = sum(1 for x in example.turns if x == j)
            sup = sum(1 for x, lab in zip(example.turns, example.labels) if x == j and lab != IGNORE)
            per_turn.append(f"turn {j}: {dec} decode / {sup} supervised")
        summary += " | " + ", ".join(per_turn)
    return "".join(parts) + "\n" + legend + "\n" + summary
