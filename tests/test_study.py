"""The study's design checks, statistics and summary, on hand-made results (the training and
evaluation they summarise are tested elsewhere)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speed_train.eval import study as S


def test_mcnemar_exact_values():
    # 6 pairs discordant, 5 one way, 1 the other: p = 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * 7/64
    a = [True] * 5 + [False] + [True] * 4
    b = [False] * 5 + [True] + [True] * 4
    assert S.mcnemar_p(a, b) == pytest.approx(2 * 7 / 64)
    assert S.mcnemar_p(a, a) == 1.0  # no discordant pair
    assert S.mcnemar_p([True] * 10, [False] * 10) == pytest.approx(2 / 2**10)


def test_bootstrap_is_paired_averaged_over_tasks_and_resamples_seeds():
    # 2 seeds x 4 questions per task
    a = {"t1": np.array([[1, 1, 0, 0], [1, 1, 1, 0]]), "t2": np.ones((2, 4))}
    b = {"t1": np.array([[1, 0, 0, 0], [1, 1, 1, 0]]), "t2": np.array([[1, 1, 1, 0], [1, 1, 1, 1]])}
    out = S.bootstrap_diff(a, b, reps=500)
    # per task: mean over seeds and questions of a - b; then the average over tasks
    assert out["diff"] == pytest.approx(100 * ((1 / 8) + (1 / 8)) / 2)
    assert out["ci95"][0] <= out["ci90"][0] <= out["diff"] <= out["ci90"][1] <= out["ci95"][1]
    same = S.bootstrap_diff(a, a, reps=200)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["se"] == 0  # paired: identical arms
    # a difference that lives in one seed only: fixing the seeds narrows the interval
    a2 = {"t": np.array([[1] * 50, [0] * 50])}
    b2 = {"t": np.zeros((2, 50))}
    wide, narrow = S.bootstrap_diff(a2, b2, reps=400), S.bootstrap_diff(a2, b2, reps=400, seeds=False)
    assert narrow["ci95"] == [50.0, 50.0] and wide["ci95"][0] == 0.0 and wide["ci95"][1] == 100.0


def test_compare_labels_noise_and_equivalence():
    n = 400
    rng = np.random.default_rng(0)
    base = rng.random((3, n)) < 0.5
    flip = base.copy()
    flip[:, :4] = ~flip[:, :4]  # 4 of 400 questions change in every seed: |diff| <= 1 point
    far = base.copy()
    far[:, : n // 2] = True  # about 25 points better
    correct = {"A": {"t": base}, "B": {"t": flip}, "C": {"t": far}}
    near = S.compare("A", "B", correct, reps=500)
    assert not near["beyond_noise"] and near["equivalent"] == {"1": True, "2": True}
    assert near["discordant"] == 12 and near["pairs"] == 3 * n
    big = S.compare("C", "A", correct, reps=500)
    assert big["beyond_noise"] and big["equivalent"] == {"1": False, "2": False} and big["diff"] > 20
    assert big["mcnemar_p_pooled"] < 1e-10 and set(big["per_task_diff"]) == {"t"}


def test_uninformative_tasks_are_those_with_one_answer_everywhere():
    preds = {
        "A": {"boolq": np.zeros((3, 5)), "piqa": np.zeros((3, 5))},
        "B": {"boolq": np.zeros((3, 5)), "piqa": np.array([[0, 0, 0, 0, 1]] + [[0] * 5] * 2)},
    }
    assert S.uninformative_tasks(preds) == ["boolq"]


def test_parse_questions():
    q = S.parse_questions(None, None)
    assert q["arc_easy"] is None and q["openbookqa"] is None and q["hellaswag"] == 400 and q["csqa"] == 500
    assert S.parse_questions("hellaswag=all,piqa=20", None)["hellaswag"] is None
    assert S.parse_questions("piqa=20", 8) == {t: (8 if t != "piqa" else 8) for t in q}
    with pytest.raises(S.StudyError, match="give task=N or task=all"):
        S.parse_questions("hella=3", None)


def write_run(folder, job, **r):
    d = folder / str(job)
    d.mkdir(parents=True)
    base = {
        "num_layers": 30,
        "anchor": "bos",
        "add_bos": "auto",
        "heldout_fingerprint": "h",
        "data_fingerprint": f"d{r.get('seed', 0)}",
        "heldout_full_depth": 2.0,
        "heldout_after": 1.0,
        "heldout_by_source": {"heldout_after": {"sciq": 1.1, "nq_open": 0.9}},
        "heldout_examples": {"sciq": 3, "nq_open": 2},
        "fit_seconds": 10.0,
    }
    (d / "results.json").write_text(json.dumps({**base, **r}))
    return d


ARMS = [
    dict(k=30),
    dict(k=22, anchor="none", heldout_speed_zero_shot=3.0),
    dict(k=22, heldout_speed_zero_shot=2.5),
]


def make_grid(tmp_path, seeds=(0, 1)):
    job = 0
    for s in seeds:
        for arm in ARMS:
            write_run(tmp_path / "sweep", job, seed=s, **arm)
            job += 1
    return S.read_runs(tmp_path / "sweep")


def test_design_checks_refuse_what_is_not_a_controlled_study(tmp_path):
    runs = make_grid(tmp_path)
    design = S.check_design(runs)
    assert design["arms"] == ["Full-IT", "SPEED-22", "SPEED-22+BoS"] and design["seeds"] == [0, 1]
    with pytest.raises(S.StudyError, match="incomplete study: no finished run for SPEED-22 seed 1"):
        S.check_design([r for r in runs if not (r["name"] == "SPEED-22" and r["seed"] == 1)])
    other = [dict(r) for r in runs]
    other[4]["data_fingerprint"] = "another order"
    with pytest.raises(S.StudyError, match="seed 1: the arms did not train on the same token ids"):
        S.check_design(other)
    other = [dict(r) for r in runs]
    other[0]["add_bos"] = "false"
    with pytest.raises(S.StudyError, match="the runs differ in add_bos"):
        S.check_design(other)
    write_run(tmp_path / "again", 0, seed=0, k=30)
    with pytest.raises(S.StudyError, match="Full-IT seed 0 twice"):
        S.read_runs(tmp_path / "sweep", tmp_path / "again")


def test_select_seeds_keeps_a_complete_subset(tmp_path):
    runs = make_grid(tmp_path, seeds=(0, 1, 2))
    partial = [r for r in runs if not (r["name"] == "SPEED-22" and r["seed"] == 1)]
    with pytest.raises(S.StudyError, match="no finished run for SPEED-22 seed 1"):
        S.check_design(partial)
    kept = S.select_seeds(partial, "0,2")
    assert sorted((r["name"], r["seed"]) for r in kept) == sorted(
        (a, s) for a in ("Full-IT", "SPEED-22", "SPEED-22+BoS") for s in (0, 2)
    )
    assert S.check_design(kept)["seeds"] == [0, 2]
    with pytest.raises(
        S.StudyError, match=r"--seeds 0,5: no finished run with seed\(s\) \[5\]; found \[0, 1, 2\]"
    ):
        S.select_seeds(partial, "0,5")
    with pytest.raises(S.StudyError, match="--seeds 'a': a comma list of integers"):
        S.select_seeds(partial, "a")


def test_summary_tables_from_units(tmp_path):
    runs = make_grid(tmp_path)
    design = S.check_design(runs)
    units = {}
    for r in runs:
        good = {"Full-IT": 3, "SPEED-22": 1, "SPEED-22+BoS": 2}[r["name"]] + r["seed"]
        units[r["name"], r["seed"], "piqa"] = {
            "n": 4,
            "primary_metric": "acc_per_char",
            "correct": [i < good for i in range(4)],
            "predictions": [0 if i < good else 1 for i in range(4)],
            "seconds": 1.0,
        }
        units[r["name"], r["seed"], "boolq"] = {  # every run answers 0 everywhere: no signal
            "n": 2,
            "primary_metric": "acc_raw",
            "correct": [True, False],
            "predictions": [0, 0],
            "seconds": 1.0,
        }
    study = S.summarise(
        runs, design, units, S.pilot_rows([{**ARMS[2], "k": 16, "seed": 0, "heldout_after": 1.5}], runs)
    )
    assert study["uninformative_tasks"] == ["boolq"]
    assert study["accuracy"]["Full-IT"]["piqa"] == {
        "mean": 87.5,
        "sd": pytest.approx(17.6776695),
        "values": [75.0, 100.0],
    }
    assert study["average"]["SPEED-22"]["values"] == [25.0, 50.0]  # boolq left out of the average
    assert study["correct"]["SPEED-22"]["1"]["piqa"] == [True, True, False, False]
    names = [(c["a"], c["b"]) for c in study["comparisons"]]
    assert names == [("SPEED-22", "Full-IT"), ("SPEED-22+BoS", "Full-IT"), ("SPEED-22+BoS", "SPEED-22")]
    assert study["comparisons"][0]["diff"] == pytest.approx(-50.0)
    assert study["heldout"]["SPEED-22"]["heldout_speed_zero_shot"]["mean"] == 3.0
    assert [(p["k"], p["heldout_after"]) for p in study["pilot"]] == [(16, 1.5), (22, 1.0)]
    md = S.markdown(study)
    assert "| boolq (no signal: reported apart) | 2 | acc_raw | 50.0 ± 0.0 |" in md
    assert (
        "| **average** (informative tasks) | | | **87.5 ± 17.7** | **37.5 ± 17.7** | **62.5 ± 17.7** |" in md
    )
    assert "| sciq | 3 | 1.1000 ± 0.0000 |" in md and "| SPEED-22 - Full-IT | -50.00 |" in md

    # one seed: no spread is claimed (the mean alone), and the header says the intervals are
    # over questions only
    one = [r for r in runs if r["seed"] == 0]
    study1 = S.summarise(one, S.check_design(one), {k: v for k, v in units.items() if k[1] == 0})
    assert study1["average"]["Full-IT"] == {"mean": 75.0, "sd": None, "values": [75.0]}
    md1 = S.markdown(study1)
    assert md1.startswith("One seed (0): no spread over seeds, and the intervals are over questions only.")
    assert "| **average** (informative tasks) | | | **75.0** | **25.0** | **50.0** |" in md1


def test_evaluation_resumes_from_finished_units(tmp_path, monkeypatch):
    import speed_train.eval.run as run_mod

    runs = make_grid(tmp_path, seeds=(0,))
    task = S.load_task("piqa", "rc_0shot", limit=2)
    for r in runs:
        path = S.unit_path(tmp_path / "work", r, "piqa")
        path.parent.mkdir(parents=True)
        unit = {"n": 2, "correct": [True, False], "predictions": [0, 0], "primary_metric": "acc_per_char"}
        path.write_text(json.dumps({**unit, "doc_ids": [d.doc_id for d in task.docs]}))

    def no_model(*a, **k):
        raise AssertionError("a finished unit was evaluated again")

    monkeypatch.setattr(run_mod, "load_eval_model", no_model)
    assert S.evaluate_all(runs, [task], tmp_path / "work", "smollm2", 8, 1) >= 0
    with pytest.raises(S.StudyError, match="no exported LoRA adapter"):
        S.evaluate_run(
            (runs[0], [S.load_task("boolq", "rc_0shot", limit=2)], tmp_path / "work", "smollm2", 8, None)
        )


def test_more_questions_extend_a_unit_and_equal_a_fresh_one(tmp_path, tok, monkeypatch):
    """Asked for more questions, the study scores only those its unit lacks; the extended unit
    equals one evaluated on all of them at once. A unit of other questions, of more questions than
    asked, or not a unit at all is refused before any model is loaded."""
    import speed_train.eval.run as run_mod
    from speed_train.speed.tiny import tiny_model

    model = tiny_model("llama", layers=4, vocab=len(tok))
    monkeypatch.setattr(run_mod, "load_eval_model", lambda *a, **k: (model, tok, None))
    scored = []
    real = run_mod.evaluate_task

    def spy(model_, tok_, cfg, task, **kw):
        scored.append([d.doc_id for d in task.docs])
        return real(model_, tok_, cfg, task, **kw)

    monkeypatch.setattr(run_mod, "evaluate_task", spy)
    S._LOADED.clear()
    run = {
        "name": "SPEED-2+BoS",
        "seed": 0,
        "k": 2,
        "num_layers": 4,
        "anchor": "bos",
        "export": {"adapter": "a"},
    }
    few, more = (S.load_task("piqa", "rc_0shot", limit=n) for n in (3, 7))
    ids = [d.doc_id for d in more.docs]
    S.evaluate_run((run, [few], tmp_path / "a", "smollm2", 2, None))
    S.evaluate_run((run, [more], tmp_path / "a", "smollm2", 2, None))
    assert scored == [ids[:3], ids[3:]]
    S.evaluate_run((run, [more], tmp_path / "b", "smollm2", 2, None))
    extended, fresh = (json.loads(S.unit_path(tmp_path / w, run, "piqa").read_text()) for w in "ab")
    for key in ("n", "doc_ids", "correct", "predictions", "primary", "primary_metric"):
        assert extended[key] == fresh[key], key
    assert extended["n"] == 7 and [s["n"] for s in extended["segments"]] == [3, 4]
    assert extended["seconds"] == pytest.approx(sum(s["seconds"] for s in extended["segments"]))

    # a unit written before question ids were recorded is the prefix in file order: extended too
    legacy = S.unit_path(tmp_path / "c", run, "piqa")
    legacy.parent.mkdir(parents=True)
    old = {
        k: v[:3] if isinstance(v, list) else v for k, v in fresh.items() if k not in ("doc_ids", "segments")
    }
    legacy.write_text(json.dumps({**old, "n": 3}))
    S.evaluate_run((run, [more], tmp_path / "c", "smollm2", 2, None))
    assert json.loads(legacy.read_text())["correct"] == fresh["correct"] and scored[-1] == ids[3:]

    n_scored = len(scored)
    with pytest.raises(S.StudyError, match="holds 7 questions, more than the 3 --questions asks for piqa"):
        S.evaluate_all([run], [few], tmp_path / "b", "smollm2", 2, 1)
    other = S.unit_path(tmp_path / "d", run, "piqa")
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({**old, "n": 3, "doc_ids": ids[1:4]}))
    with pytest.raises(S.StudyError, match="holds other questions than the first 3 of piqa"):
        S.evaluate_all([run], [more], tmp_path / "d", "smollm2", 2, 1)
    other.write_text(json.dumps({"n": 3, "correct": [True]}))
    with pytest.raises(S.StudyError, match="not a study unit"):
        S.evaluate_all([run], [more], tmp_path / "d", "smollm2", 2, 1)
    assert len(scored) == n_scored
