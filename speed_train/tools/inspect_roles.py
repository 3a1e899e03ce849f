"""Show how SPEED labels a conversation or prompt, token by token.

    speed-inspect --model smollm2 --k 0.75 --anchor bos \\
        --messages '[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]'
    speed-inspect --model llama3 --chat-template tulu --jsonl data.jsonl --n 3
    speed-inspect --plain 'Question: Capital of France?\\nAnswer:' --continuation ' Paris'

Only the tokenizer is loaded (and the model config, to resolve K). ``--model``: ``smollm2`` (the
packaged model), ``llama3`` (the packaged Llama-3 tokenizer), a local folder or a Hub id. Exit
status: 0, 1 if an example cannot be labelled (its RoleError is printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from speed_train.cli import ArgumentParser
from speed_train.speed.chat_roles import TRUNCATE, encode_conversation
from speed_train.speed.config import (
    ANCHOR_POLICIES,
    LOSS_SCOPES,
    SpeedConfig,
    SpeedConfigError,
    check_add_bos,
    parse_k,
)
from speed_train.speed.plain_roles import encode_plain
from speed_train.speed.roles import ANCHOR, DECODE, IGNORE, PROMPT, EncodedExample, RoleError

# -- the coloured printer ----------------------------------------------------------------------

_ANSI = {"A": "\x1b[35m", "P": "\x1b[2m", "D": "\x1b[33m", "L": "\x1b[32m", "?": "\x1b[31m"}
_RESET = "\x1b[0m"
_KIND_NAMES = {"A": "anchor", "P": "prompt", "D": "decode, no loss", "L": "decode + loss"}


def _kind(role: int, label: int) -> str:
    if label != IGNORE:
        return "L"
    return {ANCHOR: "A", PROMPT: "P", DECODE: "D"}.get(role, "?")


def render_roles(example: EncodedExample, tokenizer: Any, *, color: bool = True) -> str:
    """Every token with its role: ANSI colours (anchor magenta, prompt dim, decode header
    yellow, supervised green) or, with ``color=False``, ``[A:..] [P:..] [D:..] [L:..]`` markup.
    Runs of one kind (and one turn) are merged and decoded together; newlines show as ``↵``.
    Ends with a legend and per-role / per-turn counts."""
    kinds = [_kind(r, lab) for r, lab in zip(example.roles, example.labels)]
    parts: list[str] = []
    t = 0
    while t < len(kinds):
        u = t
        while u < len(kinds) and kinds[u] == kinds[t] and example.turns[u] == example.turns[t]:
            u += 1
        text = tokenizer.decode(
            example.input_ids[t:u], skip_special_tokens=False, clean_up_tokenization_spaces=False
        ).replace("\n", "↵\n")
        parts.append(f"{_ANSI[kinds[t]]}{text}{_RESET}" if color else f"[{kinds[t]}:{text}]")
        t = u
    if color:
        legend = "legend: " + " ".join(f"{_ANSI[k]}{name}{_RESET}" for k, name in _KIND_NAMES.items())
    else:
        legend = "legend: " + " ".join(f"[{k}:{name}]" for k, name in _KIND_NAMES.items())
    counts = {k: kinds.count(k) for k in _KIND_NAMES}
    summary = (
        f"tokens {len(kinds)} | anchor {counts['A']} | prompt {counts['P']} | "
        f"decode {counts['D'] + counts['L']} (supervised {counts['L']})"
    )
    turn_ids = sorted({x for x in example.turns if x >= 0})
    if turn_ids:
        per_turn = []
        for j in turn_ids:
            dec = sum(1 for x in example.turns if x == j)
            sup = sum(1 for x, lab in zip(example.turns, example.labels) if x == j and lab != IGNORE)
            per_turn.append(f"turn {j}: {dec} decode / {sup} supervised")
        summary += " | " + ", ".join(per_turn)
    return "".join(parts) + "\n" + legend + "\n" + summary


def use_color(no_color: bool) -> bool:
    return not no_color and "NO_COLOR" not in os.environ


# -- the CLI -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="speed-inspect",
        description="Print the SPEED token roles of a conversation or prompt.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="smollm2", help="'smollm2', 'gemma3', 'llama3', a local folder or a Hub id"
    )
    p.add_argument("--chat-template", default=None, help="override: 'tulu', 'llama3', 'chatml' or Jinja text")
    p.add_argument("--k", type=_k_arg, default=None, help="cutoff: layer count (24) or fraction (0.75)")
    p.add_argument("--anchor", choices=ANCHOR_POLICIES, default="bos")
    p.add_argument("--loss-scope", choices=LOSS_SCOPES, default="all_assistant")
    p.add_argument("--add-bos", type=_add_bos_arg, default="auto", help="auto (default), true or false")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--messages", help="a JSON list of {role, content} messages")
    src.add_argument(
        "--jsonl", type=Path, help="a JSONL file: one {'messages': [...]} object (or list) per line"
    )
    src.add_argument("--plain", help="a plain (non-chat) context; \\n and \\t escapes are expanded")
    p.add_argument("--n", type=int, default=3, help="with --jsonl: how many lines to show (default 3)")
    p.add_argument("--continuation", default=None, help="with --plain: the continuation to score")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--truncate", choices=TRUNCATE, default="error")
    p.add_argument(
        "--end-token-id", type=int, action="append", default=None, help="end-of-turn id (repeatable)"
    )
    p.add_argument("--no-color", action="store_true", help="bracket markup instead of ANSI colours")
    return p


def _k_arg(text: str) -> int | float | None:
    try:
        return parse_k(text)
    except SpeedConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_bos_arg(text: str):
    try:
        return check_add_bos(text)
    except SpeedConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _unescape(text: str) -> str:
    # Shell single quotes keep "\n" literal; prompts like "Question: ...\nAnswer:" need real newlines.
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _num_layers(model: str) -> int | None:
    """The model's layer count (None for a tokenizer-only folder or the Llama-3 tokenizer)."""
    from transformers import AutoConfig

    from speed_train.loading import PACKAGED_TOKENIZERS, locate

    where = locate(model, packaged=PACKAGED_TOKENIZERS)
    if where == "llama3":
        return None
    try:
        return AutoConfig.from_pretrained(str(where)).num_hidden_layers
    except (OSError, ValueError, AttributeError):
        return None


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
    with open(args.jsonl, encoding="utf-8-sig") as f:
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
    from speed_train.loading import ModelNotFoundError, load_tokenizer

    try:
        config = SpeedConfig(k=args.k, anchor=args.anchor, loss_scope=args.loss_scope, add_bos=args.add_bos)
        tokenizer = load_tokenizer(args.model, chat_template=args.chat_template)
        layers = _num_layers(args.model)
        depth = (
            f"k={args.k} (layer count unknown)"
            if layers is None
            else f"K={config.resolve_k(layers)} of {layers} layers"
        )
    except (SpeedConfigError, ModelNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"# model {args.model} | {depth} | anchor {config.anchor} | loss scope {config.loss_scope} | add_bos {args.add_bos}"
    )

    items: list[tuple[str, EncodedExample | RoleError]] = []
    if args.plain is not None:
        cont = _unescape(args.continuation) if args.continuation is not None else None
        try:
            ex = encode_plain(_unescape(args.plain), cont, tokenizer, config)
            items.append(("plain", ex))
        except RoleError as exc:
            items.append(("plain", exc))
    else:
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
    failed = 0
    color = use_color(args.no_color)
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
