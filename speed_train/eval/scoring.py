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
from speed_train.speed.roles import DECODE, tokenize
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
    headers: tuple[str, ...] = (),
    progress=None,
    layout: str = "tree",
) -> list[list[ContinuationScore]]:
    """Score each (context, [continuation, ...]) group; one prefill per context. ``cfg.add_bos``:
    the BoS rule of :mod:`speed_train.speed.roles` (the same tokens for every arm);
    ``headers``: chat headers ending chat-rendered contexts. ``progress(done)`` after each batch.

    ``layout``: ``"tree"`` (default) runs a context's continuations side by side in one row on
    top of its cache, each seeing the context and its own tokens only (``decode_chunk``'s
    branches): no cache copy and no padding to the longest continuation. ``"rows"`` copies the
    context's cache once per continuation (the earlier layout; kept as the reference the tests
    and ``python -m speed_train.bench.eval`` compare against)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    parts = enable_speed_attention(model)
    K = cfg.resolve_k(parts.num_layers)
    device = parts.embed.weight.device
    pad = tokenizer.pad_token_id or 0
    run = _score_tree if layout == "tree" else _score_rows
    results: list[list[ContinuationScore]] = []
    for i in range(0, len(requests), batch_size):
        group = requests[i : i + batch_size]
        prompts = [encode_plain(ctx, None, tokenizer, cfg, headers=headers) for ctx, _ in group]
        conts = [[tokenize(tokenizer, c) for c in cs] for _, cs in group]
        for g, (ctx, cs) in enumerate(group):
            for c, ids in zip(cs, conts[g]):
                if not ids:
                    raise ValueError(
                        f"continuation {c!r} of context ending {ctx[-40:]!r} tokenises to nothing"
                    )
        batch = collate(prompts, pad, gather=False).to(device)
        parts.check_length(batch.input_ids.shape[1] + max(len(ids) for cs in conts for ids in cs))
        results += run(parts, K, batch, prompts, conts, pad)
        if progress is not None:
            progress(len(results))
    return results


LAYOUTS = ("tree", "rows")


def batch_order(
    tokenizer, cfg: SpeedConfig, requests: list[tuple[str, list[str]]], batch_size: int
) -> list[int]:
    """An order of ``requests`` whose consecutive batches of ``batch_size`` pad little: a batch
    runs as [batch, longest context] in the prefill and [batch, widest tree] in the decode chunk
    (a tree: a context's continuations side by side, each without its last token). Of three
    orders (by context length then tree width within windows of 4 batches, the converse, and by
    their sum) the one with the fewest padded tokens is kept; the scores do not depend on it."""
    sizes = [
        (len(encode_plain(ctx, None, tokenizer, cfg)), sum(len(tokenize(tokenizer, c)) - 1 for c in cs))
        for ctx, cs in requests
    ]
    n, window = len(sizes), 4 * batch_size

    def two_level(first: int) -> list[int]:
        coarse = sorted(range(n), key=lambda i: (sizes[i][first], i))
        return [
            j
            for w in range(0, n, window)
            for j in sorted(coarse[w : w + window], key=lambda i: (sizes[i][1 - first], i))
        ]

    def padded(order: list[int]) -> int:
        total = 0
        for b in range(0, n, batch_size):
            batch = [sizes[i] for i in order[b : b + batch_size]]
            total += len(batch) * (max(c for c, _ in batch) + max(w for _, w in batch))
        return total

    candidates = [two_level(0), two_level(1), sorted(range(n), key=lambda i: (sum(sizes[i]), i))]
    return min(candidates, key=padded)


def _scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether it is the argmax, for predicting logits [N, V] (one row per target
    token), without a log-softmax over the vocabulary of every row."""
    logits = logits.float()
    lp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return lp, logits.argmax(-1) == targets


def _collect(
    conts: list[list[list[int]]], lp: torch.Tensor, greedy: torch.Tensor
) -> list[list[ContinuationScore]]:
    """Per-token results in (context, continuation, token) order -> one score per continuation."""
    out, r = [], 0
    lp, greedy = lp.tolist(), greedy.tolist()
    for cs in conts:
        row = []
        for ids in cs:
            n = len(ids)
            row.append(ContinuationScore(float(sum(lp[r : r + n])), n, all(greedy[r : r + n])))
            r += n
        out.append(row)
    return out


def _score_tree(parts, K: int, batch, prompts, conts, pad: int) -> list[list[ContinuationScore]]:
    """Every continuation of context b in row b, as branches of one decode chunk. A branch's last
    token predicts nothing that is scored and no other token attends to it (its branch ends
    there), so it is left out: n - 1 tokens per continuation, none for a one-token one."""
    device = batch.input_ids.device
    B = len(conts)
    W = max(sum(len(ids) - 1 for ids in cs) for cs in conts)
    cache, first_logits = prefill(parts, K, batch, W)
    lengths = batch.attention_mask.sum(1).tolist()
    toks = torch.full((B, W), pad, dtype=torch.long)
    pos = torch.zeros((B, W), dtype=torch.long)
    branch = torch.full((B, W), -1, dtype=torch.long)
    rows, cols, targets = [], [], []  # per continuation token: where its predicting logits are
    for b, cs in enumerate(conts):
        o = 0
        for j, ids in enumerate(cs):
            n = len(ids) - 1  # the tokens fed: all but the last
            toks[b, o : o + n] = torch.tensor(ids[:-1])
            pos[b, o : o + n] = torch.arange(lengths[b], lengths[b] + n)
            branch[b, o : o + n] = j
            # token 0 is predicted by the context's last token (column 0 below), token i by the
            # fed token i - 1 (column o + i - 1 of the chunk)
            rows += [b] * (n + 1)
            cols += [0] + list(range(o + 1, o + n + 1))
            targets += ids
            o += n
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    logits = first_logits[rows_t].clone()
    inner = cols_t > 0
    if W > 0:  # W = 0: every continuation is one token, scored from the prefill's logits alone
        toks, pos, branch = toks.to(device), pos.to(device), branch.to(device)
        turn = torch.tensor([p.turns[-1] for p in prompts], device=device)[:, None].expand(B, W).clone()
        meta = TokenMeta(torch.full_like(toks, DECODE), turn, torch.where(branch >= 0, 0, -1))
        hidden = decode_chunk(parts, cache, toks, pos, meta, branch, head=False)
        # the LM head only where a next token is scored
        logits[inner] = parts.logits(hidden[rows_t[inner], cols_t[inner] - 1])
    return _collect(conts, *_scores(logits, torch.tensor(targets, device=device)))


def _score_rows(parts, K: int, batch, prompts, conts, pad: int) -> list[list[ContinuationScore]]:
    """One row per (context, continuation): the context's cache copied, the continuation on top."""
    device = batch.input_ids.device
    n_max = max(len(ids) for cs in conts for ids in cs)
    cache, first_logits = prefill(parts, K, batch, n_max)
    lengths = batch.attention_mask.sum(1)
    owner = torch.tensor([g for g, cs in enumerate(conts) for _ in cs], device=device)
    flat = [ids for cs in conts for ids in cs]
    R = len(flat)
    toks = torch.full((R, n_max), pad, dtype=torch.long, device=device)
    seq = torch.full((R, n_max), -1, dtype=torch.long, device=device)
    for r, ids in enumerate(flat):
        toks[r, : len(ids)] = torch.tensor(ids, device=device)
        seq[r, : len(ids)] = 0
    turn = torch.tensor([p.turns[-1] for p in prompts], device=device)[owner]
    meta = TokenMeta(torch.full_like(toks, DECODE), turn[:, None].expand(R, n_max).clone(), seq)
    positions = lengths[owner][:, None] + torch.arange(n_max, device=device)[None, :]
    chunk = decode_chunk(parts, cache.select_rows(owner), toks, positions, meta)
    logits = torch.cat([first_logits[owner][:, None], chunk], 1)  # column i predicts token i
    rows = torch.tensor([r for r, ids in enumerate(flat) for _ in ids], device=device)
    cols = torch.tensor([i for ids in flat for i in range(len(ids))], device=device)
    targets = torch.tensor([t for ids in flat for t in ids], device=device)
    return _collect(conts, *_scores(logits[rows, cols], targets))


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
            encode_plain(c, None, tokenizer, cfg, headers=headers) for c in contexts[i : i + batch_size]
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
