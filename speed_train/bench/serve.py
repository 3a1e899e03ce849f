"""Load on the OpenAI-compatible server: a SPEED export vs the same weights at full depth.

    python -m speed_train.bench.serve                                   # packaged SmolLM2, K=22, CPU
    python -m speed_train.bench.serve --clients 1,4,8 --requests 16 --prompt-words 400 --json out.json

The packaged SmolLM2-135M-Instruct is exported HF-natively twice (speed_train.hf.export): at K
(anchor bos) and at full depth. Both are served by ``python -m speed_train.serve`` (transformers'
server, one request at a time through generate()) on 127.0.0.1, at the same time; for each number
of concurrent clients the two servers are loaded in turn (the order alternating). A client sends streaming chat
completions one after the other (greedy, exactly ``--max-tokens`` tokens each: ``min_new_tokens``
in the request's ``generation_config``), each a different user message of about
``--prompt-words`` words. Per server and client count: requests/s (requests / wall time), and the
p50/p95 of request latency and of time to the first streamed text, client side. Each server runs
``--threads`` torch threads (default 1: on a shared 2-core CPU two threads oversubscribe it and a
request's time varies several-fold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from speed_train.cli import ArgumentParser, output_file

TEXT = (
    "The committee reviewed the quarterly report on the river restoration project, noting that the "
    "new wetlands along the northern bank now hold water through the dry months, that two species of "
    "heron have returned to nest, and that the volunteers counted more trout than in any year since "
    "the survey began. "
)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--k", type=int, default=22)
    ap.add_argument("--clients", default="1,4,8", help="concurrent client counts, comma separated")
    ap.add_argument("--requests", type=int, default=16, help="requests per client count and server")
    ap.add_argument("--prompt-words", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per server (OMP_NUM_THREADS); 1: steady on a shared CPU",
    )
    ap.add_argument("--request-timeout", type=float, default=600, help="seconds, per request")
    ap.add_argument("--json", default=None, type=output_file)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.client_counts = [int(x) for x in args.clients.split(",") if x]
    except ValueError:
        ap.error(f"--clients {args.clients!r}: a comma list of client counts")
    if not args.client_counts or min(args.client_counts) < 1:
        ap.error("--clients must be positive counts")
    if min(args.requests, args.prompt_words, args.max_tokens, args.k, args.threads) < 1:
        ap.error("--requests, --prompt-words, --max-tokens, --threads and --k must be positive")
    return args


def message(i: int, words: int) -> list[dict]:
    """A different user message per request (the same length), asking for a summary."""
    body = " ".join((TEXT * (words // len(TEXT.split()) + 1)).split()[:words])
    return [{"role": "user", "content": f"Report {i}. {body}\nSummarise the report in one sentence."}]


def one_request(client, model: str, i: int, args) -> dict:
    t0 = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(
        model=model,
        messages=message(i, args.prompt_words),
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"generation_config": json.dumps({"min_new_tokens": args.max_tokens})},
    )
    for chunk in stream:  # ends after max_tokens tokens
        if first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter() - t0
        usage = chunk.usage or usage
    return {
        "latency": time.perf_counter() - t0,
        "ttft": first,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }


def load(client, model: str, clients: int, args, offset: int) -> dict:
    """``args.requests`` requests from ``clients`` closed-loop clients; the server's numbers."""
    share = [args.requests // clients + (c < args.requests % clients) for c in range(clients)]
    results, lock = [], threading.Lock()

    def client_loop(c: int) -> None:
        for j in range(share[c]):
            r = one_request(client, model, offset + sum(share[:c]) + j, args)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for f in [pool.submit(client_loop, c) for c in range(clients)]:
            f.result()  # a failed request fails the benchmark
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    return {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "p50_s": percentile(lat, 50),
        "p95_s": percentile(lat, 95),
        "ttft_p50_s": percentile(ttft, 50) if ttft else None,
        "ttft_p95_s": percentile(ttft, 95) if ttft else None,
        "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in results if r["prompt_tokens"]),
        "completion_tokens": statistics.mean(
            r["completion_tokens"] for r in results if r["completion_tokens"]
        ),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import os

    import openai
    from transformers import AutoConfig

    from speed_train.assets import load_smollm2, smollm2_path
    from speed_train.atomic import write_json
    from speed_train.hf.export import make_hf_native
    from speed_train.speed.config import SpeedConfig
    from speed_train.tools.serve import LocalServer

    L = AutoConfig.from_pretrained(smollm2_path()).num_hidden_layers
    if args.k >= L:
        build_parser().error(f"--k {args.k} must be below SmolLM2's {L} layers")
    base, tok = load_smollm2()
    results: dict = {"k": args.k, "num_layers": L, "cpus": os.cpu_count(), "args": vars(args), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        names = {f"SPEED-{args.k}+BoS": args.k, "full depth": L}
        servers = {}
        for name, k in names.items():
            folder = Path(tmp) / name.replace(" ", "_").replace("+", "_")
            base.save_pretrained(folder)
            make_hf_native(folder, tok, SpeedConfig(k=k, anchor="bos"))
            servers[name] = LocalServer(
                folder,
                Path(tmp) / f"{folder.name}.log",
                "--device",
                "cpu",
                env={"OMP_NUM_THREADS": str(args.threads)},
            )
        del base
        try:
            for server in servers.values():
                server.start()
            clients = {
                name: openai.OpenAI(
                    base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=args.request_timeout
                )
                for name, s in servers.items()
            }
            for name, s in servers.items():  # warm-up: one request each
                one_request(clients[name], s.model, -1, args)
            print(
                f"SmolLM2-135M-Instruct served on CPU ({os.cpu_count()} cores, {args.threads} torch thread(s) "
                f"per server), K={args.k}/{L}, ~{args.prompt_words}-word prompts, {args.max_tokens} tokens "
                "per answer, greedy"
            )
            print(
                f"{'clients':>7} {'server':16} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9} "
                f"{'TTFT p95':>9} {'prompt tok':>10}"
            )
            offset = 0
            for i, c in enumerate(args.client_counts):
                # in turn, on the same prompts; the order alternates (ABBA) against drift in the
                # machine's other load
                for name in list(servers)[:: 1 if i % 2 == 0 else -1]:
                    s = servers[name]
                    row = {"server": name, **load(clients[name], s.model, c, args, offset)}
                    results["rows"].append(row)
                    print(
                        f"{c:>7} {name:16} {row['requests_per_s']:7.3f} {row['p50_s']:7.2f} {row['p95_s']:7.2f} "
                        f"{row['ttft_p50_s']:9.2f} {row['ttft_p95_s']:9.2f} {row['prompt_tokens']:10.0f}",
                        flush=True,
                    )
                offset += args.requests
                if args.json:
                    write_json(args.json, results)
        finally:
            for server in servers.values():
                server.stop()
    return results


if __name__ == "__main__":
    main()
