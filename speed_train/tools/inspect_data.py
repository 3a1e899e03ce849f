"""Print examples of a recipe with their SPEED token roles, and the recipe's data report.

    speed-inspect-data --recipe packaged_chat --n 3 --anchor bos
    speed-inspect-data --recipe path/to/recipe.yaml --split held_out --max-length 256 --no-color
    speed-inspect-data --model llama3 --chat-template tulu --recipe my_tulu.yaml

The dataset is built through the same pipeline and cache as training (``build_dataset``), with
the recipe's own bad-row limit. Exit status: 0; 1 when the recipe has more bad rows than its
``max_bad_fraction`` (the report is printed first); 2 when the recipe or its data cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from speed_train.cli import ArgumentParser
from speed_train.speed.config import ANCHOR_POLICIES, LOSS_SCOPES, SpeedConfig, SpeedConfigError
from speed_train.speed.roles import RoleError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="speed-inspect-data",
        description="Show a recipe's examples with their SPEED roles, and its data report.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", default="packaged_chat", help="a packaged recipe name or a recipe YAML file")
    p.add_argument(
        "--model", default="smollm2", help="tokenizer: 'smollm2', 'llama3', a local folder or a Hub id"
    )
    p.add_argument("--chat-template", default=None, help="override: 'tulu', 'llama3', 'chatml' or Jinja text")
    p.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--skip", type=int, default=0, help="examples to skip first")
    p.add_argument("--split", choices=("train", "held_out"), default="train")
    p.add_argument("--anchor", choices=ANCHOR_POLICIES, default="bos")
    p.add_argument("--loss-scope", choices=LOSS_SCOPES, default="all_assistant")
    p.add_argument("--add-bos", default="auto", help="auto (default), true or false")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--truncate", choices=("drop_turns", "error"), default="drop_turns")
    p.add_argument("--num-proc", type=int, default=None, help="preprocessing processes (default: every core)")
    p.add_argument("--cache-dir", default=None, help="dataset cache (default: $SPEED_TRAIN_CACHE/datasets)")
    p.add_argument("--rebuild", action="store_true", help="ignore an existing cache")
    p.add_argument("--no-color", action="store_true", help="bracket markup instead of ANSI colours")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from speed_train.data.errors import DataError
    from speed_train.data.pipeline import build_dataset
    from speed_train.data.recipes import load_recipe
    from speed_train.loading import ModelNotFoundError, load_tokenizer
    from speed_train.tools.inspect_roles import render_roles, use_color

    try:
        recipe = load_recipe(args.recipe)
        cfg = SpeedConfig(anchor=args.anchor, loss_scope=args.loss_scope, add_bos=args.add_bos)
        tokenizer = load_tokenizer(args.model, chat_template=args.chat_template)
        # Built with no limit so the report is always shown; the recipe's limit is checked below.
        train, held_out, report = build_dataset(
            recipe,
            tokenizer,
            cfg,
            args.max_length,
            args.cache_dir,
            truncate=args.truncate,
            max_bad_fraction=1.0,
            num_proc=args.num_proc,
            rebuild=args.rebuild,
        )
    except (DataError, SpeedConfigError, RoleError, ModelNotFoundError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    examples = train if args.split == "train" else held_out
    color = use_color(args.no_color)
    for i in range(args.skip, min(len(examples), args.skip + args.n)):
        ex = examples[i]
        print(f"=== {args.split} example {i} (source {ex.meta.get('source', '?')}, {len(ex)} tokens) ===")
        print(render_roles(ex, tokenizer, color=color))
    print("=== data report ===")
    print(report.summary())
    try:
        report.check(recipe.max_bad_fraction)
    except DataError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
