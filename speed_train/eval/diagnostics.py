"""Layer-wise diagnostics of a full-depth model and an automatic choice of the SPEED cutoff K.

    python -m speed_train.eval.diagnostics --model smollm2 --n 16 --out diag/

Per layer l (decode-token queries only, averaged over heads, queries and conversations):
- attention mass on prompt / anchor / decode keys (sums to 1 per query), with SPEED's meaning
  of the roles: for a query of assistant turn t, "decode" is turn t's own decode tokens and
  earlier turns' answers count as prompt (they are history that upper layers never see);
- representation change r_l = 1 - cos(h_{l-1}, h_l) of decode tokens: the change made by layer
  l (l = 1..L-1; h_l is layer l's output). JSON ``rep_change[i]`` is r_{i+1};
- logit-lens KL(p_final || p_l), with p_l = softmax(lm_head(norm(h_l))).

auto-K rule (documented choice). SPEED must keep, below K, the layers where decode tokens read
the prompt and where their representations are still moving:
- K_attn: the smallest K whose layers 0..K-1 hold ``attn_frac`` (0.9) of the decode queries'
  total prompt attention mass summed over layers;
- K_rep: the smallest K such that every prompt-blind layer l in K..L-2 changes the decode
  tokens by at most ``rep_frac`` (0.5) x the largest change: r_l <= 0.5 max r (the maximum and
  the test both over layers 1..L-2; the last layer's own update is excluded: it is large in
  every model we looked at, it shapes the output distribution and says nothing about the prompt);
- recommended K = max(K_attn, K_rep). The upper layers K..L-1 become prompt-blind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from speed_train.atomic import save_figure, write_json
from speed_train.cli import ArgumentParser
from speed_train.speed.adapters import model_parts, unwrap
from speed_train.speed.batch import collate
from speed_train.speed.roles import ANCHOR, DECODE


@torch.no_grad()
def layer_diagnostics(model, examples) -> dict[str, list[float]]:
    """Curves over layers from a full-depth eager forward (attention weights are needed)."""
    lm = unwrap(model)
    parts = model_parts(lm)
    old = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        L = parts.num_layers
        sums = {"prompt": torch.zeros(L), "anchor": torch.zeros(L), "decode": torch.zeros(L)}
        rep, kl = torch.zeros(L - 1), torch.zeros(L)
        n_q = 0
        for ex in examples:
            batch = collate([ex], pad_id=0).to(parts.embed.weight.device)
            hs: list[torch.Tensor] = []  # each layer's (un-normed) output, via hooks
            hooks = [
                layer.register_forward_hook(
                    lambda _m, _i, o, hs=hs: hs.append(o[0] if isinstance(o, tuple) else o)
                )
                for layer in parts.layers
            ]
            try:
                out = lm(input_ids=batch.input_ids, position_ids=batch.position_ids, output_attentions=True)
            finally:
                for h in hooks:
                    h.remove()
            roles, turns = batch.roles[0], batch.turns[0]
            dec = (roles == DECODE).nonzero().flatten()
            if len(dec) == 0:
                continue
            n_q += len(dec)
            # key classes per query [Q, T]: own turn's decode tokens; anchors; everything else
            # (prompt tokens and earlier turns' answers) is prompt, as SPEED's upper layers see it
            own = (roles == DECODE)[None, :] & (turns[None, :] == turns[dec][:, None])
            anc = (roles == ANCHOR)[None, :].expand_as(own)
            classes = {"decode": own, "anchor": anc, "prompt": ~own & ~anc}
            for layer, att in enumerate(out.attentions):  # [1, H, T, T]
                a = att[0][:, dec].mean(0)  # [Q, T], averaged over heads
                for name, keys in classes.items():
                    sums[name][layer] += (a * keys).sum().float().cpu()
            final = out.logits[0, dec].float().log_softmax(-1)
            for layer in range(L):
                h = hs[layer][0, dec]
                if layer < L - 1:
                    h_next = hs[layer + 1][0, dec]
                    rep[layer] += (1 - torch.cosine_similarity(h.float(), h_next.float(), -1)).sum().cpu()
                lens = parts.logits(h).float().log_softmax(-1)
                kl[layer] += (final.exp() * (final - lens)).sum().cpu()
        if n_q == 0:
            raise ValueError(
                "no decode-phase tokens in the examples: diagnostics need assistant turns or answer cues"
            )
        return {
            "prompt_mass": (sums["prompt"] / n_q).tolist(),
            "anchor_mass": (sums["anchor"] / n_q).tolist(),
            "decode_mass": (sums["decode"] / n_q).tolist(),
            "rep_change": (rep / n_q).tolist(),
            "logit_lens_kl": (kl / n_q).tolist(),
            "num_queries": n_q,
        }
    finally:
        lm.set_attn_implementation(old)


def auto_k(curves: dict, attn_frac: float = 0.9, rep_frac: float = 0.5) -> dict:
    """Recommended cutoff (see the module doc): max(K_attn, K_rep), each a layer count."""
    m, r = curves["prompt_mass"], curves["rep_change"]
    L = len(m)
    total, acc, k_attn = sum(m), 0.0, L
    for i, v in enumerate(m):
        acc += v
        if acc >= attn_frac * total:
            k_attn = i + 1
            break
    # r[i] is the change made by layer i + 1; the last layer's own change is excluded
    inner = r[:-1] if len(r) > 1 else r
    thr = rep_frac * max(inner) if inner else 0.0
    # cutoff K: layers K..L-2 (changes r[K-1:]) go prompt-blind and must be quiet
    k_rep = next((k for k in range(1, L + 1) if all(v <= thr for v in inner[k - 1 :])), L)
    return {"k": max(k_attn, k_rep), "k_attn": k_attn, "k_rep": k_rep}


def plot(curves: dict, k: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(curves["prompt_mass"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = list(range(L))
    for key in ("prompt_mass", "anchor_mass", "decode_mass"):
        axes[0].plot(x, curves[key], label=key.replace("_", " "))
    axes[0].set_title("attention mass of decode queries")
    axes[1].plot(x[1:], curves["rep_change"])  # at the layer that makes the change
    axes[1].set_title("change made by layer l: 1 - cos(h_l-1, h_l)")
    axes[2].plot(x, curves["logit_lens_kl"])
    axes[2].set_yscale("log")
    axes[2].set_title("logit-lens KL to final layer")
    for ax in axes:
        ax.axvline(k - 0.5, color="red", linestyle="--", label=f"auto-K = {k}")
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _examples(tokenizer, n: int, anchor: str):
    from speed_train.data.recipes import load_conversations, load_recipe
    from speed_train.speed.chat_roles import encode_conversation
    from speed_train.speed.config import SpeedConfig
    from speed_train.speed.roles import RoleError

    _, held, _ = load_conversations(load_recipe("packaged_chat"), dedup_held_out=False)  # as documented
    cfg = SpeedConfig(anchor=anchor)
    out = []
    for conv in held:
        try:
            out.append(
                encode_conversation(conv["messages"], tokenizer, cfg, max_length=512, truncate="drop_turns")
            )
        except RoleError:
            continue
        if len(out) == n:
            break
    return out


def main(argv=None) -> dict:
    ap = ArgumentParser(
        prog="python -m speed_train.eval.diagnostics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=16, help="held-out packaged chat conversations")
    ap.add_argument("--anchor", default="bos")
    ap.add_argument("--attn-frac", type=float, default=0.9)
    ap.add_argument("--rep-frac", type=float, default=0.5)
    ap.add_argument("--out", default="diagnostics")
    args = ap.parse_args(argv)
    from speed_train.eval.run import load_eval_model

    model, tok, _ = load_eval_model(args.model)
    curves = layer_diagnostics(model, _examples(tok, args.n, args.anchor))
    rec = auto_k(curves, args.attn_frac, args.rep_frac)
    k = rec["k"]
    L = len(curves["prompt_mass"])
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    res = {
        "model": args.model,
        "auto_k": k,
        "k_attn": rec["k_attn"],
        "k_rep": rec["k_rep"],
        "num_layers": L,
        "attn_frac": args.attn_frac,
        "rep_frac": args.rep_frac,
        **curves,
    }
    write_json(d / "diagnostics.json", res)
    plot(curves, k, str(d / "diagnostics.png"), f"{args.model}: recommended K = {k} of {L}")
    print(
        f"recommended K = {k} of {L} layers ({k / L:.2f}; K_attn={rec['k_attn']}, K_rep={rec['k_rep']}); "
        f"curves and plot in {d}/"
    )
    return res


if __name__ == "__main__":
    main()
