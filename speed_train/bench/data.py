"""Data-preprocessing benchmark: the SPEED role encoder against plain chat-template tokenisation.

    python -m speed_train.bench.data                        # SmolLM2 tokenizer, 1 and 2 processes
    python -m speed_train.bench.data --n 4000 --num-proc 1,2,4 --json out.json
    python -m speed_train.bench.data --model llama3 --chat-template tulu   # the paper's pair

Conversations are Tulu-like and deterministic: 1-4 user/assistant turns, 20-500 words a message,
words drawn from the packaged chat corpus. Two measurements, each the median of interleaved runs:

1. one process: ``tokenizer.apply_chat_template(messages, tokenize=True)`` (the cost of plain SFT
   tokenisation) vs the role encoder (:func:`speed_train.speed.chat_roles.encode_conversation`) on
   the same conversations; the ratio is the encoder's extra cost.
2. the training pipeline (:func:`speed_train.data.pipeline.encode_dataset`, ``datasets.map``) at
   each ``--num-proc``: conversations/s of the whole map, Arrow writes included.

The Rust tokenizer's own thread pool is switched off (``TOKENIZERS_PARALLELISM=false``) so "one
process" means one core.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from speed_train.cli import ArgumentParser, output_file

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tulu_like_conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` conversations of 1-4 turns, 20-500 words per message (deterministic)."""
    words = _word_list()
    rng = random.Random(seed)

    def text() -> str:
        k = rng.randint(20, 500)
        out = " ".join(rng.choice(words) for _ in range(k))
        return out[0].upper() + out[1:] + "."

    convs = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        convs.append(msgs)
    return convs


def _word_list() -> list[str]:
    """Real English words from the packaged chatterbot corpus (falls back to a fixed list)."""
    import glob
    import importlib.util
    import re

    spec = importlib.util.find_spec("chatterbot_corpus")
    found: set[str] = set()
    if spec is not None and spec.submodule_search_locations:
        root = list(spec.submodule_search_locations)[0]
        for path in sorted(glob.glob(f"{root}/data/english/*.yml")):
            with open(path, encoding="utf-8") as fh:
                found.update(re.findall(r"[A-Za-z]{2,12}", fh.read()))
    return sorted(found) or "the of and to in is that it for was on are with as be this by".split()


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python -m speed_train.bench.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2", help="tokenizer: 'smollm2', 'llama3' or a local folder")
    ap.add_argument(
        "--chat-template",
        default=None,
        help="a packaged template (tulu, llama3, chatml) or Jinja; needed for 'llama3', which has none",
    )
    ap.add_argument("--n", type=int, default=1000, help="conversations")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs (median reported)")
    ap.add_argument("--num-proc", default="1,2", help="comma list of process counts for the pipeline")
    ap.add_argument("--json", default=None, type=output_file, help="also write the results here")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.procs = [int(x) for x in args.num_proc.split(",") if x]
    except ValueError:
        ap.error(f"--num-proc {args.num_proc!r}: give a comma list of integers, e.g. 1,2")
    if args.n < 1 or args.runs < 1 or not args.procs or min(args.procs) < 1:
        ap.error("--n, --runs and every --num-proc value must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from speed_train.atomic import write_json
    from speed_train.data.pipeline import encode_dataset
    from speed_train.loading import load_tokenizer
    from speed_train.speed.chat_roles import encode_conversation
    from speed_train.speed.config import SpeedConfig

    tok = load_tokenizer(args.model, chat_template=args.chat_template)
    cfg = SpeedConfig(anchor="bos")
    convs = tulu_like_conversations(args.n)

    def plain():
        for c in convs:
            tok.apply_chat_template(c, tokenize=True)

    def roles():
        for c in convs:
            encode_conversation(c, tok, cfg)

    times: dict[str, list[float]] = {"apply_chat_template": [], "role_encoder": []}
    roles()  # warm-up: template compilation, tokenizer caches
    for _ in range(args.runs):
        times["apply_chat_template"].append(_time(plain))
        times["role_encoder"].append(_time(roles))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["role_encoder"] / med["apply_chat_template"]
    template = f" + {args.chat_template} template" if args.chat_template else ""
    print(
        f"tokenizer {args.model}{template}, {args.n} Tulu-like conversations (1-4 turns, 20-500 words a message)"
    )
    print(f"{'one process':28} {'conv/s':>9}")
    for k, v in med.items():
        print(f"{k:28} {args.n / v:9.0f}")
    print(f"role encoder / apply_chat_template: {ratio:.2f}x (target <= 1.5x)")

    pipeline: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.procs:
            runs = []
            for r in range(args.runs):
                runs.append(
                    _time(
                        lambda p=p, r=r: encode_dataset(
                            convs, tok, cfg, None, num_proc=p, cache_dir=f"{tmp}/{p}-{r}"
                        )
                    )
                )
            pipeline[p] = args.n / statistics.median(runs)
    print(f"\n{'pipeline (datasets.map)':28} {'conv/s':>9}  speed-up")
    for p, cps in pipeline.items():
        print(f"num_proc={p:<19} {cps:9.0f}  {cps / pipeline[args.procs[0]]:.2f}x")
    out = {
        "model": args.model,
        "chat_template": args.chat_template,
        "n": args.n,
        "runs": args.runs,
        "conversations_per_s": {k: args.n / v for k, v in med.items()},
        "ratio": ratio,
        "pipeline_conversations_per_s": pipeline,
    }
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
