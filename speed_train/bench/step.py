"""Training-step benchmark: vanilla HF vs SPEED mask vs SPEED gather (forward + backward).

    python -m speed_train.bench.step            # issue defaults: 8 layers, hidden 256, T=1024, B=4
    python -m speed_train.bench.step --runs 7 --seq 512 --json out.json
    python -m speed_train.bench.step --preset gemma3_270m --batch 1 --seq 1024   # a real model's shape

Runs are interleaved (one step of each variant per round, after one warm-up round) and the
median per variant is reported as a ratio to vanilla, beside the FLOP-predicted ratio
(speed_train.speed.flops). Wall-clock ratios are measured here, side by side; no timed tests.
``vanilla`` is HF's forward with ``labels`` (the LM head at every token); ``full_K=L`` is the same
model through the SPEED path at full depth (the head at supervised positions only), so their
ratio is what computing the head at targets alone saves. ``--preset`` takes a real model's shape
(random weights: timing needs none): Gemma-3-270M (sliding windows, 262k vocabulary) or
SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from speed_train.atomic import write_json
from speed_train.cli import ArgumentParser, output_file
from speed_train.speed.batch import collate
from speed_train.speed.executors import speed_loss
from speed_train.speed.flops import ModelShape, step_flops
from speed_train.speed.roles import ANCHOR, DECODE, IGNORE, PROMPT, EncodedExample
from speed_train.speed.tiny import tiny_model

# real models' shapes (tiny_model arguments) and the K the presets default to (0.75 x layers)
PRESETS = {
    "gemma3_270m": dict(
        arch="gemma3",
        layers=18,
        hidden=640,
        heads=4,
        kv_heads=1,
        intermediate=2048,
        vocab=262144,
        k=14,
        overrides=dict(
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            sliding_window_pattern=6,
            tie_word_embeddings=True,
        ),
    ),
    "smollm2_135m": dict(
        arch="llama",
        layers=30,
        hidden=576,
        heads=9,
        kv_heads=3,
        intermediate=1536,
        vocab=49152,
        k=22,
        overrides=dict(tie_word_embeddings=True),
    ),
}


def synthetic_batch(batch: int, seq: int, prompt_share: float, vocab: int, seed: int = 0):
    """Rows of one conversation each: BoS anchor, prompt, 2-token header, supervised response."""
    g = torch.Generator().manual_seed(seed)
    n_prompt = round(seq * prompt_share) - 1
    n_header, n_resp = 2, seq - n_prompt - 3
    roles = [ANCHOR] + [PROMPT] * n_prompt + [DECODE] * (n_header + n_resp)
    turns = [-1] * (1 + n_prompt) + [0] * (n_header + n_resp)
    exs = []
    for _ in range(batch):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        labels = [IGNORE] * (1 + n_prompt + n_header) + ids[1 + n_prompt + n_header :]
        exs.append(EncodedExample(ids, roles, turns, labels))
    return collate(exs, pad_id=0)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="a real model's shape (overrides the shape flags)",
    )
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-share", type=float, default=0.75)
    ap.add_argument("--k", type=int, default=None, help="cutoff (default: 6, or the preset's)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None, type=output_file, help="also write the results here")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Arguments, checked before any model is built."""
    ap = build_parser()
    args = ap.parse_args(argv)
    args.arch, args.kv_heads, args.intermediate, args.overrides = "llama", args.heads, None, {}
    if args.preset:
        p = PRESETS[args.preset]
        for key in ("arch", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "overrides"):
            setattr(args, key, p[key])
        args.k = p["k"] if args.k is None else args.k
    args.k = 6 if args.k is None else args.k
    args.intermediate = args.intermediate or int(args.hidden * 8 / 3)
    for name in ("layers", "hidden", "heads", "vocab", "seq", "batch", "runs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)} must be >= 1")
    if not 1 <= args.k <= args.layers:
        ap.error(f"--k {args.k} must be in 1..{args.layers} (--layers)")
    prompt = round(args.seq * args.prompt_share) - 1  # as synthetic_batch lays out a row
    if not 0 < args.prompt_share < 1 or prompt < 0 or args.seq - prompt - 3 < 1:
        ap.error(
            f"--prompt-share {args.prompt_share} must be in (0, 1) and leave room in --seq {args.seq} "
            "tokens for the anchor, a 2-token header and a response"
        )
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)

    dtype = getattr(torch, args.dtype)
    model = tiny_model(
        args.arch,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        dtype=dtype,
        **args.overrides,
    )
    model.to(args.device).train()
    batch = synthetic_batch(args.batch, args.seq, args.prompt_share, args.vocab).to(args.device)
    hf_labels = batch.labels.clone()

    def vanilla():
        model(input_ids=batch.input_ids, labels=hf_labels).loss.backward()

    def mask():
        speed_loss(model, batch, args.k, executor="mask").mean.backward()

    def gather():
        speed_loss(model, batch, args.k, executor="gather").mean.backward()

    def full():  # Full-IT through the same code path (K = L): logits at targets only
        speed_loss(model, batch, args.layers, executor="gather").mean.backward()

    variants = {"vanilla": vanilla, "full_K=L": full, "mask": mask, "gather": gather}
    times: dict[str, list[float]] = {n: [] for n in variants}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for rnd in range(args.runs + 1):  # round 0 is warm-up
        for name, fn in variants.items():
            model.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if rnd > 0:
                times[name].append(time.perf_counter() - t0)
    shape = ModelShape.from_config(model.config)
    base_flops = step_flops(shape, batch, args.layers, "full_hf")
    med = {n: statistics.median(ts) for n, ts in times.items()}
    rows = []
    plan = (
        ("vanilla", "full_hf", args.layers),
        ("full_K=L", "mask", args.layers),
        ("mask", "mask", args.k),
        ("gather", "gather", args.k),
    )
    for name, execution, k in plan:
        pred = step_flops(shape, batch, k, execution) / base_flops
        rows.append(
            {
                "variant": name,
                "median_s": med[name],
                "ratio": med[name] / med["vanilla"],
                "flop_ratio": pred,
                "ratio_over_pred": med[name] / med["vanilla"] / pred,
            }
        )
    print(
        f"step benchmark: {args.preset or args.arch} {args.layers}L h{args.hidden} vocab {args.vocab}, "
        f"B={args.batch} T={args.seq}, prompt share {args.prompt_share}, K={args.k}, {args.device} "
        f"{args.dtype}, {torch.get_num_threads()} thread(s), median of {args.runs} interleaved runs"
    )
    print(f"{'variant':9} {'median s':>9} {'ratio':>7} {'FLOP ratio':>11} {'ratio/pred':>11}")
    for r in rows:
        print(
            f"{r['variant']:9} {r['median_s']:9.3f} {r['ratio']:7.3f} {r['flop_ratio']:11.3f} "
            f"{r['ratio_over_pred']:11.3f}"
        )
    result = {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows, "times": times}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
