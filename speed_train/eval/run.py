"""Evaluate a model under SPEED on OLMES tasks: ``python -m speed_train.eval``.

    python -m speed_train.eval --model smollm2 --speed speed_k_bos --k 22 --tasks arc_easy,boolq --limit 100
    python -m speed_train.eval --model outputs/.../export/model            # K/anchor as the model was trained
    python -m speed_train.eval --model smollm2 --adapter outputs/.../export/adapter --tasks olmes10
    python -m speed_train.eval --model <owner/name>                        # an HF-native export on the Hub

Writes ``results.json``, ``results.md`` and ``questions.jsonl`` (one line per question: scores
per choice, the prediction of every metric, or the generation) into ``--out``. K, the anchor and
the BoS rule come from the model's own settings (an HF-native export's config, or
``speed_config.json``), else from ``--speed`` (a ``conf/speed`` preset) and ``--k``/``--anchor``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.progress import Progress

from speed_train.atomic import write_json, write_text
from speed_train.cli import ArgumentParser
from speed_train.eval.olmes import (
    ALIASES,
    ALL_TASKS,
    MC_TASKS,
    EvalError,
    Task,
    extract_gsm8k_answer,
    load_task,
    mc_metrics,
    mc_predictions,
)
from speed_train.eval.scoring import batch_order, generate_text, score_requests
from speed_train.speed.config import SAVED, SpeedConfig, with_overrides

TASK_SETS = {"olmes10": MC_TASKS, "all": ALL_TASKS}


def resolve_device(device: str | None = None, dtype: str = "auto") -> tuple[str, torch.dtype]:
    """``device`` None/"auto": cuda when available, else cpu. ``dtype`` "auto": bfloat16 on a
    GPU, float32 on CPU (bf16 matmuls are slow there and the CPU tests compare in fp32)."""
    if device in (None, "auto"):
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev = str(device)  # lm-eval may pass a torch.device
    if dtype == "auto":
        dtype = "bfloat16" if dev.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise EvalError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {dev}: no CUDA device is visible (use --device cpu)")
    return dev, getattr(torch, dtype)


def speed_presets() -> dict[str, dict]:
    """The training config's ``conf/speed`` group (full, speed_k, speed_k_bos): one definition."""
    from importlib import resources

    import yaml

    folder = resources.files("speed_train.conf").joinpath("speed")
    return {
        p.name.rsplit(".", 1)[0]: yaml.safe_load(p.read_text(encoding="utf-8"))
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def load_eval_model(
    model: str,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    merge_adapter: bool = True,
):
    """(model, tokenizer, saved SpeedConfig or None) from 'smollm2', a local dir or a Hub id,
    on ``device`` (default: cuda when available). A LoRA ``adapter`` is merged into the weights
    (in fp32, then cast to ``dtype``): the same function, without peft's per-layer detours."""
    from speed_train.loading import ModelNotFoundError, load_model, saved_speed_config

    dev, dt = resolve_device(device, dtype)
    merge = bool(adapter) and merge_adapter
    try:
        lm, tok = load_model(model, dtype=torch.float32 if merge else dt, device=dev, adapter=adapter)
    except ModelNotFoundError as e:
        raise EvalError(str(e)) from None
    saved = saved_speed_config(lm, model, adapter)
    if merge:
        lm = lm.merge_and_unload().to(dt).eval()
    return lm, tok, saved


def _mc_requests(task: Task) -> tuple[list[tuple[str, list[str]]], list[list[tuple[int, int]]]]:
    """Group each doc's choices by context (one prefill per distinct context)."""
    reqs: list[tuple[str, list[str]]] = []
    where: list[list[tuple[int, int]]] = []
    for d in task.docs:
        groups: dict[str, list[int]] = {}
        for j, ctx in enumerate(d.contexts):
            groups.setdefault(ctx, []).append(j)
        loc: list[tuple[int, int]] = [(0, 0)] * len(d.choices)
        for ctx, js in groups.items():
            for pos, j in enumerate(js):
                loc[j] = (len(reqs), pos)
            reqs.append((ctx, [d.choices[j] for j in js]))
        where.append(loc)
    return reqs, where


def evaluate_task(
    model,
    tok,
    cfg: SpeedConfig,
    task: Task,
    *,
    batch_size: int = 8,
    max_gen_tokens: int | None = None,
    progress=None,
    layout: str = "tree",
    metrics: str = "all",
    order: str = "tokens",
) -> dict:
    """Score one task. ``progress(done, total)`` is called after every batch of requests;
    ``layout``: how continuations share their context (``scoring.score_requests``);
    ``metrics``: ``"all"`` OLMES metrics, or ``"primary"`` only (the unconditional requests are
    then scored only when the primary metric is ``acc_uncond``: half the work on ARC-Easy,
    HellaSwag, PIQA and Social IQa); ``order``: how requests are grouped into batches (the scores
    do not depend on it): ``"tokens"`` (``scoring.batch_order``: little padding) or ``"chars"``
    (sorted by characters, the earlier releases' grouping, kept for ``bench.eval``'s baseline)."""
    if metrics not in ("all", "primary"):
        raise EvalError(f"metrics={metrics!r}: choose 'all' or 'primary'")
    if order not in ("tokens", "chars"):
        raise EvalError(f"order={order!r}: choose 'tokens' or 'chars'")
    t0 = time.perf_counter()
    samples = None
    if task.generative:
        ctxs = [d.contexts[0] for d in task.docs]
        gens = generate_text(
            model,
            tok,
            cfg,
            ctxs,
            max_new_tokens=max_gen_tokens or task.generation["max_gen_toks"],
            stop_sequences=tuple(task.generation["stop_sequences"]),
            batch_size=batch_size,
            progress=progress,
        )
        preds = [extract_gsm8k_answer(g) for g in gens]
        hits = [p == d.meta["answer"] for p, d in zip(preds, task.docs)]
        metrics = {"exact_match": sum(hits) / max(len(hits), 1)}
        samples = [
            {"doc_id": d.doc_id, "generation": g, "prediction": p, "answer": d.meta["answer"]}
            for d, g, p in zip(task.docs, gens, preds)
        ]
    else:
        reqs, where = _mc_requests(task)
        with_uncond = task.has_uncond and (metrics == "all" or task.primary_metric == "acc_uncond")
        total = len(reqs) + (len(task.docs) if with_uncond else 0)

        def score(requests: list, done: int, unconditional: bool = False) -> list:
            """Scores in the order of ``requests``, computed in batches that pad little."""
            if order == "tokens":
                perm = batch_order(tok, cfg, requests, batch_size)
            elif unconditional:  # "chars": the earlier releases scored these unsorted
                perm = list(range(len(requests)))
            else:
                perm = sorted(
                    range(len(requests)),
                    key=lambda i: (len(requests[i][0]) + sum(map(len, requests[i][1])), i),
                )
            out = [None] * len(requests)
            for i in range(0, len(perm), batch_size * 4):
                chunk = perm[i : i + batch_size * 4]
                got = score_requests(
                    model, tok, cfg, [requests[j] for j in chunk], batch_size=batch_size, layout=layout
                )
                for j, s in zip(chunk, got):
                    out[j] = s
                if progress is not None:
                    progress(done + i + len(chunk), total)
            return out

        scores = score(reqs, 0)
        cond = [[scores[r][p] for r, p in loc] for loc in where]
        uncond = None
        if with_uncond:
            uncond = score([(d.uncond_context, d.choices) for d in task.docs], len(reqs), unconditional=True)
        metrics = mc_metrics(task.docs, cond, uncond)
        samples = question_records(task, cond, uncond)
    if task.primary_metric not in metrics:  # load_task checks this up front; never report another metric
        raise EvalError(
            f"task {task.name}: primary metric {task.primary_metric} was not computed ({sorted(metrics)})"
        )
    out = {
        "task": task.name,
        "variant": task.variant,
        "n": len(task.docs),
        "primary_metric": task.primary_metric,
        "primary": metrics[task.primary_metric],
        "metrics": metrics,
        "seconds": time.perf_counter() - t0,
    }
    if samples is not None:
        out["samples"] = samples
    return out


def question_records(task: Task, cond: list[list], uncond: list[list] | None) -> list[dict]:
    """One record per question: the gold index, every choice's log-likelihood (and tokens), and
    the index each metric predicts (the per-question data behind paired comparisons)."""
    records = []
    preds = mc_predictions(task.docs, cond, uncond)
    for i, d in enumerate(task.docs):
        rec = {
            "doc_id": d.doc_id,
            "gold": d.gold,
            "logprobs": [c.logprob for c in cond[i]],
            "num_tokens": [c.num_tokens for c in cond[i]],
        }
        if uncond is not None:
            rec["uncond_logprobs"] = [c.logprob for c in uncond[i]]
        rec["predictions"] = {m: p[i] for m, p in preds.items()}
        records.append(rec)
    return records


def markdown_table(runs: dict[str, list[dict]]) -> str:
    """Rows: tasks; columns: runs (primary metric x 100) and the average."""
    names = list(runs)
    tasks = [r["task"] for r in next(iter(runs.values()))]
    lines = ["| task | n | metric | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for i, t in enumerate(tasks):
        r0 = runs[names[0]][i]
        cells = [f"{100 * runs[n][i]['primary']:.1f}" for n in names]
        lines.append(f"| {t} | {r0['n']} | {r0['primary_metric']} | " + " | ".join(cells) + " |")
    avg = [sum(r["primary"] for r in runs[n]) / len(runs[n]) * 100 for n in names]
    lines.append("| **average** | | | " + " | ".join(f"**{a:.1f}**" for a in avg) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = ArgumentParser(
        prog="python -m speed_train.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2", help="'smollm2' (packaged), a local HF dir or a hub id")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter dir (from training's export)")
    ap.add_argument(
        "--speed",
        default=None,
        choices=sorted(speed_presets()),
        help="a conf/speed preset; default: the model's saved SPEED settings, else full depth",
    )
    ap.add_argument("--k", default=None, help="cutoff: layers (24) or fraction (0.75)")
    ap.add_argument("--anchor", default=None, choices=["none", "bos", "system"])
    ap.add_argument("--tasks", default="olmes10", help="comma list, or olmes10 / all")
    ap.add_argument(
        "--variant", default=None, help="multiple-choice tasks: rc_5shot (default), mc_5shot, rc_0shot"
    )
    ap.add_argument("--gsm8k-variant", default=None, help="GSM8K's dump variant (default gold_bpb_5shot)")
    ap.add_argument(
        "--primary",
        default="olmes",
        choices=["olmes", "dump"],
        help="primary metric per task: OLMES-v0.1's normalisation (default) or the dump's config",
    )
    ap.add_argument("--task-path", default=None, help="a local requests.jsonl[.gz] (with --tasks NAME)")
    ap.add_argument("--limit", type=int, default=None, help="questions per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-gen-tokens", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    ap.add_argument("--device", default=None, help="cuda (default when available), cuda:1, cpu")
    ap.add_argument(
        "--metrics",
        default="all",
        choices=["all", "primary"],
        help="all OLMES metrics (default), or only the primary one (skips unneeded unconditional requests)",
    )
    ap.add_argument("--out", default="eval_results")
    ap.add_argument("--name", default=None, help="column name in the table")
    ap.add_argument(
        "--add-bos",
        default=None,
        help="the BoS rule for plain prompts, the same for every arm: auto (default: the tokenizer's "
        "BoS when it has one, as in training), true or false (no BoS: lm-eval hf's tokens for a "
        "tokenizer that adds none by default)",
    )
    args = ap.parse_args(argv)

    tasks = TASK_SETS.get(args.tasks, tuple(t.strip() for t in args.tasks.split(",") if t.strip()))
    if not tasks:
        raise EvalError(f"--tasks {args.tasks!r} names no task: give a comma list, olmes10 or all")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: must be >= 1")
    loaded = [  # fail fast: every task file is read and checked before the model loads
        load_task(
            t,
            args.gsm8k_variant if ALIASES.get(t, t) == "gsm8k" else args.variant,
            path=args.task_path,
            limit=args.limit,
            primary=args.primary,
        )
        for t in tasks
    ]
    model, tok, saved = load_eval_model(args.model, args.adapter, args.dtype, args.device)
    preset = speed_presets()[args.speed] if args.speed else None
    cfg = with_overrides(
        saved,
        k=args.k if args.k is not None else (preset["k"] if preset else SAVED),
        anchor=args.anchor or (preset["anchor"] if preset else None),
        add_bos=args.add_bos,
    )
    anchor, add_bos = cfg.anchor, cfg.add_bos
    K = cfg.resolve_k(model.config.num_hidden_layers)  # a LoRA adapter is merged by now
    name = args.name or (f"SPEED-{K}+{anchor}" if cfg.k is not None else "full")
    results = []
    with Progress() as prog:
        bar = prog.add_task("tasks", total=len(loaded))
        for task in loaded:
            sub = prog.add_task(f"  {task.name}", total=None)
            results.append(
                evaluate_task(
                    model,
                    tok,
                    cfg,
                    task,
                    batch_size=args.batch_size,
                    max_gen_tokens=args.max_gen_tokens,
                    metrics=args.metrics,
                    progress=lambda done, total, sub=sub: prog.update(sub, completed=done, total=total),
                )
            )
            prog.remove_task(sub)
            prog.console.print(
                f"{task.name}: {task.primary_metric} = {100 * results[-1]['primary']:.1f} "
                f"(n={results[-1]['n']}, {results[-1]['seconds']:.0f}s)"
            )
            prog.advance(bar)
    avg = sum(r["primary"] for r in results) / max(len(results), 1)
    lines = [json.dumps({"task": r["task"], **q}) for r in results for q in r.pop("samples", [])]
    out = {
        "name": name,
        "model": args.model,
        "adapter": args.adapter,
        "k": K,
        "anchor": str(anchor),
        "add_bos": add_bos,
        "limit": args.limit,
        "primary": args.primary,
        "tasks": results,
        "average": avg,
    }
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "results.json", out)
    write_text(d / "results.md", markdown_table({name: results}))
    write_text(d / "questions.jsonl", "".join(line + "\n" for line in lines))
    print(markdown_table({name: results}))
    return out


def cli() -> None:
    from speed_train.speed.config import SpeedConfigError

    try:
        main()
    except (EvalError, SpeedConfigError) as e:  # SpeedConfigError: a K the model does not have
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
