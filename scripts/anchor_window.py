"""Does the anchor's place in the window matter? A one-off measurement behind docs/DESIGN.md
("Sliding windows"), zero-shot on the packaged Gemma-3-270M (make setup-gemma).

    python scripts/anchor_window.py --n 24 --min-tokens 700 --k 14 --json out.json

Long multi-turn conversations are built by chaining held-out packaged_instruct conversations until
the history before the last assistant turn is past the window (512), and the last turn's content
tokens are scored (its <end_of_turn> is left out: the base model has never seen one). Columns:
full depth; SPEED-K+BoS under the project's rule (an upper sliding layer hides the anchor once it is
a window back); SPEED-K+BoS under the rejected alternative (the anchor exempt from the window in
the upper layers); SPEED-K without an anchor. The alternative exists only here: its masks are the
package's own (visibility.layer_masks) with the anchor's column added back in the upper sliding
layers, so the comparison isolates that one choice.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from speed_train.data.recipes import load_conversations, load_recipe
from speed_train.loading import load_model
from speed_train.speed.adapters import LayerMasks, enable_speed_attention
from speed_train.speed.batch import collate
from speed_train.speed.chat_roles import encode_conversation
from speed_train.speed.config import SpeedConfig
from speed_train.speed.roles import ANCHOR, IGNORE, PROMPT, RoleError
from speed_train.speed.visibility import dense_mask, layer_masks


def long_conversations(tok, n: int, min_tokens: int, max_tokens: int):
    """Chains of held-out conversations whose last assistant turn starts past ``min_tokens``."""
    _, held, _ = load_conversations(load_recipe("packaged_instruct"), dedup_held_out=False)
    convs = [c["messages"] for c in held if c["messages"] and c["messages"][0]["role"] == "user"]
    cfg = SpeedConfig(anchor="bos", loss_scope="last_turn")
    out, chain, i = [], [], 0
    while len(out) < n and i < len(convs):
        chain = chain + convs[i]
        i += 1
        try:
            ex = encode_conversation(chain, tok, cfg, max_length=max_tokens)
        except RoleError:
            chain = []
            continue
        start = next(t for t, lab in enumerate(ex.labels) if lab != IGNORE)
        if start >= min_tokens:
            out.append(ex)
            chain = []
    return out


def paired_ci(per_conv: list[dict], a: str, b: str, draws: int = 10000) -> list[float]:
    """Mean per-token loss of column a minus b, and its 95% bootstrap interval over conversations."""
    g = torch.Generator().manual_seed(0)
    da = torch.tensor([c[a] - c[b] for c in per_conv], dtype=torch.float64)
    n = torch.tensor([c["tokens"] for c in per_conv], dtype=torch.float64)
    idx = torch.randint(0, len(per_conv), (draws, len(per_conv)), generator=g)
    boot = da[idx].sum(1) / n[idx].sum(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [float(da.sum() / n.sum()), lo, hi]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--k", type=int, default=14)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--min-tokens", type=int, default=700)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(args.model)
    parts = enable_speed_attention(model)
    L, K, windows = parts.num_layers, args.k, parts.windows
    end_ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
    examples = long_conversations(tok, args.n, args.min_tokens, args.max_tokens)
    cols = (
        "full depth",
        f"SPEED-{K}+BoS (window hides the anchor)",
        f"SPEED-{K}+BoS (anchor exempt)",
        f"SPEED-{K}",
    )
    sums = {c: 0.0 for c in cols}
    per_conv: list[dict[str, float]] = []  # summed loss per conversation and column (paired)
    count = 0
    for ex in examples:
        per_conv.append({"tokens": 0})
        batch = collate([ex], tok.pad_token_id)
        tgt = batch.targets()
        sel = (tgt != IGNORE) & ~torch.isin(tgt, torch.tensor(sorted(end_ids)))
        b, t = sel.nonzero(as_tuple=True)
        count += len(t)
        per_conv[-1]["tokens"] = len(t)
        plain = collate(
            [
                ex.__class__(
                    ex.input_ids, [PROMPT if r == ANCHOR else r for r in ex.roles], ex.turns, ex.labels
                )
            ],
            tok.pad_token_id,
        )
        for col in cols:
            bt = plain if col == cols[3] else batch
            k = L if col == cols[0] else K
            masks = layer_masks(bt.meta, range(L), k, windows)
            if col == cols[2]:  # the alternative: the anchor's column back in the upper sliding layers
                anchor = (bt.meta.roles == ANCHOR)[:, None, None, :]
                upper_full = dense_mask(bt.meta, True, None)
                for i in range(k, L):
                    if windows[i] is not None:
                        masks[i] = masks[i] | (upper_full & anchor)
            with torch.no_grad():
                h = parts.decoder(
                    input_ids=bt.input_ids,
                    position_ids=bt.position_ids,
                    speed_masks=LayerMasks(masks),
                    use_cache=False,
                ).last_hidden_state
                logits = parts.logits(h[b, t], normed=True).float()
            loss = float(torch.nn.functional.cross_entropy(logits, tgt[b, t], reduction="sum"))
            sums[col] += loss
            per_conv[-1][col] = loss
    lengths = [len(ex) for ex in examples]
    res = {
        "k": K,
        "examples": len(examples),
        "tokens_scored": count,
        "length_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
        "loss": {c: sums[c] / count for c in cols},
        # paired differences of the per-token loss, 95% bootstrap interval over conversations
        "rule_minus_exempt": paired_ci(per_conv, cols[1], cols[2]),
        "none_minus_rule": paired_ci(per_conv, cols[3], cols[1]),
        "per_conversation": per_conv,
        "minutes": (time.time() - t0) / 60,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "per_conversation"}, indent=2))
    print("| model | loss | ppl |\n|---|---|---|")
    for c in cols:
        print(f"| {c} | {res['loss'][c]:.4f} | {math.exp(res['loss'][c]):.2f} |")
    if args.json:
        from speed_train.atomic import write_json

        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
