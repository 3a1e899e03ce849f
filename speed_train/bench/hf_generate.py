"""Generation cost: plain HF generate() vs the HF-native SPEED export's generate() vs speed_generate.

    python -m speed_train.bench.hf_generate                      # packaged SmolLM2, K=22, CPU
    python -m speed_train.bench.hf_generate --lengths 4096 --runs 5 --decode-steps 32 --threads 1
    python -m speed_train.bench.hf_generate --lengths 8160 --runs 3 --decode-steps 32 --threads 1 --json out.json

Three paths on the same weights, the packaged SmolLM2-135M-Instruct: plain HF ``generate()`` at
full depth (``LlamaForCausalLM``, transformers' DynamicCache), the HF-native export at K
(``speed_train.hf.export.make_hf_native``, loaded with ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)``) through its own ``generate()``, and ``speed_generate`` on that model.
Chat prompts (a long user message, then the assistant header) of about each length; greedy,
exactly n new tokens. Rounds interleave the paths (the order rotates each round) after one
warm-up call per path on a short prompt; medians are reported, ratios of medians to plain HF,
and the spread (min-max) of the same ratio taken within each round.

Measured inside one call per path and round:
- TTFT = first new token - call start and TPOT = (last - first) / (n - 1), from the times the
  streamer receives each token (``speed_train.bench.measure.TokenTimes``);
- peak memory: the call's peak resident memory above the process's before it
  (``measure.PeakRSS``: Linux's VmHWM, reset before the call);
- KV: bytes of the key/value tensors the cache holds after the call (``measure.kv_tensor_bytes``)
  and, for SPEED's cache, those of the slots holding a token; each beside
  ``bench.inference.kv_bytes_formula`` (the last new token is never fed back: the cache holds the
  prompt + n - 1 tokens; SPEED's is allocated for prompt + n).

Beside each figure, the roofline: TTFT ratio = prefill FLOPs ratio
(``bench.inference.prefill_flops``: K layers over the prompt, L - K over anchor + header, the LM
head at the last token); a decode step reads the weights (``inference.decode_step_weight_bytes``)
and the prompt's KV, over the bandwidth of a large copy; transformers' DynamicCache also copies its
whole KV at every step (``torch.cat``), which the "as implemented" figure adds (KV read 3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from speed_train.bench.measure import PeakRSS, TokenTimes, kv_tensor_bytes
from speed_train.cli import ArgumentParser, output_file

VARIANTS = ("hf", "hf_native", "speed_generate")
LABELS = {
    "hf": "plain HF generate()",
    "hf_native": "HF-native SPEED generate()",
    "speed_generate": "speed_generate",
}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.hf_generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--k", type=int, default=22)
    ap.add_argument("--lengths", default="512,1024,2048", help="comma list of prompt lengths (tokens)")
    ap.add_argument("--decode-steps", type=int, default=16, help="new tokens per call (>= 2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup-tokens", type=int, default=256, help="prompt length of the warm-up calls")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the roofline")
    ap.add_argument("--json", default=None, type=output_file)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Arguments, checked against the packaged model's config before any weights load."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.lengths_list = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r}: a comma list of token counts")
    if args.runs < 1 or not args.lengths_list:
        ap.error("--runs and --lengths must be positive")
    if args.decode_steps < 2:
        ap.error(f"--decode-steps {args.decode_steps}: at least 2 (TPOT is timed between new tokens)")
    if min(args.lengths_list + [args.warmup_tokens]) < 16:
        ap.error("--lengths and --warmup-tokens: prompts of at least 16 tokens (a chat prompt's frame)")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads} must be >= 1")
    from transformers import AutoConfig

    from speed_train.assets import smollm2_path

    cfg = AutoConfig.from_pretrained(smollm2_path())
    L, positions = cfg.num_hidden_layers, cfg.max_position_embeddings
    if not 1 <= args.k <= L:
        ap.error(f"--k {args.k} must be in 1..{L} (SmolLM2-135M has {L} layers)")
    longest = max(args.lengths_list + [args.warmup_tokens])
    if longest + args.decode_steps > positions:
        ap.error(
            f"--lengths {longest} + --decode-steps {args.decode_steps} = {longest + args.decode_steps} tokens "
            f"exceeds the model's {positions} positions"
        )
    return args


def chat_prompt(tok, n: int):
    from speed_train.speed.chat_roles import encode_generation_prompt
    from speed_train.speed.config import SpeedConfig

    words = (
        "the quick brown fox jumps over the lazy dog and keeps on running through the field " * (n // 8)
    ).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest message whose prompt fits n tokens
        mid = (lo + hi + 1) // 2
        ex = encode_generation_prompt(
            [{"role": "user", "content": " ".join(words[:mid])}], tok, SpeedConfig()
        )
        lo, hi = (mid, hi) if len(ex) <= n else (lo, mid - 1)
    return encode_generation_prompt([{"role": "user", "content": " ".join(words[:lo])}], tok, SpeedConfig())


def timed_call(fn, n: int) -> dict:
    """One generation call of n new tokens: per-token times, peak memory, the cache's KV bytes."""
    from speed_train.speed.generate import SpeedCache

    timer = TokenTimes()
    with PeakRSS() as mem:
        timer.start()
        cache = fn(n, timer)
    if len(timer.times) != n:
        raise RuntimeError(f"the streamer saw {len(timer.times)} new tokens, expected {n}")
    held = kv_tensor_bytes(cache)
    active = sum(cache.active_bytes_per_layer()) if isinstance(cache, SpeedCache) else held
    return {
        "ttft_s": timer.ttft,
        "tpot_s": timer.tpot,
        "ttft_cpu_s": timer.ttft_cpu,
        "tpot_cpu_s": timer.tpot_cpu,
        "tpot_median_gap_s": statistics.median(timer.gaps),
        "peak_rss_delta_bytes": mem.delta,
        "kv_held_bytes": held,
        "kv_active_bytes": active,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from speed_train.assets import load_smollm2
    from speed_train.atomic import write_json
    from speed_train.bench.inference import (
        decode_step_weight_bytes,
        kv_bytes_formula,
        measure_bandwidth,
        prefill_flops,
    )
    from speed_train.hf.export import make_hf_native
    from speed_train.speed.config import SpeedConfig
    from speed_train.speed.flops import ModelShape
    from speed_train.speed.generate import speed_generate
    from speed_train.speed.roles import PROMPT

    wall0 = time.perf_counter()
    torch.manual_seed(0)
    base, tok = load_smollm2()
    base.eval()
    L, K = base.config.num_hidden_layers, args.k
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "speed"
        base.save_pretrained(folder)
        make_hf_native(folder, tok, SpeedConfig(k=K, anchor="bos"))
        native = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    pad = tok.pad_token_id
    shape = ModelShape.from_config(base.config)
    dbytes = base.get_input_embeddings().weight.element_size()
    bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth("cpu")
    weights = decode_step_weight_bytes(base, 1)

    def hf_gen(model):
        def run(n, streamer, ids):
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
                return_dict_in_generate=True,
            )
            return out.cache

        return run

    def ours(n, streamer, prompt):
        return speed_generate(
            native, [prompt], K, max_new_tokens=n, pad_token_id=pad, streamer=streamer
        ).cache

    paths = {"hf": hf_gen(base), "hf_native": hf_gen(native), "speed_generate": ours}

    def bind(v, prompt):
        ids = torch.tensor([prompt.input_ids])
        arg = prompt if v == "speed_generate" else ids
        return lambda n, streamer: paths[v](n, streamer, arg)

    results: dict = {
        "k": K,
        "num_layers": L,
        "decode_steps": args.decode_steps,
        "runs": args.runs,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "dtype": str(base.dtype),
        "bandwidth_Bps": bw,
        "decode_weight_bytes": weights,
        "peak_rss_method": PeakRSS.method,
        "loadavg_start": os.getloadavg(),
        "lengths": {},
    }
    print(
        f"SmolLM2-135M-Instruct {results['dtype']}, {results['cpu']}, {results['threads']} torch threads, "
        f"K={K}/{L}, greedy, {args.decode_steps} new tokens, medians of {args.runs} interleaved runs, "
        f"copy bandwidth {bw / 1e9:.1f} GB/s",
        flush=True,
    )
    with torch.no_grad():
        warm = chat_prompt(tok, args.warmup_tokens)
        for v in VARIANTS:
            timed_call(bind(v, warm), 2)
        for n_target in args.lengths_list:
            prompt = chat_prompt(tok, n_target)
            n, new = len(prompt), args.decode_steps
            n_kept = sum(r != PROMPT for r in prompt.roles)  # anchor + header: what goes up past K
            calls = {v: bind(v, prompt) for v in VARIANTS}
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for r in range(args.runs):
                order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
                for v in order:
                    runs[v].append(timed_call(calls[v], new))
                    m = runs[v][-1]
                    print(
                        f"  {n} tokens, round {r + 1}: {v:14} TTFT {m['ttft_s']:7.3f} s  "
                        f"TPOT {1e3 * m['tpot_s']:7.1f} ms  (CPU {m['ttft_cpu_s']:6.2f} s, "
                        f"{1e3 * m['tpot_cpu_s']:6.1f} ms)  peak +{_mib(m['peak_rss_delta_bytes'])} MiB",
                        flush=True,
                    )
            depth = {"hf": L, "hf_native": K, "speed_generate": K}
            kv_prompt = {v: kv_bytes_formula(shape, depth[v], n, n_kept, 1, dbytes) for v in VARIANTS}
            flops = {v: prefill_flops(shape, depth[v], n, n_kept, 1) for v in VARIANTS}
            row: dict = {"prompt_tokens": n, "kept_tokens": n_kept, "variants": {}}
            for v in VARIANTS:
                ms = runs[v]
                med = {key: statistics.median(m[key] for m in ms) for key in ("ttft_s", "tpot_s")}
                step_bytes = weights + kv_prompt[v]
                impl_bytes = step_bytes + (2 * kv_prompt[v] if v == "hf" else 0)  # DynamicCache's cat
                written = kv_bytes_formula(shape, depth[v], n + new - 1, n_kept + new - 1, 1, dbytes)
                allocated = (
                    written
                    if v == "hf"
                    else kv_bytes_formula(shape, depth[v], n + new, n_kept + new, 1, dbytes)
                )
                held = [m["kv_held_bytes"] for m in ms]
                active = [m["kv_active_bytes"] for m in ms]
                peaks = [m["peak_rss_delta_bytes"] for m in ms if m["peak_rss_delta_bytes"] is not None]
                row["variants"][v] = {
                    **med,
                    "ttft_runs_s": [m["ttft_s"] for m in ms],
                    "tpot_runs_s": [m["tpot_s"] for m in ms],
                    "tpot_median_gap_runs_s": [m["tpot_median_gap_s"] for m in ms],
                    "ttft_cpu_runs_s": [m["ttft_cpu_s"] for m in ms],
                    "tpot_cpu_runs_s": [m["tpot_cpu_s"] for m in ms],
                    "peak_rss_delta_bytes": statistics.median(peaks) if peaks else None,
                    "peak_rss_delta_runs_bytes": [m["peak_rss_delta_bytes"] for m in ms],
                    "kv_held_bytes": held[0],
                    "kv_active_bytes": active[0],
                    "kv_held_formula_bytes": allocated,
                    "kv_active_formula_bytes": written,
                    "kv_equals_formula": all(h == allocated for h in held)
                    and all(a == written for a in active),
                    "prefill_flops": flops[v],
                    "prefill_gflops_per_s": flops[v] / med["ttft_s"] / 1e9,
                    "decode_step_bytes": step_bytes,
                    "decode_step_bytes_as_implemented": impl_bytes,
                    "tpot_roofline_s": step_bytes / bw,
                    "tpot_roofline_as_implemented_s": impl_bytes / bw,
                }
            hf = row["variants"]["hf"]
            for rv in row["variants"].values():
                for key in ("ttft", "tpot"):
                    per_round = [a / b for a, b in zip(rv[f"{key}_runs_s"], hf[f"{key}_runs_s"])]
                    rv[f"{key}_vs_hf"] = rv[f"{key}_s"] / hf[f"{key}_s"]
                    rv[f"{key}_vs_hf_round_range"] = [min(per_round), max(per_round)]
                    cpu, cpu_hf = rv[f"{key}_cpu_runs_s"], hf[f"{key}_cpu_runs_s"]
                    rv[f"{key}_cpu_vs_hf"] = statistics.median(cpu) / statistics.median(cpu_hf)
                rv["ttft_roofline_vs_hf"] = rv["prefill_flops"] / hf["prefill_flops"]
                rv["ttft_vs_roofline"] = rv["ttft_vs_hf"] / rv["ttft_roofline_vs_hf"]
                rv["tpot_roofline_vs_hf"] = rv["decode_step_bytes"] / hf["decode_step_bytes"]
                rv["tpot_roofline_vs_hf_as_implemented"] = (
                    rv["decode_step_bytes_as_implemented"] / hf["decode_step_bytes_as_implemented"]
                )
            nat, own = row["variants"]["hf_native"], row["variants"]["speed_generate"]
            row["hf_native_vs_speed_generate"] = {
                "ttft": nat["ttft_s"] / own["ttft_s"],
                "tpot": nat["tpot_s"] / own["tpot_s"],
            }
            results["lengths"][str(n)] = row
            _print_row(row)
            results["loadavg_end"] = os.getloadavg()
            results["wall_s"] = time.perf_counter() - wall0
            if args.json:  # after every length: a run cut off keeps what it finished
                write_json(args.json, results)
    print(
        f"wall time {results['wall_s']:.0f} s, load average {results['loadavg_start']} -> {results['loadavg_end']}"
    )
    return results


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _print_row(row: dict) -> None:
    n = row["prompt_tokens"]
    print(
        f"{'prompt':>6} {'path':27} {'TTFT s':>8} {'/HF':>6} {'roof':>6} {'TPOT ms':>8} {'/HF':>6} {'roof':>6} "
        f"{'KV held MiB':>12} {'active':>8} {'=formula':>8} {'peak MiB':>9}"
    )
    for v, r in row["variants"].items():
        print(
            f"{n:>6} {LABELS[v]:27} {r['ttft_s']:8.2f} {r['ttft_vs_hf']:6.3f} {r['ttft_roofline_vs_hf']:6.3f} "
            f"{1e3 * r['tpot_s']:8.1f} {r['tpot_vs_hf']:6.3f} {r['tpot_roofline_vs_hf']:6.3f} "
            f"{r['kv_held_bytes'] / 2**20:12.2f} {r['kv_active_bytes'] / 2**20:8.2f} "
            f"{'yes' if r['kv_equals_formula'] else 'NO':>8} {_mib(r['peak_rss_delta_bytes']):>9}"
        )
    for v, r in row["variants"].items():
        if v != "hf":
            lo, hi = r["ttft_vs_hf_round_range"]
            tlo, thi = r["tpot_vs_hf_round_range"]
            print(
                f"{'':>6} {LABELS[v]:27} per-round TTFT/HF {lo:.3f}-{hi:.3f}, TPOT/HF {tlo:.3f}-{thi:.3f}; "
                f"CPU-time TTFT/HF {r['ttft_cpu_vs_hf']:.3f}, TPOT/HF {r['tpot_cpu_vs_hf']:.3f}; "
                f"TTFT/roofline {r['ttft_vs_roofline']:.3f}; TPOT roofline with DynamicCache's copies "
                f"{r['tpot_roofline_vs_hf_as_implemented']:.3f}"
            )
    h = row["hf_native_vs_speed_generate"]
    print(f"{'':>6} HF-native / speed_generate: TTFT {h['ttft']:.3f}, TPOT {h['tpot']:.3f}", flush=True)


if __name__ == "__main__":
    main()
