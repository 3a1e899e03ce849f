"""The ``!function`` helpers of the offline tasks; copied as ``utils.py`` next to the written YAMLs.

lm-eval resolves ``!function utils.name`` to ``<yaml folder>/utils.py``, so this file's source is
written there verbatim by :func:`speed_train.eval.lm_eval_tasks.write_offline_tasks`; it must stay
self-contained (no speed_train imports). The logic is the minimal copy of lm-eval 0.4.13's stock
helpers, so prompts match the stock tasks exactly:

* ``preprocess`` / ``process_docs``: ``lm_eval/tasks/hellaswag/utils.py``
* ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``: ``lm_eval/tasks/winogrande/preprocess_winogrande.py``
  (partial evaluation: the choices are the sentence up to the blank filled with each option, the
  continuation is the rest of the sentence, and ``doc_to_text`` returns the gold option's index)
"""

import re


# ---- HellaSwag -------------------------------------------------------------------------------
def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset):
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# ---- WinoGrande ------------------------------------------------------------------------------
def doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
