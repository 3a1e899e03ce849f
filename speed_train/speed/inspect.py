"""Show how SPEED labels a conversation or prompt, token by token.

    python -m speed_train.speed.inspect --model smollm2 --k 0.75 --anchor bos \\
        --messages '[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]'
    python -m speed_train.speed.inspect --jsonl data.jsonl --n 3
    python -m speed_train.speed.inspect --plain 'Question: Capital of France?\\nAnswer:' --continuation ' Paris'

Only the tokenizer is loaded (and the model config, to resolve K). ``--model`` is ``smollm2`` (the
packaged asset) or a local folder with a tokenizer. Exit status: 0, or 1 if an example cannot be
labelled (its RoleError is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from speed_train.speed.config import ANCHOR_POLICIES, LOSS_SCOPES, SpeedConfig, SpeedConfigError
from speed_train.speed.roles import (
    EncodedExample,
    RoleError,
    encode_conversation,
    encode_plain,
    render_roles,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="speed-inspect", description="Print the SPEED token roles of a conversation or prompt."
    )
    p.add_argument(
        "--model", default="smollm2", help="'smollm2' (packaged asset) or a local tokenizer folder"
    )
    p.add_argument("--k", type=_parse_k, default=None, help="cutoff: layer count (24) or fraction (0.75)")
    p.add_argument("--anchor", choices=ANCHOR_POLICIES, default="bos")
    p.add_argument("--loss-scope", choices=LOSS_SCOPES, default="all_assistant")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--messages", help="a JSON list of {role, content} messages")
    src.add_argument(
        "--jsonl", type=Path, help="a JSONL file: one {'messages': [...]} object (or list) per line"
    )
    src.add_argument("--plain", help="a plain (non-chat) context; \\n and \\t escapes are expanded")
    p.add_argument("--n", type=int, default=3, help="with --jsonl: how many lines to show (default 3)")
    p.add_argument("--continuation", default=None, help="with --plain: the continuation to score")
    p.add_argument("--no-bos", action="store_true", help="with --plain: do not prepend the tokenizer's BoS")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--truncate", choices=("error", "drop_turns"), default="error")
    p.add_argument(
        "--end-token-id", type=int, action="append", default=None, help="end-of-turn id (repeatable)"
    )
    p.add_argument("--no-color", action="store_true", help="bracket markup instead of ANSI colours")
    return p


def _parse_k(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"k must be an int or a float, got {text!r}") from None


def _unescape(text: str) -> str:
    # Shell single quotes keep "\n" literal; prompts like "Question: ...\nAnswer:" need real newlines.
    return text.replace("\\n", "\n").replace("\\t", "\t")


def load_tokenizer(model: str) -> tuple[Any, int | None]:
    """(tokenizer, number of layers or None) for ``--model``, offline."""
    from transformers import AutoConfig, AutoTokenizer

    if model == "smollm2":
        from speed_train.assets import smollm2_path

        path: str | Path = smollm2_path()
    elif Path(model).is_dir():
        path = model
    else:
        raise SystemExit(f"--model {model!r}: give 'smollm2' or an existing local folder (no hub downloads)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        layers = AutoConfig.from_pretrained(path, local_files_only=True).num_hidden_layers
    except (OSError, ValueError, AttributeError):
        layers = None  # a tokenizer-only folder
    return tokenizer, layers


def _load_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return RoleError(f"{where} is not valid JSON ({exc}): give a list of {{role, content}} objects")


def _conversations(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """(name, messages) pairs; messages is a RoleError when the input cannot be parsed."""
    if args.messages is not None:
        yield "messages", _load_json(args.messages, "--messages")
        return
    with open(args.jsonl, encoding="utf-8") as f:
        shown = 0
        for lineno, line in enumerate(f, 1):
            if shown >= args.n:
                return
            if not line.strip():
                continue
            name = f"{args.jsonl}:{lineno}"
            row = _load_json(line, name)
            yield name, row.get("messages") if isinstance(row, dict) else row
            shown += 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = SpeedConfig(k=args.k, anchor=args.anchor, loss_scope=args.loss_scope)
    except SpeedConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer, layers = load_tokenizer(args.model)
    color = not args.no_color and "NO_COLOR" not in os.environ

    if layers is None:
        depth = f"k={args.k} (layer count unknown)"
    else:
        try:
            depth = f"K={config.resolve_k(layers)} of {layers} layers"
        except SpeedConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"# model {args.model} | {depth} | anchor {config.anchor} | loss scope {config.loss_scope}")

    failed = 0
    if args.plain is not None:
        cont = _unescape(args.continuation) if args.continuation is not None else None
        items: list[tuple[str, EncodedExample | RoleError]] = []
        try:
            items.append(
                (
                    "plain",
                    encode_plain(_unescape(args.plain), cont, tokenizer, config, add_bos=not args.no_bos),
                )
            )
        except RoleError as exc:
            items.append(("plain", exc))
    else:
        items = []
        for name, messages in _conversations(args):
            if isinstance(messages, RoleError):
                items.append((name, messages))
                continue
            try:
                ex = encode_conversation(
                    messages,
                    tokenizer,
                    config,
                    end_token_ids=args.end_token_id,
                    max_length=args.max_length,
                    truncate=args.truncate,
                )
                items.append((name, ex))
            except RoleError as exc:
                items.append((name, exc))
    for name, item in items:
        print(f"\n## {name}")
        if isinstance(item, RoleError):
            failed += 1
            print(f"RoleError: {item}")
        else:
            print(render_roles(item, tokenizer, color=color))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
