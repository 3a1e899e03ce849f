"""Chat with a trained model, under SPEED as it was trained: ``python -m speed_train.chat``.

    python -m speed_train.chat outputs/<run>/export/model        # an HF-native export
    python -m speed_train.chat outputs/<run>/export/adapter      # a LoRA adapter on its base model
    python -m speed_train.chat smollm2 --k 22 --anchor bos       # any model at a chosen cutoff
    printf 'Hi!\\nAnd in French?\\n' | python -m speed_train.chat <folder>   # piped: one message a line

Replies stream as they are generated. Each turn re-prefills the history (earlier answers are
prompt for the next one, as in training). ``/reset`` starts a new conversation, ``/quit`` (or end
of input) leaves. K, the anchor and the BoS rule come from the model's saved settings unless given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from speed_train.cli import ArgumentParser, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m speed_train.chat",
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="an export or adapter folder, 'smollm2', or a Hub id")
    p.add_argument("--k", default=None, help="cutoff (layers or fraction; 'full'); default: the saved one")
    p.add_argument("--anchor", choices=("none", "bos", "system"), default=None)
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import TextStreamer

    from speed_train.eval.run import resolve_device
    from speed_train.loading import ModelNotFoundError, load_model, saved_speed_config
    from speed_train.speed.chat_roles import default_end_token_ids, encode_generation_prompt
    from speed_train.speed.config import SAVED, SpeedConfigError, with_overrides
    from speed_train.speed.generate import speed_generate
    from speed_train.speed.roles import RoleError

    try:
        device, dtype = resolve_device(args.device)
        model, tok = load_model(args.model, dtype=dtype, device=device)
        saved = saved_speed_config(model, args.model)
        cfg = with_overrides(saved, k=SAVED if args.k is None else args.k, anchor=args.anchor)
        L = model.config.num_hidden_layers
        K = cfg.resolve_k(L)  # once, now that the model is known
    except (ModelNotFoundError, SpeedConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not getattr(tok, "chat_template", None):
        print(f"error: {args.model}'s tokenizer has no chat template", file=sys.stderr)
        return 2
    end_ids = default_end_token_ids(tok)
    interactive = sys.stdin.isatty()
    print(f"# {args.model}: K={K} of {L} layers, anchor {cfg.anchor}. /reset, /quit", flush=True)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    start = list(history)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            history = list(start)
            print("(new conversation)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        try:
            prompt = encode_generation_prompt(history, tok, cfg)
        except RoleError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out = speed_generate(
            model,
            [prompt],
            K,
            max_new_tokens=args.max_new_tokens,
            stop_token_ids=end_ids,
            pad_token_id=tok.pad_token_id or 0,
            do_sample=args.temperature > 0,
            temperature=args.temperature or 1.0,
            top_p=args.top_p,
            streamer=streamer,
        )
        reply = tok.decode(
            [t for t in out.sequences[0] if t not in end_ids], skip_special_tokens=True
        ).strip()
        history.append({"role": "assistant", "content": reply or "..."})
    return 0


if __name__ == "__main__":
    sys.exit(main())
