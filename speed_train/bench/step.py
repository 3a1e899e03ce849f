"""Training-step benchmark: vanilla HF vs SPEED mask vs SPEED gather (forward + backward).

    python -m speed_train.bench.step            # issue defaults: 8 layers, hidden 256, T=1024, B=4
    python -m speed_train.bench.step --runs 7 --seq 512 --json out.json
    python -m speed_train.bench.step --preset gemma3_270m --batch 1 --seq 1024   # a real model's shape
    python -m speed_train.bench.step --preset smollm2 --seq 4096 --batch 1 --variants vanilla,mask,gather \
        --threads 1 --warmup-seq 256 --runs 2                # SmolLM2-135M's shape at long context

Runs are interleaved (one step of each variant per round, after one warm-up round) and the
median per variant is reported as a ratio to vanilla, beside the FLOP-predicted ratio
(speed_train.speed.flops). Wall-clock ratios are measured here, side by side; no timed tests.
``vanilla`` is HF's forward with ``labels`` (the LM head at every token); ``full_K=L`` is the same
model through the SPEED path at full depth (the head at supervised positions only), so their
ratio is what computing the head at targets alone saves. ``--preset`` takes a real model's shape
(random weights: timing needs none): Gemma-3-270M (sliding windows, 262k vocabulary) or
SmolLM2-135M.
Beside the time, per variant: the peak resident memory of the step above the process's memory
before it (speed_train.bench.measure.PeakRSS) and, from the first timed round, what autograd
keeps for backward (distinct storages; among them the attention masks, and how many layers
saved one).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from speed_train.atomic import write_json
from speed_train.bench.inference import PRESETS as INFERENCE_PRESETS
from speed_train.bench.measure import PeakRSS, SavedForBackward
from speed_train.cli import ArgumentParser, output_file
from speed_train.speed.batch import collate
from speed_train.speed.executors import speed_loss
from speed_train.speed.flops import ModelShape, step_flops
from speed_train.speed.roles import ANCHOR, DECODE, IGNORE, PROMPT, EncodedExample
from speed_train.speed.tiny import tiny_model

# Model shapes (tiny_model arguments; random init: timing needs no weights) and the K each defaults
# to (0.75 x layers). small: the issue-2 defaults (K/V heads = heads, FFN = 8/3 hidden); the others
# are real models' shapes. Explicit flags override a preset's numbers.
PRESETS = {
    "small": dict(layers=8, hidden=256, heads=4, kv_heads=None, intermediate=None, vocab=8192, k=6),
    "gemma3_270m": {**INFERENCE_PRESETS["gemma3_270m"], "k": 14},  # one copy of the shape: bench.inference
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
PRESETS["smollm2"] = PRESETS["smollm2_135m"]  # the name bench.step first gave it


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


VARIANTS = ("vanilla", "full_K=L", "mask", "gather")


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset", default="small", choices=list(PRESETS), help="model shape (flags below override)"
    )
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (small preset)")
    ap.add_argument("--intermediate", type=int, default=None, help="default: 8/3 x --hidden (small preset)")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-share", type=float, default=0.75)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of {', '.join(VARIANTS)} (vanilla is the baseline and must be in it)",
    )
    ap.add_argument(
        "--warmup-seq",
        type=int,
        default=None,
        help="length of the warm-up round's rows (default --seq; 0: no warm-up round)",
    )
    ap.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="activation checkpointing of every decoder layer, for every variant alike",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None, type=output_file, help="also write the results here")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Arguments, checked before any model is built."""
    ap = build_parser()
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key not in ("arch", "overrides") and getattr(args, key) is None:
            setattr(args, key, value)
    args.arch, args.overrides = preset.get("arch", "llama"), dict(preset.get("overrides", {}))
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.intermediate is None:
        args.intermediate = int(args.hidden * 8 / 3)
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
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        ap.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "vanilla" not in variants or len(set(variants)) != len(variants):
        ap.error(
            f"--variants {args.variants}: a comma list without repeats of {', '.join(VARIANTS)} that "
            "includes vanilla (the baseline)"
        )
    args.variants = [v for v in VARIANTS if v in variants]
    if args.warmup_seq is None:
        args.warmup_seq = args.seq
    if not (args.seq >= 8 and args.batch >= 1 and args.runs >= 1 and 0 <= args.warmup_seq):
        ap.error("--seq must be >= 8, --batch and --runs >= 1, --warmup-seq >= 0")
    if 0 < args.warmup_seq < 8:
        ap.error("--warmup-seq must be 0 (no warm-up) or >= 8")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads} must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

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
        max_position_embeddings=max(4096, args.seq, args.warmup_seq),
    )
    model.to(args.device).train()
    if args.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def make_variants(batch):
        hf_labels = batch.labels.clone()

        def vanilla():
            model(input_ids=batch.input_ids, labels=hf_labels).loss.backward()

        def mask():
            speed_loss(model, batch, args.k, executor="mask").mean.backward()

        def gather():
            speed_loss(model, batch, args.k, executor="gather").mean.backward()

        def full():  # Full-IT through the same code path (K = L): logits at targets only
            speed_loss(model, batch, args.layers, executor="gather").mean.backward()

        fns = {"vanilla": vanilla, "full_K=L": full, "mask": mask, "gather": gather}
        return {name: fns[name] for name in args.variants}

    batch = synthetic_batch(args.batch, args.seq, args.prompt_share, args.vocab).to(args.device)
    variants = make_variants(batch)
    times: dict[str, list[float]] = {n: [] for n in variants}
    peaks: dict[str, list[int | None]] = {n: [] for n in variants}
    saved: dict[str, dict] = {}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.warmup_seq:  # one untimed round (on shorter rows if asked: first-call costs only)
        warm = synthetic_batch(args.batch, args.warmup_seq, args.prompt_share, args.vocab).to(args.device)
        for fn in make_variants(warm).values():
            model.zero_grad(set_to_none=True)
            fn()
        del warm
    wall0 = time.perf_counter()
    for rnd in range(1, args.runs + 1):
        for name, fn in variants.items():
            model.zero_grad(set_to_none=True)
            with PeakRSS() as mem:
                sync()
                t0 = time.perf_counter()
                if rnd == 1:  # what autograd keeps for backward, from the first timed round
                    with SavedForBackward(args.seq) as probe:
                        fn()
                    saved[name] = probe.summary()
                else:
                    fn()
                sync()
                times[name].append(time.perf_counter() - t0)
            peaks[name].append(mem.delta)
            print(f"  round {rnd} {name:9} {times[name][-1]:9.3f} s  peak +{_mib(mem.delta)} MiB", flush=True)
    model.zero_grad(set_to_none=True)
    shape = ModelShape.from_config(model.config)
    base_flops = step_flops(shape, batch, args.layers, "full_hf")
    med = {n: statistics.median(ts) for n, ts in times.items()}
    rows = []
    plan = {
        "vanilla": ("full_hf", args.layers),
        "full_K=L": ("mask", args.layers),
        "mask": ("mask", args.k),
        "gather": ("gather", args.k),
    }
    for name in variants:
        execution, k = plan[name]
        pred = step_flops(shape, batch, k, execution) / base_flops
        measured = [p for p in peaks[name] if p is not None]
        rows.append(
            {
                "variant": name,
                "median_s": med[name],
                "ratio": med[name] / med["vanilla"],
                "flop_ratio": pred,
                "ratio_over_pred": med[name] / med["vanilla"] / pred,
                "peak_rss_delta_bytes": statistics.median(measured) if measured else None,
                "peak_rss_delta_max_bytes": max(measured) if measured else None,
                **saved[name],
            }
        )
    print(
        f"step benchmark: {args.preset} ({args.arch}) {args.layers}L h{args.hidden} {args.heads}/{args.kv_heads} heads "
        f"ffn {args.intermediate} vocab {args.vocab}, B={args.batch} T={args.seq}, "
        f"prompt share {args.prompt_share}, K={args.k}, {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} threads{', activation checkpointing' if args.grad_checkpointing else ''}, "
        f"median of {args.runs} interleaved runs ({time.perf_counter() - wall0:.0f} s timed)"
    )
    print(
        f"{'variant':9} {'median s':>9} {'ratio':>7} {'FLOP ratio':>11} {'ratio/pred':>11} "
        f"{'peak MiB':>9} {'saved MiB':>10} {'masks (saves) MiB':>18}"
    )
    for r in rows:
        masks = f"{r['mask_storages']} ({r['mask_saves']}) {_mib(r['mask_bytes'])}"
        print(
            f"{r['variant']:9} {r['median_s']:9.3f} {r['ratio']:7.3f} {r['flop_ratio']:11.3f} "
            f"{r['ratio_over_pred']:11.3f} {_mib(r['peak_rss_delta_bytes']):>9} {_mib(r['saved_bytes']):>10} "
            f"{masks:>18}"
        )
    result = {
        "args": vars(args),
        "rows": rows,
        "times": times,
        "peak_rss_delta_bytes": peaks,
        "peak_rss_method": PeakRSS.method,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        write_json(args.json, result)
    return result


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


if __name__ == "__main__":
    main()
