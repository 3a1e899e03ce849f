"""HF-native SPEED export: generate() timing against plain HF generate() and speed_generate.

    python -m speed_train.bench.hf_generate                      # packaged SmolLM2, K=22, CPU
    python -m speed_train.bench.hf_generate --lengths 512,1024,2048 --runs 5 --json out.json

The packaged SmolLM2-135M-Instruct is exported HF-natively at K (speed_train.hf.export) and loaded
with ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``; the plain model is the
same weights as a LlamaForCausalLM. Prompts are chat prompts (a long user message, then the
assistant header) of about each length. Per length and variant: TTFT = generate(max_new_tokens=1)
and TPOT = (generate(max_new_tokens=1 + n) - TTFT) / n, greedy; variants run interleaved, medians
reported, ratios side by side. ``speed_generate`` (the package's own path) is the reference the
HF-native path must stay within 5% of.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from speed_train.cli import ArgumentParser, output_file


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.hf_generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--k", type=int, default=22)
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None, type=output_file)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.lengths_list = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r}: a comma list of token counts")
    if args.runs < 1 or args.decode_steps < 1 or not args.lengths_list:
        ap.error("--runs, --decode-steps and --lengths must be positive")
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    from speed_train.assets import load_smollm2
    from speed_train.atomic import write_json
    from speed_train.hf.export import make_hf_native
    from speed_train.speed.generate import speed_generate

    torch.manual_seed(0)
    base, tok = load_smollm2()
    base.eval()
    L = base.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "speed"
        base.save_pretrained(folder)
        make_hf_native(folder, tok, k=args.k, num_layers=L, anchor="bos", add_bos="auto")
        native = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    pad = tok.pad_token_id

    def hf_gen(model, ids, n):
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=pad, min_new_tokens=n)

    def ours(prompt, n):
        return speed_generate(native, [prompt], args.k, max_new_tokens=n, pad_token_id=pad)

    results: dict = {
        "k": args.k,
        "num_layers": L,
        "decode_steps": args.decode_steps,
        "runs": args.runs,
        "lengths": {},
    }
    print(
        f"SmolLM2-135M-Instruct, CPU {torch.get_num_threads()} threads, K={args.k}/{L}, greedy, medians of {args.runs}"
    )
    print(
        f"{'prompt':>7} {'variant':24} {'TTFT s':>8} {'TPOT ms':>8} {'TTFT/HF':>8} {'TPOT/HF':>8} {'vs ours':>8}"
    )
    with torch.no_grad():
        for n in args.lengths_list:
            prompt = chat_prompt(tok, n)
            ids = torch.tensor([prompt.input_ids])
            variants = {
                "plain HF generate": lambda m, ids=ids: hf_gen(base, ids, m),
                f"HF-native SPEED-{args.k}": lambda m, ids=ids: hf_gen(native, ids, m),
                f"speed_generate SPEED-{args.k}": lambda m, prompt=prompt: ours(prompt, m),
            }
            times = {v: {"ttft": [], "total": []} for v in variants}
            for fn in variants.values():  # warm-up
                fn(2)
            for _ in range(args.runs):
                for v, fn in variants.items():
                    t0 = time.perf_counter()
                    fn(1)
                    times[v]["ttft"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    fn(1 + args.decode_steps)
                    times[v]["total"].append(time.perf_counter() - t0)
            row = {}
            for v, t in times.items():
                ttft = statistics.median(t["ttft"])
                tpot = (statistics.median(t["total"]) - ttft) / args.decode_steps
                row[v] = {"ttft_s": ttft, "tpot_s": tpot}
            hf, nat, own = (row[v] for v in variants)
            for r in row.values():
                r["ttft_vs_hf"], r["tpot_vs_hf"] = r["ttft_s"] / hf["ttft_s"], r["tpot_s"] / hf["tpot_s"]
            nat["ttft_vs_speed_generate"] = nat["ttft_s"] / own["ttft_s"]
            nat["tpot_vs_speed_generate"] = nat["tpot_s"] / own["tpot_s"]
            for v, r in row.items():
                vs = (
                    f"{r['ttft_vs_speed_generate']:.2f}/{r['tpot_vs_speed_generate']:.2f}"
                    if "ttft_vs_speed_generate" in r
                    else ""
                )
                print(
                    f"{len(prompt):>7} {v:24} {r['ttft_s']:8.3f} {1000 * r['tpot_s']:8.1f} {r['ttft_vs_hf']:8.3f} "
                    f"{r['tpot_vs_hf']:8.3f} {vs:>8}"
                )
            results["lengths"][str(len(prompt))] = row
            if args.json:
                write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
