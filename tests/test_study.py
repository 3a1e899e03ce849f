"""The study's statistics and summary, on hand-made results (the training and evaluation they
summarise are tested elsewhere)."""

from __future__ import annotations

import json
import math

import pytest

from speed_train.eval.study import (
    arm_name,
    bootstrap_diff,
    compare,
    markdown,
    mcnemar_p,
    pilot_rows,
    read_runs,
)


def test_mcnemar_exact_values():
    # 6 pairs discordant, 5 one way, 1 the other: p = 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * 7/64
    a = [True] * 5 + [False] + [True] * 4
    b = [False] * 5 + [True] + [True] * 4
    assert mcnemar_p(a, b) == pytest.approx(2 * 7 / 64)
    assert mcnemar_p(a, a) == 1.0  # no discordant pair
    assert mcnemar_p([True] * 10, [False] * 10) == pytest.approx(2 / 2**10)


def test_bootstrap_difference_is_paired_and_averaged_over_tasks():
    a = {"t1": [True, True, False, False], "t2": [True] * 4}
    b = {"t1": [True, False, False, False], "t2": [True, True, True, False]}
    out = bootstrap_diff(a, b, reps=500)
    assert out["diff"] == pytest.approx(100 * (0.25 + 0.25) / 2)  # average of per-task differences
    lo, hi = out["ci95"]
    assert lo <= out["diff"] <= hi and out["se"] > 0
    same = bootstrap_diff(a, a, reps=200)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["se"] == 0  # paired: identical arms


def test_compare_labels_noise():
    correct = {
        "A": {"t": [True] * 200},
        "B": {"t": [True] * 100 + [False] * 100},
        "C": {"t": [True] * 199 + [False]},
    }
    far = compare("A", "B", correct)
    assert far["beyond_noise"] and far["diff"] == pytest.approx(50) and far["discordant"] == 100
    near = compare("A", "C", correct)
    assert not near["beyond_noise"] and near["mcnemar_p_pooled"] == 1.0


def test_read_runs_names_and_summary(tmp_path):
    rows = [
        {"k": 30, "num_layers": 30, "anchor": "bos", "heldout_full_depth": 2.0, "heldout_after": 1.0},
        {
            "k": 22,
            "num_layers": 30,
            "anchor": "none",
            "heldout_full_depth": 2.0,
            "heldout_speed_zero_shot": 3.5,
            "heldout_after": 1.2,
            "heldout_after_full_depth": 1.4,
        },
        {
            "k": 22,
            "num_layers": 30,
            "anchor": "bos",
            "heldout_full_depth": 2.0,
            "heldout_speed_zero_shot": 2.8,
            "heldout_after": 1.1,
            "heldout_after_full_depth": 1.3,
        },
    ]
    for i, r in enumerate(rows):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    (tmp_path / "3").mkdir()  # an unfinished job: no results.json
    runs = read_runs(tmp_path)
    assert [arm_name(r) for r in runs] == ["Full-IT", "SPEED-22", "SPEED-22+BoS"]
    pilot = pilot_rows([{**rows[2], "k": 16, "heldout_after": 1.5}], runs)
    assert [(p["k"], p["heldout_after"]) for p in pilot] == [(16, 1.5), (22, 1.1)]
    study = {
        "arms": runs,
        "olmes": {
            r["name"]: [{"task": "t", "n": 2, "primary_metric": "acc_raw", "primary": 0.5}] for r in runs
        },
        "comparisons": [
            compare(
                "SPEED-22+BoS",
                "Full-IT",
                {"SPEED-22+BoS": {"t": [True, False]}, "Full-IT": {"t": [True, True]}},
            )
        ],
        "pilot": pilot,
    }
    md = markdown(study)
    assert (
        "| SPEED-22 | 2.0000 | 3.5000 | 1.2000 | 1.4000 |" in md
        and "| Full-IT | 2.0000 |  | 1.0000 |  |" in md
    )
    assert "| t | 2 | acc_raw | 50.0 | 50.0 | 50.0 |" in md and "| SPEED-22+BoS - Full-IT | -50.00 |" in md
    assert math.isfinite(study["comparisons"][0]["se"])
