"""The controlled study: Full-IT vs SPEED-K vs SPEED-K+BoS over seeds, and the LoRA pilot over K.

    python -m speed_train -m +experiment=small_study                           # 3 arms x 3 seeds
    python -m speed_train -m +experiment=small_study speed=speed_k_bos speed.k=16,20,25,28 trainer.seed=0
    python -m speed_train.eval.study multirun/small_study/<arms> [<more arms folders>] \\
        --pilot multirun/small_study/<pilot> --workers 2 --out docs/reproduction

Design checks first (refused otherwise): every arm has the same seeds, and the runs of one seed
trained on the same token ids in the same order (``data_fingerprint``), scored the same held-out
set (``heldout_fingerprint``) under the same BoS rule. Arms differ in visibility only.

Evaluation: the OLMES-style suite on each run's exported adapter as served (``rc_0shot``, the
primary metric per task, fp32), ``--questions`` per task (default: every question of ARC-Easy,
ARC-Challenge and OpenBookQA; 400 of HellaSwag, PIQA and MMLU, 300 of BoolQ, 500 of the others). Each (arm, seed, task) is one unit,
written to ``--work`` as it finishes: a killed study continues where it stopped, and a study
asked for more questions of a task scores only the questions its units do not hold yet (a task's
questions are always its first N in file order, so a unit of N is the prefix of a unit of M > N;
units record their question ids, and one that holds other questions, or more than asked, is
refused before any scoring).
``--workers`` evaluates runs in that many processes of one thread each.

Statistics (numpy; the tests check them on hand-made data):

- per arm: the task accuracies averaged over seeds, and their spread over seeds;
- a task on which every run gives the same answer to every question carries no signal: it is
  reported apart and left out of the averages;
- paired comparisons of two arms: the difference of task-averaged accuracy (points), with a
  hierarchical bootstrap over seeds (the same seeds drawn for both arms) and, within each task,
  over questions (the same questions for both): standard error, 95% interval, and the 90%
  interval of the two one-sided tests (TOST): equivalence within +-d when it lies inside
  (-d, +d), for d = 1 and 2 points; McNemar's exact test on the pooled (seed, question) pairs;
  the interval with the seeds held fixed shows how much of the width is training variance;
- held-out decode-token loss: mean and spread over seeds per arm, and per source.

Writes small_study.json (``correct[arm][seed][task]``: booleans in question order; the BoS rule;
the held-out composition; wall times), small_study.md and small_study_pilot.png into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np

from speed_train.atomic import save_figure, write_json, write_text
from speed_train.cli import ArgumentParser
from speed_train.eval.olmes import MC_TASKS, EvalError, Task, load_task

HELDOUT_ROWS = ("heldout_full_depth", "heldout_speed_zero_shot", "heldout_after", "heldout_after_full_depth")
ALL_QUESTIONS = ("arc_easy", "arc_challenge", "openbookqa")
# the other tasks: a fixed number of questions each (their first ones), fewer where a question costs
# more (long contexts or choices: HellaSwag, PIQA, MMLU; BoolQ carried no signal before)
DEFAULT_QUESTIONS = {"hellaswag": 400, "piqa": 400, "mmlu": 400, "boolq": 300}
DEFAULT_OTHER = 500
TOST_MARGINS = (1.0, 2.0)


class StudyError(ValueError):
    """The runs do not form a controlled study (or cannot be read)."""


def arm_name(r: dict) -> str:
    if r["k"] >= r["num_layers"]:
        return "Full-IT"
    return f"SPEED-{r['k']}" + ("+BoS" if r["anchor"] == "bos" else "")


def read_runs(*sweeps: str | Path) -> list[dict]:
    """Every finished job of the multirun folders: its results.json (+ ``dir``, ``name``)."""
    runs = []
    for sweep in sweeps:
        if not Path(sweep).is_dir():
            raise StudyError(f"{sweep}: no such multirun folder")
        jobs = sorted(
            (p for p in Path(sweep).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
        )
        for job in jobs:
            f = job / "results.json"
            if not f.is_file():
                continue
            r = json.loads(f.read_text(encoding="utf-8"))
            if r.get("preempted_by_signal"):  # stopped early: resume it first
                continue
            r["dir"], r["name"] = str(job), arm_name(r)
            r.setdefault("seed", 0)
            runs.append(r)
    if not runs:
        raise StudyError(f"{', '.join(map(str, sweeps))}: no finished job (no <n>/results.json)")
    seen: dict[tuple[str, int], str] = {}
    for r in runs:
        key = (r["name"], r["seed"])
        if key in seen:
            raise StudyError(f"{r['name']} seed {r['seed']} twice: {seen[key]} and {r['dir']}")
        seen[key] = r["dir"]
    return runs


def select_seeds(runs: list[dict], seeds: str) -> list[dict]:
    """The runs of the training seeds in ``seeds`` (a comma list), each of which must exist."""
    try:
        wanted = {int(x) for x in seeds.split(",") if x.strip()}
    except ValueError:
        raise StudyError(f"--seeds {seeds!r}: a comma list of integers") from None
    found = {r["seed"] for r in runs}
    if not wanted or wanted - found:
        raise StudyError(
            f"--seeds {seeds}: no finished run with seed(s) {sorted(wanted - found)}; found {sorted(found)}"
        )
    return [r for r in runs if r["seed"] in wanted]


def check_design(runs: list[dict]) -> dict:
    """The arms x seeds grid is complete and, per seed, the arms saw identical tokens."""
    arms = sorted({r["name"] for r in runs}, key=_arm_order)
    seeds = sorted({r["seed"] for r in runs})
    grid = {(r["name"], r["seed"]): r for r in runs}
    missing = [f"{a} seed {s}" for a in arms for s in seeds if (a, s) not in grid]
    if missing:
        raise StudyError(f"incomplete study: no finished run for {', '.join(missing)}")
    for key in ("add_bos", "heldout_fingerprint"):
        values = {str(r.get(key)) for r in runs}
        if len(values) > 1:
            raise StudyError(
                f"the runs differ in {key} ({', '.join(sorted(values))}): arms must score the same tokens"
            )
    for s in seeds:
        prints = {grid[a, s].get("data_fingerprint") for a in arms}
        if len(prints) > 1 or None in prints or "" in prints:
            raise StudyError(
                f"seed {s}: the arms did not train on the same token ids in the same order "
                f"(data_fingerprint differs or is missing): {', '.join(grid[a, s]['dir'] for a in arms)}"
            )
    return {
        "arms": arms,
        "seeds": seeds,
        "add_bos": runs[0].get("add_bos"),
        "precision": sorted({str(r.get("precision")) for r in runs}),
        "heldout_fingerprint": runs[0].get("heldout_fingerprint"),
        "data_fingerprints": {str(s): grid[arms[0], s].get("data_fingerprint") for s in seeds},
    }


def _arm_order(name: str) -> tuple[int, str]:
    return (0 if name == "Full-IT" else 1 if not name.endswith("+BoS") else 2, name)


# -- statistics ---------------------------------------------------------------------------------


def mcnemar_p(a, b) -> float:
    """Two-sided exact McNemar test of paired correctness (binomial on the discordant pairs)."""
    a, b = np.asarray(a, bool).ravel(), np.asarray(b, bool).ravel()
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_diff(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, reps: int = 4000, seed: int = 0, seeds: bool = True
) -> dict:
    """Difference of task-averaged accuracy (a - b, points). ``a[task]``/``b[task]``: [seeds,
    questions] booleans, paired. Each bootstrap draw resamples seeds (when ``seeds``, jointly for
    every task) and, per task, questions; returns the point difference, standard error, the 95%
    and 90% percentile intervals."""
    rng = np.random.default_rng(seed)
    tasks = sorted(a)
    diffs = {t: np.asarray(a[t], float) - np.asarray(b[t], float) for t in tasks}
    n_seeds = next(iter(diffs.values())).shape[0]
    point = 100 * float(np.mean([d.mean() for d in diffs.values()]))
    draws = np.empty(reps)
    for i in range(reps):
        s = rng.integers(0, n_seeds, n_seeds) if seeds else np.arange(n_seeds)
        total = 0.0
        for t in tasks:
            d = diffs[t][s]
            total += d[:, rng.integers(0, d.shape[1], d.shape[1])].mean()
        draws[i] = 100 * total / len(tasks)
    q = np.quantile(draws, [0.025, 0.975, 0.05, 0.95])
    return {
        "diff": point,
        "se": float(draws.std(ddof=1)),
        "ci95": [float(q[0]), float(q[1])],
        "ci90": [float(q[2]), float(q[3])],
    }


def compare(name_a: str, name_b: str, correct: dict[str, dict[str, np.ndarray]], reps: int = 4000) -> dict:
    """Paired comparison of two arms over the tasks of ``correct[arm][task]`` ([seeds, questions])."""
    a, b = correct[name_a], correct[name_b]
    boot = bootstrap_diff(a, b, reps=reps)
    fixed = bootstrap_diff(a, b, reps=reps, seeds=False)
    lo, hi = boot["ci95"]
    lo90, hi90 = boot["ci90"]
    pooled_a = np.concatenate([np.asarray(a[t], bool).ravel() for t in sorted(a)])
    pooled_b = np.concatenate([np.asarray(b[t], bool).ravel() for t in sorted(a)])
    return {
        "a": name_a,
        "b": name_b,
        **boot,
        "ci95_seeds_fixed": fixed["ci95"],
        "beyond_noise": not lo <= 0.0 <= hi,
        "equivalent": {f"{m:g}": bool(-m < lo90 and hi90 < m) for m in TOST_MARGINS},
        "per_task_diff": {
            t: 100 * float(np.mean(np.asarray(a[t], float) - np.asarray(b[t], float))) for t in sorted(a)
        },
        "mcnemar_p_pooled": mcnemar_p(pooled_a, pooled_b),
        "mcnemar_p_per_task": {t: mcnemar_p(a[t], b[t]) for t in sorted(a)},
        "discordant": int((pooled_a != pooled_b).sum()),
        "pairs": int(pooled_a.size),
    }


def uninformative_tasks(predictions: dict[str, dict[str, np.ndarray]]) -> list[str]:
    """Tasks on which every run (arm, seed) predicts the same choice for every question.
    ``predictions[arm][task]``: [seeds, questions] predicted choice indices."""
    arms = list(predictions)
    out = []
    for t in predictions[arms[0]]:
        stacked = np.concatenate([np.asarray(predictions[a][t]) for a in arms])
        if (stacked == stacked[:1]).all():
            out.append(t)
    return out


def spread(values: list[float]) -> dict:
    v = np.asarray(values, float)
    # one seed has no spread: None, not 0 (printed as the mean alone)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "values": v.tolist()}


# -- evaluation units ---------------------------------------------------------------------------


def parse_questions(text: str | None, limit: int | None) -> dict[str, int | None]:
    """``task=N|all`` per task (None: every question); ``limit`` caps every task (quick runs)."""
    per = {t: (None if t in ALL_QUESTIONS else DEFAULT_QUESTIONS.get(t, DEFAULT_OTHER)) for t in MC_TASKS}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, n = item.partition("=")
        name = name.strip()
        if name not in per or not n:
            raise StudyError(
                f"--questions {item!r}: give task=N or task=all for tasks among {', '.join(MC_TASKS)}"
            )
        per[name] = None if n.strip() == "all" else int(n)
    if limit is not None:
        per = {t: limit if n is None else min(n, limit) for t, n in per.items()}
    return per


def unit_path(work: Path, run: dict, task: str) -> Path:
    return work / run["name"] / f"seed{run['seed']}" / f"{task}.json"


def read_unit(work: Path, run: dict, task: Task) -> dict | None:
    """The unit already evaluated for ``run`` on ``task`` (None: none yet), checked to hold a
    prefix of ``task``'s questions: the study extends it, never mixes questions."""
    path = unit_path(work, run, task.name)
    if not path.is_file():
        return None
    try:
        unit = json.loads(path.read_text(encoding="utf-8"))
        n = int(unit["n"])
        if len(unit["correct"]) != n or len(unit["predictions"]) != n:
            raise ValueError(f"{len(unit['correct'])} answers for n = {n}")
    except (ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{path}: not a study unit ({e}); delete it to evaluate that unit again") from e
    if n > len(task.docs):
        raise StudyError(
            f"{path} holds {n} questions, more than the {len(task.docs)} --questions asks for "
            f"{task.name}: ask for {n} (or more), or use another --work"
        )
    # units written before question ids were recorded hold the first n questions in file order,
    # the only selection this module makes
    ids = unit.get("doc_ids")
    if ids is not None and ids != [d.doc_id for d in task.docs[:n]]:
        raise StudyError(
            f"{path} holds other questions than the first {n} of {task.name} ({task.variant}): "
            "another task variant or request file; use another --work"
        )
    return unit


def complete(unit: dict | None, task: Task) -> bool:
    """The unit holds every question the study asks of ``task`` (``read_unit`` refuses more)."""
    return unit is not None and unit["n"] == len(task.docs)


def evaluate_run(job: tuple) -> list[str]:
    """Evaluate one run on the questions its units in ``work`` do not hold yet; returns the unit
    files it wrote."""
    run, tasks, work, base, batch_size, threads = job
    import torch

    from speed_train.eval.run import evaluate_task, load_eval_model
    from speed_train.speed.config import SpeedConfig

    if threads:
        torch.set_num_threads(threads)
    todo = [(t, u) for t in tasks if not complete(u := read_unit(work, run, t), t)]
    if not todo:
        return []
    adapter = (run.get("export") or {}).get("adapter")
    if adapter is None:
        raise StudyError(
            f"{run['dir']}: no exported LoRA adapter (the study trains LoRA arms with export.enabled)"
        )
    t0 = time.perf_counter()
    key = (base, adapter)
    if _LOADED.get("key") != key:  # a worker keeps the last model: consecutive jobs often share it
        _LOADED.clear()
        _LOADED["model"], _LOADED["tok"], _ = load_eval_model(base, adapter, "float32", "cpu")
        _LOADED["key"] = key
    model, tok = _LOADED["model"], _LOADED["tok"]
    load_seconds = time.perf_counter() - t0
    cfg = SpeedConfig(
        k=None if run["k"] >= run["num_layers"] else run["k"],
        anchor=run["anchor"],
        add_bos=run.get("add_bos", "auto"),
    )
    written = []
    for task, old in todo:
        have = 0 if old is None else old["n"]
        res = evaluate_task(
            model,
            tok,
            cfg,
            dataclasses.replace(task, docs=task.docs[have:]),
            batch_size=batch_size,
            metrics="primary",
        )
        metric = res["primary_metric"]
        if old is not None and old["primary_metric"] != metric:
            raise StudyError(
                f"{unit_path(work, run, task.name)} scored {old['primary_metric']}, not {metric}"
            )
        samples = res.pop("samples")
        predictions = (old["predictions"] if old else []) + [q["predictions"][metric] for q in samples]
        correct = (old["correct"] if old else []) + [q["predictions"][metric] == q["gold"] for q in samples]
        segments = (old.get("segments") or [{"n": have, "seconds": old["seconds"]}]) if old else []
        segments = [*segments, {"n": res["n"], "seconds": res["seconds"]}]
        unit = {
            "arm": run["name"],
            "seed": run["seed"],
            "task": task.name,
            "primary_metric": metric,
            "primary": float(np.mean(correct)),
            "n": len(correct),
            "seconds": sum(s["seconds"] for s in segments),
            "segments": segments,  # the questions each call scored, and its seconds
            "load_seconds": load_seconds,
            "doc_ids": [d.doc_id for d in task.docs],
            "correct": correct,
            "predictions": predictions,
        }
        path = unit_path(work, run, task.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, unit)
        written.append(str(path))
        print(
            f"{run['name']:14} seed {run['seed']} {task.name:14} {metric:13} {100 * unit['primary']:5.1f} "
            f"(+{res['n']} questions, {res['seconds']:.0f}s)",
            flush=True,
        )
    return written


_LOADED: dict = {}


def evaluate_all(runs, tasks, work: Path, base: str, batch_size: int, workers: int) -> float:
    """Every missing unit over ``workers`` one-thread processes, task by task (every run on a task
    before the next task: a study stopped early has whole tasks); wall seconds."""
    t0 = time.perf_counter()
    threads = 1 if workers > 1 else None
    jobs = [  # read_unit refuses a unit of other questions here, before any model is loaded
        (r, [t], work, base, batch_size, threads)
        for t in tasks
        for r in runs
        if not complete(read_unit(work, r, t), t)
    ]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(evaluate_run, jobs):
                pass
    else:
        for job in jobs:
            evaluate_run(job)
    return time.perf_counter() - t0


# -- the study ----------------------------------------------------------------------------------


def summarise(runs: list[dict], design: dict, units: dict, pilot: list[dict] | None = None) -> dict:
    """The study's numbers from its runs and evaluated units (``units[(arm, seed, task)]``)."""
    arms, seeds = design["arms"], design["seeds"]
    tasks = [t for t in MC_TASKS if all((a, s, t) in units for a in arms for s in seeds)]
    correct = {a: {t: np.array([units[a, s, t]["correct"] for s in seeds]) for t in tasks} for a in arms}
    preds = {a: {t: np.array([units[a, s, t]["predictions"] for s in seeds]) for t in tasks} for a in arms}
    flat = uninformative_tasks(preds)
    used = [t for t in tasks if t not in flat]
    accuracy = {
        a: {t: spread([100 * float(np.mean(units[a, s, t]["correct"])) for s in seeds]) for t in tasks}
        for a in arms
    }
    average = {
        a: spread([100 * float(np.mean([np.mean(units[a, s, t]["correct"]) for t in used])) for s in seeds])
        for a in arms
    }
    full = "Full-IT" if "Full-IT" in arms else None
    pairs = [(a, full) for a in arms if full and a != full] + [
        (a, b) for a in arms for b in arms if a.endswith("+BoS") and b == a.removesuffix("+BoS")
    ]
    informative = {a: {t: correct[a][t] for t in used} for a in arms}
    comparisons = [compare(a, b, informative) for a, b in pairs] if used else []
    grid = {(r["name"], r["seed"]): r for r in runs}
    heldout = {
        a: {row: spread([grid[a, s][row] for s in seeds]) for row in HELDOUT_ROWS if row in grid[a, seeds[0]]}
        for a in arms
    }
    by_source = {
        a: {
            src: spread([grid[a, s]["heldout_by_source"]["heldout_after"][src] for s in seeds])
            for src in grid[a, seeds[0]].get("heldout_by_source", {}).get("heldout_after", {})
        }
        for a in arms
    }
    first = grid[arms[0], seeds[0]]
    return {
        "design": design,
        "tasks": {
            t: {
                "n": units[arms[0], seeds[0], t]["n"],
                "primary_metric": units[arms[0], seeds[0], t]["primary_metric"],
            }
            for t in tasks
        },
        "uninformative_tasks": flat,
        "accuracy": accuracy,
        "average": average,
        "comparisons": comparisons,
        "heldout": heldout,
        "heldout_after_by_source": by_source,
        "heldout_examples": first.get("heldout_examples", {}),
        "runs": [
            {
                k: r.get(k)
                for k in (
                    "name",
                    "seed",
                    "k",
                    "num_layers",
                    "anchor",
                    "global_step",
                    "fit_seconds",
                    "heldout_seconds",
                    "precision",
                    "dir",
                )
            }
            for r in sorted(runs, key=lambda r: (_arm_order(r["name"]), r["seed"]))
        ],
        "correct": {
            a: {str(s): {t: [bool(x) for x in units[a, s, t]["correct"]] for t in tasks} for s in seeds}
            for a in arms
        },
        "eval_seconds": {
            a: {str(s): {t: units[a, s, t]["seconds"] for t in tasks} for s in seeds} for a in arms
        },
        "pilot": pilot,
    }


def main(argv=None) -> dict:
    ap = ArgumentParser(
        prog="python -m speed_train.eval.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("arms", nargs="+", help="the multirun folder(s) of `+experiment=small_study`")
    ap.add_argument("--pilot", default=None, help="the multirun folder of the pilot over K")
    ap.add_argument("--base", default="smollm2", help="the base model the adapters were trained on")
    ap.add_argument("--variant", default="rc_0shot")
    ap.add_argument(
        "--questions",
        default=None,
        help=f"task=N or task=all, comma separated (default: all of {', '.join(ALL_QUESTIONS)}, "
        f"{DEFAULT_QUESTIONS}, {DEFAULT_OTHER} of the others)",
    )
    ap.add_argument(
        "--evaluate-only",
        action="store_true",
        help="evaluate the finished runs' missing units and stop (no design check, no summary): "
        "start evaluating while other runs still train",
    )
    ap.add_argument(
        "--limit", type=int, default=None, help="at most this many questions per task (quick runs)"
    )
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma list: only these training seeds (default: every seed found; the grid must be complete)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--workers", type=int, default=1, help="processes of one thread each (runs spread over them)"
    )
    ap.add_argument("--work", default=None, help="per-unit results (default: <first arms folder>/study_eval)")
    ap.add_argument("--out", default="docs/reproduction")
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except (StudyError, EvalError) as e:
        raise SystemExit(f"error: {e}") from None


def _main(args) -> dict:
    t0 = time.perf_counter()
    if args.workers < 1 or args.batch_size < 1:
        raise StudyError("--workers and --batch-size must be at least 1")
    runs = read_runs(*args.arms)
    if args.seeds is not None:
        runs = select_seeds(runs, args.seeds)
    design = None if args.evaluate_only else check_design(runs)
    per_task = parse_questions(args.questions, args.limit)
    tasks = [load_task(t, args.variant, limit=n) for t, n in per_task.items()]  # every file checked first
    work = Path(args.work or Path(args.arms[0]) / "study_eval")
    eval_wall = evaluate_all(runs, tasks, work, args.base, args.batch_size, args.workers)
    if design is None:
        print(f"evaluated {len(runs)} finished run(s) in {eval_wall / 60:.1f} min; units in {work}")
        return {"evaluated": [f"{r['name']} seed {r['seed']}" for r in runs], "work": str(work)}
    units = {}
    for r in runs:
        for t in tasks:
            unit = read_unit(work, r, t)
            if not complete(unit, t):  # evaluate_all wrote them: never expected
                raise StudyError(
                    f"{unit_path(work, r, t.name)}: not evaluated on all {len(t.docs)} questions"
                )
            units[r["name"], r["seed"], t.name] = unit
    pilot = None
    if args.pilot:
        pilot = pilot_rows(read_runs(args.pilot), runs)
    study = summarise(runs, design, units, pilot)
    study["args"] = vars(args)
    study["wall_seconds"] = {
        "training": {f"{r['name']} seed {r['seed']}": r.get("fit_seconds") for r in runs},
        "evaluation_this_call": eval_wall,
        "evaluation_units": sum(u["seconds"] + 0.0 for u in units.values()),
        "total_this_call": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if pilot:
        plot_pilot(pilot, study, out / "small_study_pilot.png")
    write_json(out / "small_study.json", study)
    write_text(out / "small_study.md", markdown(study))
    print(markdown(study))
    return study


def pilot_rows(pilot: list[dict], arms: list[dict]) -> list[dict]:
    """Held-out rows per K: the pilot's runs and the SPEED-K+BoS arm of the pilot's seed."""
    seed = pilot[0].get("seed", 0)
    rows = {
        r["k"]: r
        for r in [*pilot, *(a for a in arms if a["name"].endswith("+BoS") and a.get("seed", 0) == seed)]
    }
    return [{"k": k, "seed": seed, **{h: rows[k].get(h) for h in HELDOUT_ROWS}} for k in sorted(rows)]


def plot_pilot(rows: list[dict], study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["heldout_after"] for r in rows], "o-", label="SPEED-K+BoS after LoRA (served)")
    ax.plot(ks, [r["heldout_speed_zero_shot"] for r in rows], "s--", label="SPEED-K+BoS zero-shot")
    full = study["heldout"].get("Full-IT")
    if full is not None:
        m, sd = full["heldout_after"]["mean"], full["heldout_after"]["sd"]
        ax.axhline(
            m,
            color="k",
            lw=1,
            label=f"Full-IT after LoRA (mean of {len(full['heldout_after']['values'])} seeds)",
        )
        if sd is not None:
            ax.axhspan(m - sd, m + sd, color="k", alpha=0.08)
        ax.axhline(full["heldout_full_depth"]["mean"], color="gray", lw=1, ls=":", label="full depth, before")
    diag = Path(__file__).resolve().parents[2] / "docs" / "reproduction" / "diagnostics.json"
    if diag.is_file():
        auto_k = json.loads(diag.read_text()).get("auto_k")
        if auto_k:
            ax.axvline(auto_k, color="tab:red", lw=1, ls="--", label=f"auto-K = {auto_k}")
    ax.set_xlabel("cutoff K (of 30 layers)")
    ax.set_ylabel("held-out decode-token loss")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _pm(s: dict, digits: int = 1) -> str:
    if s["sd"] is None:  # one seed
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def markdown(study: dict) -> str:
    """The tables of docs/REPRODUCTION.md section 4."""
    arms, seeds = study["design"]["arms"], study["design"]["seeds"]
    lines = [
        (
            f"Seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds."
            if len(seeds) > 1
            else f"One seed ({seeds[0]}): no spread over seeds, and the intervals are over questions only."
        )
        + " BoS rule: add_bos="
        f"{study['design']['add_bos']}; precision: {', '.join(study['design']['precision'])}.",
        "",
        "| arm | before: full depth | before: SPEED zero-shot | after: as served | after: same weights, full depth |",
        "|---|---|---|---|---|",
    ]
    cell = lambda h, row: _pm(h[row], 4) if row in h else ""  # noqa: E731
    for a in arms:
        h = study["heldout"][a]
        lines.append(f"| {a} | " + " | ".join(cell(h, row) for row in HELDOUT_ROWS) + " |")
    sources = list(study.get("heldout_examples") or {})
    if sources:
        lines += ["", "| held-out source | n | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
        for src in sources:
            cells = [
                _pm(study["heldout_after_by_source"][a][src], 4)
                if src in study["heldout_after_by_source"][a]
                else ""
                for a in arms
            ]
            lines.append(f"| {src} | {study['heldout_examples'][src]} | " + " | ".join(cells) + " |")
    tasks = list(study["tasks"])
    lines += ["", "| task | n | metric | " + " | ".join(arms) + " |", "|---|---|---|" + "---|" * len(arms)]
    for t in tasks:
        info = study["tasks"][t]
        flag = " (no signal: reported apart)" if t in study["uninformative_tasks"] else ""
        lines.append(
            f"| {t}{flag} | {info['n']} | {info['primary_metric']} | "
            + " | ".join(_pm(study["accuracy"][a][t]) for a in arms)
            + " |"
        )
    lines.append(
        "| **average** (informative tasks) | | | "
        + " | ".join(f"**{_pm(study['average'][a])}**" for a in arms)
        + " |"
    )
    if study["comparisons"]:
        lines += [
            "",
            "| comparison | difference (points) | 95% CI | 95% CI, seeds fixed | SE | 90% CI (TOST) | equivalent ±1 | equivalent ±2 | McNemar p (pooled) | beyond noise |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in study["comparisons"]:
            iv = lambda x: f"[{x[0]:+.2f}, {x[1]:+.2f}]"  # noqa: E731
            yn = lambda b: "yes" if b else "no"  # noqa: E731
            lines.append(
                f"| {c['a']} - {c['b']} | {c['diff']:+.2f} | {iv(c['ci95'])} | {iv(c['ci95_seeds_fixed'])} | "
                f"{c['se']:.2f} | {iv(c['ci90'])} | {yn(c['equivalent']['1'])} | {yn(c['equivalent']['2'])} | "
                f"{c['mcnemar_p_pooled']:.3f} | {yn(c['beyond_noise'])} |"
            )
    if study.get("pilot"):
        lines += [
            "",
            f"LoRA pilot over K (SPEED-K+BoS, seed {study['pilot'][0]['seed']}):",
            "",
            "| K | held-out after (served) | zero-shot | after, full depth |",
            "|---|---|---|---|",
        ]
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        for r in study["pilot"]:
            lines.append(
                f"| {r['k']} | {fmt(r['heldout_after'])} | {fmt(r['heldout_speed_zero_shot'])} | "
                f"{fmt(r['heldout_after_full_depth'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
