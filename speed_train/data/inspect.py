"""Print examples of a recipe with their SPEED token roles, and the recipe's data report.

    python -m speed_train.data.inspect recipe=packaged_chat n=3 anchor=bos
    python -m speed_train.data.inspect recipe=path/to/recipe.yaml split=held_out max_length=256 color=false

Arguments are ``key=value`` overrides (values parsed as YAML, as Hydra does):
recipe, n, split (train | held_out), anchor, loss_scope, max_length, truncate, model ('smollm2'
or a tokenizer folder / id), cache_dir, rebuild, color, skip (examples to skip first).
The dataset is built through the same cache as training (``build_dataset``). Exit status 1 when
the recipe has more bad rows than its ``max_bad_fraction`` (the report is printed first), 2 when
the recipe or its data cannot be loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import yaml

from speed_train.speed.config import SpeedConfig, SpeedConfigError

from .errors import DataError
from .recipes import load_recipe
from .tokenize import build_dataset

DEFAULTS: dict[str, Any] = {
    "recipe": "packaged_chat",
    "n": 3,
    "skip": 0,
    "split": "train",
    "anchor": "bos",
    "loss_scope": "all_assistant",
    "max_length": 512,
    "truncate": "drop_turns",
    "model": "smollm2",
    "cache_dir": None,
    "rebuild": False,
    "color": True,
}


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    args = dict(DEFAULTS)
    for item in argv:
        key, sep, value = item.lstrip("+").partition("=")
        if not sep:
            raise SystemExit(f"argument {item!r} is not key=value; keys: {', '.join(DEFAULTS)}")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown key {key!r}; keys: {', '.join(DEFAULTS)}")
        parsed = yaml.safe_load(value) if value else None
        # Keep recipe / model / cache_dir as text even when YAML would read a number or a date.
        args[key] = value if key in ("recipe", "model", "cache_dir") and value else parsed
    if args["split"] not in ("train", "held_out"):
        raise SystemExit(f"split must be train or held_out, got {args['split']!r}")
    return args


def load_tokenizer(model: str) -> Any:
    if model == "smollm2":
        from speed_train.assets import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _render(example: Any, tokenizer: Any, color: bool) -> str:
    try:
        from speed_train.speed.roles import render_roles
    except ImportError:  # older core without the renderer: plain token / role listing
        names = {0: "A", 1: "P", 2: "D"}
        return " ".join(
            f"{tokenizer.convert_ids_to_tokens(t)}/{names.get(r, '?')}{'*' if lab != -100 else ''}"
            for t, r, lab in zip(example.input_ids, example.roles, example.labels)
        )
    return render_roles(example, tokenizer, color=color)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    args = parse_overrides(argv)
    try:
        recipe = load_recipe(args["recipe"])
        cfg = SpeedConfig(anchor=args["anchor"], loss_scope=args["loss_scope"])
        tokenizer = load_tokenizer(args["model"])
        # Build with no limit so the report is always shown; the recipe's limit is checked below.
        train, held_out, report = build_dataset(
            recipe,
            tokenizer,
            cfg,
            args["max_length"],
            args["cache_dir"],
            truncate=args["truncate"],
            max_bad_fraction=1.0,
            rebuild=bool(args["rebuild"]),
        )
    except (DataError, SpeedConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    examples = train if args["split"] == "train" else held_out
    start = int(args["skip"])
    shown = range(start, min(len(examples), start + int(args["n"])))
    for i in shown:
        ex = examples[i]
        print(f"=== {args['split']} example {i} (source {ex.meta.get('source', '?')}, {len(ex)} tokens) ===")
        print(_render(ex, tokenizer, bool(args["color"])))
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
