"""Chat conversations -> SPEED roles, turns and labels (the contract is in :mod:`.roles`).

The assistant header is never hard-coded. For assistant message ``i`` the history
``messages[:i]`` is rendered with and without ``add_generation_prompt``; the difference is the
header that inference will prefill, so it is exactly what training marks as decode (no loss).
The content up to and including the first end-of-turn token is decode + supervised; template
glue after it (ChatML's ``"\\n"``) is prompt. The conversation is tokenised once and every
history boundary (through a header, through a turn) is checked to be a token boundary whose
prefix tokenises to a prefix of the whole, so training sees the same tokens as a shallow
prefill of the same history would. A header's start is where its own tokens begin before that
checked boundary (as a served model finds it from token ids alone), or else checked the same way.

How the check stays cheap: a tokenizer splits text on its added (special) tokens first and
encodes the pieces between them independently, so "``text[:pos]`` tokenises to ``ids[:n]``"
holds exactly when the text since the last special token before ``pos`` tokenises to the
matching slice of ``ids``. Only that stretch is re-tokenised (with chat templates built on
special tokens, a few tokens); without special tokens it is the whole prefix, as it must be.

Anchor choices (``SpeedConfig.anchor``): ``bos`` = token 0 (the tokenizer's BoS, prepended by
the ``add_bos`` rule when the template emits none; otherwise the template's first token);
``system`` = every token of the leading system message's rendering (``render(messages[:1])``),
token 0 without a system message (a system prompt that the template injects by itself, like
SmolLM2's default one, does not count); ``none``. An anchor replaces the prompt role only.
"""

from __future__ import annotations

import bisect
import functools
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import StrEnum
from .roles import (
    BAD_ARGUMENT,
    BAD_MESSAGE,
    DECODE,
    EMPTY_CONTENT,
    END_TOKEN_IN_CONTENT,
    IGNORE,
    NO_ASSISTANT,
    NO_END_TOKEN,
    PROMPT,
    TEMPLATE_ERROR,
    TOKEN_MERGE,
    TOO_LONG,
    EncodedExample,
    RoleError,
    bos_prefix,
    mark_anchors,
    tokenize,
)

if TYPE_CHECKING:
    from .config import SpeedConfig

MESSAGE_ROLES = ("system", "user", "assistant")
# Looked up by name in the vocabulary (in addition to eos) when no end_token_ids are given.
DEFAULT_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "</s>", "<|endoftext|>", "<end_of_turn>")


class Truncate(StrEnum):
    """What a conversation longer than max_length becomes (also the training schema's type)."""

    error = "error"  # drop a too-long conversation as too_long
    drop_turns = "drop_turns"  # keep the longest prefix ending with a complete assistant turn


class EmptyHeader(StrEnum):
    error = "error"
    last_prompt_token = "last_prompt_token"


TRUNCATE = Truncate.values()
EMPTY_HEADER = EmptyHeader.values()


def encode_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: SpeedConfig,
    *,
    end_token_ids: int | Iterable[int] | None = None,
    max_length: int | None = None,
    truncate: Truncate | str = "error",
    empty_header: EmptyHeader | str = "error",
) -> EncodedExample:
    """Encode a chat conversation for SPEED training (roles, turns, labels).

    ``messages``: an optional leading system message, then user/assistant messages with at least
    one assistant turn. Messages after the last assistant turn are dropped (they would be
    unsupervised prompt that no decode token reads); ``meta["dropped_trailing_messages"]``
    counts them.

    ``end_token_ids``: the id(s) that end an assistant turn; default: eos plus whichever of
    ``DEFAULT_END_TOKENS`` the tokenizer has as special tokens.

    ``max_length`` / ``truncate``: ``"error"`` raises when the encoding is longer;
    ``"drop_turns"`` keeps the longest prefix of the conversation that ends with a complete
    assistant turn and fits (a header is never separated from its content).

    ``empty_header``: templates without a generation prompt (Mistral ``[INST] ... [/INST]``)
    give an empty assistant header. ``"error"`` raises; ``"last_prompt_token"`` makes the last
    token before the content (e.g. ``[/INST]``) the decode-phase header, as for plain prompts.

    ``config.add_bos``: the BoS rule of :mod:`.roles` (``"auto"``: prepend the tokenizer's BoS
    when the template does not emit it).
    """
    _check_options(truncate, empty_header)
    if max_length is not None and max_length < 1:
        raise RoleError(f"max_length={max_length} must be a positive token count (or None)", BAD_ARGUMENT)
    msgs = _validate_messages(messages)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    dropped_trailing = len(msgs) - last - 1
    msgs = msgs[: last + 1]
    cut = 0
    if max_length is not None:
        msgs, cut = _cut_by_characters(msgs, tokenizer, max_length, truncate)
    encoder = _ChatEncoder(tokenizer, config, _end_ids(tokenizer, end_token_ids), empty_header)

    example = encoder.encode(msgs, generation=False)
    example.meta["dropped_trailing_messages"] = dropped_trailing
    if cut:
        example.meta["dropped_turns"] = cut
    if max_length is None or len(example) <= max_length:
        return example
    if truncate == "error":
        raise RoleError(
            f"conversation encodes to {len(example)} tokens > max_length={max_length}: raise "
            "max_length, drop the example, or pass truncate='drop_turns' to drop trailing turns",
            TOO_LONG,
        )
    # drop_turns: the token end of each assistant turn equals the length of the conversation cut
    # after that turn (the prefix property was checked), so we know which cut fits beforehand.
    assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    turn_ends = [span[3] for span in example.meta["turn_spans"]]
    for j in range(len(turn_ends) - 2, -1, -1):
        if turn_ends[j] <= max_length:
            kept = encoder.encode(msgs[: assistant_idx[j] + 1], generation=False)
            if len(kept) > max_length:  # cannot happen after the prefix checks; never truncate silently
                raise RoleError(f"internal error: cut after turn {j} has {len(kept)} > {max_length} tokens")
            kept.meta["dropped_turns"] = len(turn_ends) - (j + 1) + cut
            kept.meta["dropped_trailing_messages"] = dropped_trailing
            return kept
    raise RoleError(
        f"even the first assistant turn needs {turn_ends[0]} tokens > max_length={max_length}: "
        "raise max_length or drop this conversation (truncation never cuts inside a turn)",
        TOO_LONG,
    )


def _cut_by_characters(
    msgs: list[dict[str, Any]], tokenizer: Any, max_length: int, truncate: str
) -> tuple[list[dict[str, Any]], int]:
    """The conversation without the trailing assistant turns that cannot fit by their characters
    alone, and how many turns went: a token decodes to at most ``_max_token_chars`` characters, so
    a prefix whose message contents hold more than ``max_length`` times that many can never fit.
    A 50 MB message is then refused before it is rendered and tokenised (gigabytes, minutes);
    what is kept is exactly what tokenising everything would keep."""
    limit = max_length * _max_token_chars(tokenizer)
    chars, fits = 0, None  # fits: the last assistant message whose prefix may fit
    for i, m in enumerate(msgs):
        chars += len(m["content"].strip())
        if chars > limit:
            break
        if m["role"] == "assistant":
            fits = i
    if fits == len(msgs) - 1:
        return msgs, 0
    if fits is None or truncate == "error":
        first = "the first assistant turn" if fits is None else "the conversation"
        raise RoleError(
            f"{first} holds more than {limit} characters, more than max_length={max_length} tokens can "
            "hold: raise max_length or drop this conversation",
            TOO_LONG,
        )
    return msgs[: fits + 1], sum(m["role"] == "assistant" for m in msgs[fits + 1 :])


_MAX_TOKEN_CHARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _max_token_chars(tokenizer: Any) -> int:
    """At most how many characters one token decodes to: the longest vocabulary entry (a
    byte-level or sentencepiece symbol stands for at least one byte, hence at least one
    character); computed once per tokenizer."""
    try:
        return _MAX_TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    n = max((len(t) for t in vocab), default=1) if vocab else 1 << 40  # unknown: no bound
    try:
        _MAX_TOKEN_CHARS[tokenizer] = n
    except TypeError:  # not weakly referenceable: computed each time
        pass
    return n


def encode_generation_prompt(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: SpeedConfig,
    *,
    end_token_ids: int | Iterable[int] | None = None,
    empty_header: EmptyHeader | str = "error",
) -> EncodedExample:
    """Encode a history that ends before an assistant turn, plus the assistant header, for inference.

    The roles match ``encode_conversation`` of the same history followed by an assistant message
    token for token: earlier assistant turns are decode with their turn index (no labels), and
    the header appended by ``add_generation_prompt`` is decode with the next turn's index. No
    token is supervised. ``meta["generation_turn"]`` is that index.
    """
    _check_options("error", empty_header)
    msgs = _validate_messages(messages, for_generation=True)
    encoder = _ChatEncoder(tokenizer, config, _end_ids(tokenizer, end_token_ids), empty_header)
    return encoder.encode(msgs, generation=True)


def _check_options(truncate: str, empty_header: str) -> None:
    if truncate not in TRUNCATE:
        raise RoleError(f"unknown truncate={truncate!r}: use 'error' or 'drop_turns'", BAD_ARGUMENT)
    if empty_header not in EMPTY_HEADER:
        raise RoleError(
            f"unknown empty_header={empty_header!r}: use 'error' or 'last_prompt_token'", BAD_ARGUMENT
        )


def _validate_messages(messages: Any, *, for_generation: bool = False) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise RoleError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}",
            BAD_MESSAGE,
        )
    if not messages:
        raise RoleError("messages is empty: give at least a user message and an assistant reply", BAD_MESSAGE)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RoleError(
                f"message {i} is a {type(m).__name__}, not a dict: give each message as "
                "{'role': 'user'|'assistant'|'system', 'content': str}",
                BAD_MESSAGE,
            )
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise RoleError(
                f"message {i} has no string 'role' (got {role!r}): set it to 'system', 'user' or 'assistant'",
                BAD_MESSAGE,
            )
        if role not in MESSAGE_ROLES:
            raise RoleError(
                f"message {i} has unknown role {role!r}: use 'system', 'user' or 'assistant' "
                "(map dataset-specific names such as 'human'/'gpt' before encoding)",
                BAD_MESSAGE,
            )
        if not isinstance(content, str):
            raise RoleError(
                f"message {i} ({role}) has content of type {type(content).__name__}: content must "
                "be a string (flatten structured or multimodal content to text first)",
                BAD_MESSAGE,
            )
        if role == "system" and i != 0:
            raise RoleError(
                f"message {i} is a system message, but only a leading system message (index 0) is "
                "supported: merge it into message 0 or into the following user message",
                BAD_MESSAGE,
            )
        if role == "assistant" and i == 0:
            raise RoleError(
                "message 0 is an assistant message with no prompt before it: chat templates cannot "
                "render an empty history; prepend the user message it answers, or drop the turn",
                BAD_MESSAGE,
            )
        if role == "assistant" and not content.strip():
            raise RoleError(
                f"message {i} (assistant) has empty content: there is nothing to supervise; drop the "
                "turn (and the user message it answers) or the whole conversation",
                EMPTY_CONTENT,
            )
        out.append(dict(m))
    if for_generation:
        if out[-1]["role"] == "assistant":
            raise RoleError(
                f"message {len(out) - 1} is an assistant message: a generation prompt must end with the "
                "user (or system) message to answer; drop the trailing assistant message",
                BAD_MESSAGE,
            )
    elif not any(m["role"] == "assistant" for m in out):
        raise RoleError(
            "conversation has no assistant message: SPEED supervises assistant turns only; add the "
            "assistant reply, or use encode_plain for a bare prompt/continuation pair",
            NO_ASSISTANT,
        )
    return out


class _ChatEncoder:
    """One tokenizer + settings; ``encode`` labels one (validated) message list."""

    def __init__(
        self, tokenizer: Any, config: SpeedConfig, end_ids: frozenset[int], empty_header: str
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise RoleError(
                "the tokenizer has no chat template: set tokenizer.chat_template (a Jinja string), or use "
                "encode_plain for non-chat prompts",
                TEMPLATE_ERROR,
            )
        self.tokenizer, self.config, self.end_ids = tokenizer, config, end_ids
        self.empty_header, self.add_bos = empty_header, config.add_bos
        self.render = chat_renderer(tokenizer)
        self._header_ids: dict[str, list[int]] = {}

    def _render(self, msgs: list[dict[str, Any]], gen: bool) -> str:
        try:
            text = self.render(msgs, gen)
        except Exception as exc:  # template errors come as jinja / ValueError / TypeError
            raise RoleError(
                f"the chat template failed to render messages[:{len(msgs)}] (add_generation_prompt={gen}): {exc}",
                TEMPLATE_ERROR,
            ) from exc
        if not isinstance(text, str):
            raise RoleError(
                f"the chat template rendered a {type(text).__name__}, expected str", TEMPLATE_ERROR
            )
        return text

    def _header_start(self, bounds: Boundaries, hs_c: int, cs: int, header: str, msg_i: int) -> int:
        """Token index where the assistant header starts, given its end ``cs`` (checked).

        The history through the header (``text[:cs_c]``, what a shallow prefill sees) is the
        boundary that must tokenise to a prefix; the header's own start only has to be where its
        tokens begin. When the tokens before ``cs`` end with the header's own tokenisation, they
        are the header (as a served model finds it from token ids alone) and the history before
        it need not be tokenised again (with templates whose headers are plain text, such as
        Tulu's ``<|assistant|>`` under Llama-3, that re-tokenised the whole user message);
        otherwise the prefix check decides, as at every other boundary."""
        ids = self._header_ids.get(header)
        if ids is None:
            ids = self._header_ids[header] = tokenize(self.tokenizer, header) if header else []
        if ids and len(ids) <= cs and bounds.ids[cs - len(ids) : cs] == ids:
            return cs - len(ids)
        return bounds.at(hs_c, f"start of the assistant header before message {msg_i}")

    def encode(self, msgs: list[dict[str, Any]], *, generation: bool) -> EncodedExample:
        assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        # In generation mode the turn being generated sits at the (virtual) index len(msgs).
        turn_msg_idx = assistant_idx + [len(msgs)] if generation else assistant_idx

        # Character spans per turn: (header_start, content_start, turn_end); turn_end is None for
        # the generation turn. `prefixes` are renderings that must be prefixes of the full text.
        char_spans: list[tuple[int, int, int | None]] = []
        headers: list[str] = []
        prefixes: list[tuple[str, str]] = []
        for i in turn_msg_idx:
            nogen = self._render(msgs[:i], False)
            gen = self._render(msgs[:i], True)
            if not gen.startswith(nogen):
                raise RoleError(
                    f"chat template cannot be split: rendering messages[:{i}] with add_generation_prompt=True "
                    "does not start with the rendering without it, so the assistant header is not an "
                    "appended suffix; fix the template so the generation prompt only appends text",
                    TEMPLATE_ERROR,
                )
            header = gen[len(nogen) :]
            if not header and self.empty_header == "error":
                raise RoleError(
                    f"chat template cannot be split: add_generation_prompt adds no assistant header before "
                    f"message {i} (e.g. Mistral's '[INST] ... [/INST]' format), so the first response token "
                    "would be predicted from a prompt token; pass empty_header='last_prompt_token' to make "
                    "the last prompt token the decode-phase header, or use a template with a generation prompt",
                    TEMPLATE_ERROR,
                )
            headers.append(header)
            prefixes += [(nogen, f"messages[:{i}]"), (gen, f"messages[:{i}] + generation prompt")]
            if i == len(msgs):  # the generation turn: no content
                char_spans.append((len(nogen), len(gen), None))
                continue
            through = self._render(msgs[: i + 1], False)
            if not through.startswith(gen):
                raise RoleError(
                    f"chat template cannot be split: the rendering through assistant message {i} does not "
                    f"start with the history plus the generation prompt ({header!r}), i.e. the template "
                    "renders an assistant turn differently from what it prompts generation with; fix the "
                    "template so both agree",
                    TEMPLATE_ERROR,
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
                    "template, or split the conversation into one example per assistant turn",
                    TEMPLATE_ERROR,
                )
        system_end: int | None = None
        if self.config.anchor == "system" and msgs[0]["role"] == "system":
            sys_text = self._render(msgs[:1], False)
            if not full.startswith(sys_text):
                raise RoleError(
                    "the chat template renders the system message differently once other messages follow, "
                    "so its tokens cannot be anchored; use anchor='bos' or fix the template",
                    TEMPLATE_ERROR,
                )
            system_end = len(sys_text)

        bounds = Boundaries(self.tokenizer, full)
        ids = bounds.ids
        n = len(ids)
        roles = [PROMPT] * n
        turns = [-1] * n
        labels = [IGNORE] * n
        token_spans: list[tuple[int, int, int, int]] = []
        # Generation prompts supervise nothing; training supervises per the loss scope.
        if generation:
            supervised_turns: Sequence[int] = ()
        elif self.config.loss_scope == "all_assistant":
            supervised_turns = range(len(assistant_idx))
        else:
            supervised_turns = [len(assistant_idx) - 1]
        for j, ((hs_c, cs_c, te_c), msg_i) in enumerate(zip(char_spans, turn_msg_idx)):
            cs = bounds.at(cs_c, f"header/content boundary of assistant message {msg_i}")
            hs = self._header_start(bounds, hs_c, cs, headers[j], msg_i)
            if hs == cs:  # empty header (allowed by empty_header='last_prompt_token'): the last prompt token
                if cs == 0 or roles[cs - 1] == DECODE:
                    raise RoleError(
                        f"assistant message {msg_i} has an empty header and no prompt token right before it "
                        "to act as one (e.g. two assistant messages in a row): merge consecutive assistant "
                        "messages",
                        TEMPLATE_ERROR,
                    )
                hs = cs - 1
            if te_c is None:  # generation turn: header only
                for t in range(hs, cs):
                    roles[t], turns[t] = DECODE, j
                token_spans.append((hs, cs, cs, cs))
                continue
            te = bounds.at(te_c, f"end of assistant message {msg_i}'s turn")
            end = next((t for t in range(cs, te) if ids[t] in self.end_ids), None)
            if end is None:
                names = _token_names(self.tokenizer, self.end_ids)
                raise RoleError(
                    f"no end-of-turn token in the rendering of assistant message {msg_i} (looked for {names}): "
                    "pass end_token_ids=[...] with the id(s) the template appends after assistant content",
                    NO_END_TOKEN,
                )
            _check_no_end_text(self.tokenizer, msgs[msg_i]["content"], self.end_ids, msg_i)
            for t in range(hs, end + 1):
                roles[t], turns[t] = DECODE, j
            if j in supervised_turns:
                for t in range(cs, end + 1):
                    labels[t] = ids[t]
            token_spans.append((hs, cs, end + 1, te))  # te..: glue after the end token stays prompt

        system_tokens = None if system_end is None else bounds.at(system_end, "end of the system message")
        # The BoS rule: prepend the tokenizer's BoS when the template does not emit it.
        pre = bos_prefix(self.tokenizer, self.add_bos, ids[0] if ids else None)
        if pre:
            p = len(pre)
            ids, roles, turns, labels = (
                pre + ids,
                [PROMPT] * p + roles,
                [-1] * p + turns,
                [IGNORE] * p + labels,
            )
            token_spans = [tuple(x + p for x in span) for span in token_spans]  # type: ignore[misc]
            system_tokens = None if system_tokens is None else system_tokens + p
        mark_anchors(roles, self.config.anchor, system_tokens)

        meta: dict[str, Any] = {
            "kind": "chat",
            "num_turns": len(assistant_idx),
            "header_text": headers[-1],
            "turn_spans": token_spans,  # per turn: (header_start, content_start, content_end, turn_end)
            "anchor": self.config.anchor,
            "loss_scope": self.config.loss_scope,
            "dropped_turns": 0,
            "end_token_ids": sorted(self.end_ids),
            "bos_added": bool(pre),
        }
        if generation:
            meta["generation_turn"] = len(assistant_idx)
        example = EncodedExample(ids, roles, turns, labels, meta)
        if not generation and example.num_supervised() == 0:  # guarded above; keep the invariant explicit
            raise RoleError("internal error: the encoded conversation has no supervised token")
        return example


def chat_renderer(tokenizer: Any):
    """``render(messages, add_generation_prompt) -> str``, equal to
    ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` without its per-call set-up:
    the compiled template and the special-token variables are looked up once, and messages that
    are plain ``{role, content}`` string dicts go straight to the template (anything else takes
    transformers' own path, which normalises richer message objects first)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

    template = tokenizer.get_chat_template()
    compiled = _compile_jinja_template(template)
    variables = dict(tokenizer.special_tokens_map)

    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        if all(m.keys() == _PLAIN_KEYS and isinstance(m["content"], str) for m in msgs):
            return compiled.render(
                messages=msgs, tools=None, documents=None, add_generation_prompt=gen, **variables
            )
        rendered, _ = render_jinja_template(
            conversations=[msgs], chat_template=template, add_generation_prompt=gen, **variables
        )
        return rendered[0]

    return render


_PLAIN_KEYS = {"role": None, "content": None}.keys()


class Boundaries:
    """The tokenisation of ``text`` and a map from character offsets to token offsets, checked.

    ``at(pos)`` is the number of tokens that ``text[:pos]`` tokenises to, after checking that
    those are a prefix of the whole text's tokens (else :class:`RoleError`, ``token_merge``).
    Only the text since the last special token before ``pos`` is re-tokenised (see the module
    doc for why that is the same check). Special tokens are located in the text by their
    strings (leftmost-longest, as the tokenizer splits) and matched one to one with the special
    ids in the tokens; where that pairing fails, every check re-tokenises the whole prefix."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.tokenizer, self.text = tokenizer, text
        self.ids: list[int] = tokenize(tokenizer, text)
        # restart points: char end, char start and token index of every special token
        self._ends: list[int] = []
        self._starts: list[tuple[int, int]] = []
        pattern, strings = _special_pattern(tokenizer)
        if pattern is not None:
            where = [i for i, t in enumerate(self.ids) if t in strings]
            found = list(pattern.finditer(text))
            if len(found) == len(where) and all(
                m.group(0) == strings[self.ids[i]] for m, i in zip(found, where)
            ):
                self._ends = [m.end() for m in found]
                self._starts = [(m.start(), i) for m, i in zip(found, where)]
        self.cache: dict[int, int] = {0: 0, len(text): len(self.ids)}

    def at(self, pos: int, what: str) -> int:
        if pos not in self.cache:
            k = bisect.bisect_right(self._ends, pos) - 1  # the last special token ending at or before pos
            start, i0 = self._starts[k] if k >= 0 else (0, 0)
            n = self._check(start, i0, pos)
            if n is None and start > 0:  # not expected; the whole prefix decides
                n = self._check(0, 0, pos)
            if n is None:
                before, after = self.text[max(0, pos - 24) : pos], self.text[pos : pos + 24]
                raise RoleError(
                    f"tokenizer merges tokens across the {what} (character {pos}: ...{before!r} | "
                    f"{after!r}...): the text before it does not tokenise to a prefix of the whole "
                    "sequence, so no token boundary falls there; strip leading/trailing whitespace "
                    "from the message content, or use a template/tokenizer that splits there",
                    TOKEN_MERGE,
                )
            self.cache[pos] = n
        return self.cache[pos]

    def _check(self, start: int, i0: int, pos: int) -> int | None:
        piece = tokenize(self.tokenizer, self.text[start:pos])
        return i0 + len(piece) if self.ids[i0 : i0 + len(piece)] == piece else None


def _special_pattern(tokenizer: Any) -> tuple[re.Pattern | None, dict[int, str]]:
    """A regex finding the tokenizer's added tokens in text (longest first at each position) and
    {id: string} of those tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = {int(i): str(getattr(t, "content", t)) for i, t in decoder.items()}
    strings = {i: s for i, s in strings.items() if s}
    if not strings:
        return None, {}
    return _compile_alternation(tuple(sorted(set(strings.values()), key=lambda x: (-len(x), x)))), strings


@functools.lru_cache(maxsize=16)
def _compile_alternation(strings: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(x) for x in strings))


def default_end_token_ids(tokenizer: Any) -> list[int]:
    """eos plus whichever of ``DEFAULT_END_TOKENS`` the tokenizer has as a special token (Gemma's
    vocabulary has ``</s>`` as ordinary text, an HTML tag: not an end of turn there)."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token in DEFAULT_END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        # Missing tokens map to unk (or None): only the unk token itself may legitimately have unk's id.
        if tid is None or (tid == unk_id and token != unk) or tid in ids:
            continue
        if added and not getattr(added.get(tid), "special", False):
            continue
        ids.append(int(tid))
    return ids


def _end_ids(tokenizer: Any, end_token_ids: int | Iterable[int] | None) -> frozenset[int]:
    if end_token_ids is None:
        ids = default_end_token_ids(tokenizer)
        if not ids:
            raise RoleError(
                "the tokenizer has no eos token and none of "
                f"{', '.join(DEFAULT_END_TOKENS)}: pass end_token_ids=[...] with the end-of-turn id(s)",
                NO_END_TOKEN,
            )
        return frozenset(ids)
    if isinstance(end_token_ids, int):
        return frozenset([end_token_ids])
    ids = [int(x) for x in end_token_ids]
    if not ids:
        raise RoleError(
            "end_token_ids is empty: give at least one end-of-turn token id, or None for the default",
            BAD_ARGUMENT,
        )
    return frozenset(ids)


def _token_names(tokenizer: Any, ids: Iterable[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in sorted(ids))


def _check_no_end_text(tokenizer: Any, content: str, end_ids: frozenset[int], msg_i: int) -> None:
    # End-token text inside the content (e.g. a literal "<|im_end|>") is tokenised as the end token
    # itself and would silently end the turn early: refuse it.
    for tid in end_ids:
        text = tokenizer.convert_ids_to_tokens(tid)
        if isinstance(text, str) and text and text in content and tokenize(tokenizer, text) == [tid]:
            raise RoleError(
                f"assistant message {msg_i} contains the end-of-turn text {text!r} inside its content: "
                "it would end the turn early; remove or escape it in the data",
                END_TOKEN_IN_CONTENT,
            )
