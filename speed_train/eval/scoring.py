"""Log-likelihood scoring and generation under SPEED, for evaluation.

A multiple-choice question is one context and several continuations. The context is
shallow-prefilled once (lower layers over the whole prompt, upper layers over the anchor and
the answer cue); its cache is copied per choice and each continuation runs as a decode chunk
through all layers. The scores are exactly those of a teacher-forced SPEED forward over
context + continuation (tests/test_eval.py checks that against the mask executor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speed_train.speed.adapters import enable_speed_attention
from speed_train.speed.batch import collate
from speed_train.speed.config import SpeedConfig
from speed_train.speed.generate import decode_chunk, prefill, speed_generate
from speed_train.speed.plain_roles import encode_plain
from speed_train.speed.roles import DECODE, AddBos, tokenize
from speed_train.speed.visibility import TokenMeta


@dataclass
class ContinuationScore:
    logprob: float  # sum of log p(continuation tokens | context)
    num_tokens: int
    greedy: bool  # every continuation token is the argmax


@torch.no_grad()
def score_requests(
    model,
    tokenizer,
    cfg: SpeedConfig,
    requests: list[tuple[str, list[str]]],
    *,
    batch_size: int = 8,
    add_bos: AddBos = "auto",
    headers: tuple[str, ...] = (),
    progress=None,
) -> list[list[ContinuationScore]]:
    """Score each (context, [continuation, ...]) group; one prefill per context. ``add_bos``: the
    BoS rule of :mod:`speed_train.speed.roles` (the same tokens for every arm);
    ``headers``: chat headers ending chat-rendered contexts. ``progress(done)`` after each batch."""
    parts = enable_speed_attention(model)
    K = cfg.resolve_k(parts.num_layers)
    device = parts.embed.weight.device
    results: list[list[ContinuationScore]] = []
    for i in range(0, len(requests), batch_size):
        group = requests[i : i + batch_size]
        prompts = [
            encode_plain(ctx, None, tokenizer, cfg, add_bos=add_bos, headers=headers)
            for ctx, _ in group
        ]
        conts = [[tokenize(tokenizer, c) for c in cs] for _, cs in group]
        for g, (ctx, cs) in enumerate(group):
            for c, ids in zip(cs, conts[g]):
                if not ids:
                    raise ValueError(
                        f"continuation {c!r} of context ending {ctx[-40:]!r} tokenises to nothing"
                    )
        n_max = max(len(ids) for cs in conts for ids in cs)
        batch = collate(prompts, tokenizer.pad_token_id or 0).to(device)
        parts.check_length(batch.input_ids.shape[1] + n_max)
        cache, first_logits = prefill(parts, K, batch, n_max)
        lengths = batch.attention_mask.sum(1)
        # one row per (context, choice): copy the context's cache, run the continuation
        owner = torch.tensor([g for g, cs in enumerate(conts) for _ in cs], device=device)
        flat = [ids for cs in conts for ids in cs]
        R = len(flat)
        toks = torch.full((R, n_max), tokenizer.pad_token_id or 0, dtype=torch.long, device=device)
        seq = torch.full((R, n_max), -1, dtype=torch.long, device=device)
        for r, ids in enumerate(flat):
            toks[r, : len(ids)] = torch.tensor(ids, device=device)
            seq[r, : len(ids)] = 0
        turn = torch.tensor([p.turns[-1] for p in prompts], device=device)[owner]
        meta = TokenMeta(torch.full_like(toks, DECODE), turn[:, None].expand(R, n_max).clone(), seq)
        positions = lengths[owner][:, None] + torch.arange(n_max, device=device)[None, :]
        chunk_logits = decode_chunk(parts, cache.select_rows(owner), toks, positions, meta)
        # logits predicting continuation token j: the context's last token (j = 0), else chunk j-1
        pred = torch.cat([first_logits[owner][:, None], chunk_logits[:, :-1]], 1).float().log_softmax(-1)
        tok_lp = pred.gather(-1, toks[:, :, None]).squeeze(-1)
        greedy = pred.argmax(-1) == toks
        r = 0
        for cs in conts:
            out = []
            for ids in cs:
                n = len(ids)
                out.append(ContinuationScore(float(tok_lp[r, :n].sum()), n, bool(greedy[r, :n].all())))
                r += 1
            results.append(out)
        if progress is not None:
            progress(len(results))
    return results


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    cfg: SpeedConfig,
    contexts: list[str],
    *,
    max_new_tokens: int = 256,
    stop_sequences: tuple[str, ...] = (),
    batch_size: int = 4,
    add_bos: AddBos = "auto",
    headers: tuple[str, ...] = (),
    progress=None,
) -> list[str]:
    """Greedy SPEED generation from plain prompts, cut at the first stop sequence.
    ``progress(done, total)`` is called after every batch."""
    eos = [t for t in {tokenizer.eos_token_id} if t is not None]
    stop_fn = None
    if any(stop_sequences):
        # a row stops as soon as its text holds a stop string (e.g. GSM8K's "Question:"): a string
        # of m characters spans at most m tokens, so the tail of m + 2 tokens is enough to look at
        tail = max(len(x) for x in stop_sequences) + 2

        def stop_fn(ids: list[int]) -> bool:
            text = tokenizer.decode(ids[-tail:], skip_special_tokens=True)
            return any(x and x in text for x in stop_sequences)

    outs: list[str] = []
    parts = enable_speed_attention(model)
    K = cfg.resolve_k(parts.num_layers)
    for i in range(0, len(contexts), batch_size):
        prompts = [
            encode_plain(c, None, tokenizer, cfg, add_bos=add_bos, headers=headers)
            for c in contexts[i : i + batch_size]
        ]
        gen = speed_generate(
            model,
            prompts,
            K,
            max_new_tokens=max_new_tokens,
            stop_token_ids=eos,
            pad_token_id=tokenizer.pad_token_id or 0,
            stop_fn=stop_fn,
        )
        for seq in gen.sequences:
            text = tokenizer.decode([t for t in seq if t not in eos], skip_special_tokens=True)
            cut = min([text.find(s) for s in stop_sequences if s and s in text], default=len(text))
            outs.append(text[:cut])
        if progress is not None:
            progress(len(outs), len(contexts))
    return outs


def chat_headers(tokenizer) -> tuple[str, ...]:
    """The assistant header(s) the tokenizer's chat template appends for generation (first and
    later turns), for contexts rendered with it (lm-eval's --apply_chat_template)."""
    from speed_train.speed.chat_roles import chat_renderer

    if not getattr(tokenizer, "chat_template", None):
        return ()
    render = chat_renderer(tokenizer)
    found: list[str] = []
    for history in (
        [{"role": "user", "content": "x"}],
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "user", "content": "z"},
        ],
    ):
        try:
            nogen, gen = render(history, False), render(history, True)
        except Exception:  # a template that cannot render this history: no header from it
            continue
        if gen.startswith(nogen) and gen != nogen and gen[len(nogen) :] not in found:
            found.append(gen[len(nogen) :])
    return tuple(found)
