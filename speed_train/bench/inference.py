"""Inference efficiency of SPEED-K vs full depth: active KV bytes, TTFT, TPOT.

    python -m speed_train.bench.inference                                  # CPU, small model, <= 2K
    python -m speed_train.bench.inference --preset llama31_8b --dtype bfloat16 \\
        --lengths 8192,32768,131072 --k 24 --decode-steps 32 --json out.json --plot out.png   # GPU

Random-init weights (timing needs no trained weights). Both variants use the same preallocated
two-depth cache (speed_train.speed.generate.SpeedCache; no per-step concatenation). KV bytes
are read from the real cache tensors. Beside each measurement the roofline prediction:
prefill FLOPs (speed_train.speed.flops) and, per decode step, bytes of weights + active KV read
over memory bandwidth (``--bandwidth-gbs``, or measured with a large copy). Runs are
interleaved (Full, SPEED, Full, SPEED, ...) and medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from speed_train.atomic import save_figure, write_json
from speed_train.cli import ArgumentParser, output_file
from speed_train.speed.adapters import enable_speed_attention
from speed_train.speed.batch import collate
from speed_train.speed.flops import ModelShape, kv_bytes_formula, prefill_flops  # noqa: F401  (re-exported)
from speed_train.speed.generate import decode_chunk, prefill
from speed_train.speed.roles import ANCHOR, DECODE, IGNORE, PROMPT, EncodedExample
from speed_train.speed.visibility import TokenMeta

PRESETS = {
    # Llama-3.1-8B shape: 32 layers, d 4096, 32 heads / 8 KV heads, FFN 14336, vocab 128256
    "llama31_8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "cpu_small": dict(layers=8, hidden=256, heads=4, kv_heads=2, intermediate=688, vocab=8192),
    # Gemma-3-270M: 18 layers (sliding window 512 on 15, full attention at 5, 11, 17), d 640,
    # 4 heads / 1 KV head of 256 dims, FFN 2048, a 262,144-token vocabulary tied to the embedding
    "gemma3_270m": dict(
        layers=18,
        hidden=640,
        heads=4,
        kv_heads=1,
        intermediate=2048,
        vocab=262144,
        arch="gemma3",
        overrides=dict(
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            sliding_window_pattern=6,
            tie_word_embeddings=True,
        ),
    ),
}


def decode_step_weight_bytes(model, batch: int) -> int:
    """Weight bytes one decode step reads: every parameter except the input embedding table, of
    which it reads one row per sequence (an untied table is ~1 GB of Llama-3.1-8B's 16 GB; a tied
    one is read whole by the LM head)."""
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() == head.data_ptr():
        return weight_bytes
    return weight_bytes - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size()


def measure_bandwidth(device: str, mib: int = 512) -> float:
    """Bytes/s of a large device copy (read + write)."""
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / statistics.median(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_prompt(n: int, vocab: int, seed: int = 0) -> EncodedExample:
    """BoS anchor, n - 3 prompt tokens, a 2-token assistant header (decode phase)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n,), generator=g).tolist()
    roles = [ANCHOR] + [PROMPT] * (n - 3) + [DECODE, DECODE]
    turns = [-1] * (n - 2) + [0, 0]
    return EncodedExample(ids, roles, turns, [IGNORE] * n)


@torch.no_grad()
def run_one(model, prompts: list[EncodedExample], k: int, decode_steps: int, device: str):
    parts = enable_speed_attention(model)
    batch = collate(prompts, pad_id=0).to(device)
    _sync(device)
    t0 = time.perf_counter()
    cache, logits = prefill(parts, k, batch, decode_steps)
    tok = logits.argmax(-1)
    _sync(device)
    ttft = time.perf_counter() - t0
    B = tok.shape[0]
    pos = batch.attention_mask.sum(1)
    meta = TokenMeta(
        torch.full((B, 1), DECODE, device=device),
        torch.zeros((B, 1), dtype=torch.long, device=device),
        torch.zeros((B, 1), dtype=torch.long, device=device),
    )
    steps = []
    for _ in range(decode_steps):
        t1 = time.perf_counter()
        logits = decode_chunk(parts, cache, tok[:, None], pos[:, None], meta)[:, -1]
        tok = logits.argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t1)
        pos = pos + 1
    return ttft, statistics.median(steps), cache


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="cpu_small", choices=list(PRESETS))
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the roofline")
    ap.add_argument("--json", default=None, type=output_file)
    ap.add_argument("--plot", default=None, type=output_file, help="PNG: TTFT/TPOT/KV ratios vs length")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Arguments, checked before the (possibly 8B-parameter) model is built."""
    ap = build_parser()
    args = ap.parse_args(argv)
    L = PRESETS[args.preset]["layers"]
    if not 1 <= args.k <= L:
        ap.error(f"--k {args.k} must be in 1..{L} (preset {args.preset} has {L} layers)")
    try:
        args.lengths = [int(x) for x in str(args.lengths).split(",")]
    except ValueError:
        ap.error(f"--lengths {args.lengths!r} must be comma-separated integers, e.g. 8192,32768,131072")
    if min(args.lengths) < 4:
        ap.error("--lengths: every prompt needs at least 4 tokens (anchor, prompt, 2-token header)")
    if args.batch < 1 or args.runs < 1 or args.decode_steps < 1:
        ap.error("--batch, --runs and --decode-steps must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)

    from speed_train.speed.tiny import tiny_model

    p = PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = tiny_model(
            p.get("arch", "llama"),
            layers=p["layers"],
            hidden=p["hidden"],
            heads=p["heads"],
            kv_heads=p["kv_heads"],
            intermediate=p["intermediate"],
            vocab=p["vocab"],
            dtype=dtype,
            max_position_embeddings=262144,
            **p.get("overrides", {}),
        )
    model.to(args.device)
    shape = ModelShape.from_config(model.config)
    L, K = shape.layers, args.k
    bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth(args.device)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    decode_weight_bytes = decode_step_weight_bytes(model, args.batch)
    dbytes = torch.finfo(dtype).bits // 8
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"inference benchmark: {args.preset} ({L} layers, K={K}), {args.dtype}, batch {args.batch}, "
        f"{dev_name}, {torch.get_num_threads()} thread(s), bandwidth {bw / 1e9:.1f} GB/s, medians of "
        f"{args.runs} interleaved runs"
    )
    print(
        f"{'length':>7} {'KV full MiB':>12} {'KV ratio':>9} {'pred':>6} {'TTFT ratio':>11} {'pred':>6} "
        f"{'TPOT full ms':>13} {'roofline':>9} {'TPOT ratio':>11} {'pred':>6}",
        flush=True,
    )
    out = {
        "args": vars(args),
        "device": dev_name,
        "bandwidth_Bps": bw,
        "weight_bytes": weight_bytes,
        "decode_weight_bytes": decode_weight_bytes,
        "rows": [],
    }
    rows = out["rows"]
    for n in args.lengths:
        prompts = [make_prompt(n, p["vocab"], seed=i) for i in range(args.batch)]
        n_kept = 3  # anchor + 2 header tokens
        res: dict[str, dict[str, list]] = {
            "full": {"ttft": [], "tpot": []},
            "speed": {"ttft": [], "tpot": []},
        }
        kv = {}
        for r in range(args.runs + 1):  # first round warms up
            for name, kk in (("full", L), ("speed", K)):
                ttft, tpot, cache = run_one(model, prompts, kk, args.decode_steps, args.device)
                if r:
                    res[name]["ttft"].append(ttft)
                    res[name]["tpot"].append(tpot)
                kv[name] = sum(cache.active_bytes_per_layer())
                kv[name + "_written"] = sum(cache.written_bytes_per_layer())  # no padding here
                del cache
        steps_written = args.decode_steps  # run_one feeds every step's token back
        kv_full_formula = kv_bytes_formula(
            shape, L, n + steps_written, n_kept + steps_written, args.batch, dbytes
        )
        kv_speed_formula = kv_bytes_formula(
            shape, K, n + steps_written, n_kept + steps_written, args.batch, dbytes
        )
        med = {v: {m: statistics.median(res[v][m]) for m in ("ttft", "tpot")} for v in res}
        pf_full, pf_speed = (
            prefill_flops(shape, L, n, n_kept, args.batch),
            prefill_flops(shape, K, n, n_kept, args.batch),
        )
        kv_prompt_full = kv_bytes_formula(shape, L, n, n_kept, args.batch, dbytes)
        kv_prompt_speed = kv_bytes_formula(shape, K, n, n_kept, args.batch, dbytes)
        tpot_pred_full = (decode_weight_bytes + kv_prompt_full) / bw
        tpot_pred_speed = (decode_weight_bytes + kv_prompt_speed) / bw
        rows.append(
            {
                "length": n,
                "batch": args.batch,
                "kv_full": kv["full"],
                "kv_speed": kv["speed"],
                "kv_ratio": kv["speed"] / kv["full"],
                "kv_ratio_pred": kv_speed_formula / kv_full_formula,
                "kv_matches_formula": kv["full"] == kv_full_formula and kv["speed"] == kv_speed_formula,
                "kv_written_matches": kv["full_written"] == kv["full"] and kv["speed_written"] == kv["speed"],
                "ttft_full_s": med["full"]["ttft"],
                "ttft_speed_s": med["speed"]["ttft"],
                "ttft_ratio": med["speed"]["ttft"] / med["full"]["ttft"],
                "ttft_ratio_pred": pf_speed / pf_full,
                "tpot_full_s": med["full"]["tpot"],
                "tpot_speed_s": med["speed"]["tpot"],
                "tpot_ratio": med["speed"]["tpot"] / med["full"]["tpot"],
                "tpot_ratio_pred": tpot_pred_speed / tpot_pred_full,
                "tpot_full_roofline_s": tpot_pred_full,
                "tpot_speed_roofline_s": tpot_pred_speed,
            }
        )
        r = rows[-1]
        print(
            f"{r['length']:>7} {r['kv_full'] / 2**20:>12.2f} {r['kv_ratio']:>9.4f} {r['kv_ratio_pred']:>6.4f} "
            f"{r['ttft_ratio']:>11.3f} {r['ttft_ratio_pred']:>6.3f} {1e3 * r['tpot_full_s']:>13.3f} "
            f"{1e3 * r['tpot_full_roofline_s']:>9.3f} {r['tpot_ratio']:>11.3f} {r['tpot_ratio_pred']:>6.3f}",
            flush=True,
        )
        # written after every length: a run cut off by a timeout keeps the lengths it finished
        if args.json:
            write_json(args.json, out)
        if args.plot:
            _plot(rows, args.plot, f"SPEED-{K}/{L} vs full depth ({dev_name})")
    return out


def _plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["length"])
    x = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("kv_ratio", "active KV"), ("ttft_ratio", "TTFT"), ("tpot_ratio", "TPOT")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=f"{label} (measured)")
        ax.plot(x, [r[key + "_pred"] for r in rows], linestyle="--", label=f"{label} (predicted)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("SPEED / full")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
