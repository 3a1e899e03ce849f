"""Mask, gather and shallow-prefill generation agree with the spec's reference (and each other)."""

from __future__ import annotations

import pytest
import torch

from speed_train.speed.adapters import SUPPORTED_ARCHITECTURES, UnsupportedModelError, model_parts
from speed_train.speed.batch import collate, pack_first_fit
from speed_train.speed.config import SpeedConfig, SpeedConfigError
from speed_train.speed.executors import gather_forward, mask_forward, speed_forward, speed_loss
from speed_train.speed.generate import speed_generate
from speed_train.speed.roles import ANCHOR, DECODE, IGNORE, PROMPT, EncodedExample
from speed_train.speed.tiny import tiny_model
from tests.reference import reference_logits

L = 4
ATOL = 1e-5


def make_example(anchor: str, turns: int, *, seed: int, prompt_len: int = 5) -> EncodedExample:
    """A synthetic conversation: [anchor | system] user header content end [glue user header ...].

    Role layout follows the spec for each anchor policy; token ids are random."""
    g = torch.Generator().manual_seed(seed)
    roles: list[int] = []
    tids: list[int] = []
    sup: list[bool] = []

    def add(role, turn, n, supervised=False):
        roles.extend([role] * n)
        tids.extend([turn] * n)
        sup.extend([supervised] * n)

    n_sys = 3
    if anchor == "none":
        add(PROMPT, -1, n_sys)
    elif anchor == "bos":
        add(ANCHOR, -1, 1)
        add(PROMPT, -1, n_sys - 1)
    else:  # system: the whole leading system message
        add(ANCHOR, -1, n_sys)
    for j in range(turns):
        add(PROMPT, -1, prompt_len + j)  # user turn (+ glue of the previous turn)
        add(DECODE, j, 2)  # assistant header: decode phase, no loss
        add(DECODE, j, 3 + j, supervised=True)  # content + end token
    ids = torch.randint(3, 96, (len(roles),), generator=g).tolist()
    labels = [i if s else IGNORE for i, s in zip(ids, sup)]
    return EncodedExample(ids, roles, tids, labels)


def padded_batch(anchor: str):
    # one single-turn and one multi-turn conversation, different lengths: right padding
    return collate([make_example(anchor, 1, seed=1), make_example(anchor, 3, seed=2)], pad_id=0)


def _decode_err(out, ref, batch):
    dense = out.dense(batch.input_ids.shape)
    sel = (batch.roles == DECODE) & (batch.seq_ids >= 0)
    return float((dense[sel] - ref[sel]).abs().max())


@pytest.fixture(scope="module", params=SUPPORTED_ARCHITECTURES)
def model(request):
    return tiny_model(request.param, layers=L)


@pytest.mark.parametrize("anchor", ["none", "bos", "system"])
@pytest.mark.parametrize("K", [1, L // 2, L - 1, L])
def test_three_executions_agree_with_reference(model, anchor, K):
    batch = padded_batch(anchor)
    with torch.no_grad():
        ref = reference_logits(model, batch, K)
        assert _decode_err(mask_forward(model, batch, K), ref, batch) <= ATOL
        assert _decode_err(gather_forward(model, batch, K), ref, batch) <= ATOL

    # shallow-prefill generation: prompt = everything up to the last header, then greedy decode;
    # each step's logits must equal the teacher-forced reference over the generated sequence.
    convs = [make_example(anchor, 1, seed=1), make_example(anchor, 3, seed=2)]
    prompts = []
    for ex in convs:
        last = max(ex.turns)
        n = next(i for i, (r, t) in enumerate(zip(ex.roles, ex.turns)) if r == DECODE and t == last) + 2
        prompts.append(EncodedExample(ex.input_ids[:n], ex.roles[:n], ex.turns[:n], [IGNORE] * n))
    gen = speed_generate(model, prompts, K, max_new_tokens=4, keep_logits=True)
    fulls = []
    for p, seq in zip(prompts, gen.sequences):
        t = p.turns[-1]
        fulls.append(
            EncodedExample(
                p.input_ids + seq,
                p.roles + [DECODE] * len(seq),
                p.turns + [t] * len(seq),
                [IGNORE] * (len(p) + len(seq)),
            )
        )
    fb = collate(fulls, pad_id=0)
    with torch.no_grad():
        ref = reference_logits(model, fb, K)
    for b, (p, seq) in enumerate(zip(prompts, gen.sequences)):
        for s in range(len(seq)):
            err = (gen.step_logits[s][b] - ref[b, len(p) - 1 + s]).abs().max()
            assert err <= ATOL, (b, s, float(err))


def _grads(model, batch, K, executor):
    model.zero_grad(set_to_none=True)
    parts = model_parts(model)
    captured = {}

    def hook(_m, _i, out):
        out.retain_grad()
        captured["emb"] = out

    h = parts.embed.register_forward_hook(hook)
    try:
        loss = speed_loss(model, batch, K, executor=executor)
        loss.mean.backward()
    finally:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, captured["emb"].grad.clone(), grads


def _rel(a, b):
    """Relative error ||a - b|| / ||b|| (Frobenius): fp32 summation order differs between the
    executions, so single elements near zero carry ~1e-5 relative noise."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("anchor", ["none", "bos", "system"])
@pytest.mark.parametrize("K", [1, L // 2, L - 1, L])
def test_mask_and_gather_gradients_agree(model, anchor, K):
    batch = padded_batch(anchor)
    lm, gm, pm = _grads(model, batch, K, "mask")
    lg, gg, pg = _grads(model, batch, K, "gather")
    assert lm.num_tokens == lg.num_tokens == int((batch.targets() != IGNORE).sum())
    assert abs(lm.loss_sum.item() - lg.loss_sum.item()) <= 1e-5 * abs(lm.loss_sum.item())
    assert _rel(gm, gg) <= 1e-5
    assert pm.keys() == pg.keys() and len(pm) > 0
    for name in pm:
        assert _rel(pm[name], pg[name]) <= 1e-5, name
    # and the loss is the reference CE over supervised tokens
    with torch.no_grad():
        ref = reference_logits(model, batch, K)
    tgt = batch.targets()
    ce = torch.nn.functional.cross_entropy(ref[tgt != IGNORE], tgt[tgt != IGNORE], reduction="sum")
    assert abs(ce.item() - lm.loss_sum.item()) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("executor", ["mask", "gather"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_packed_row_equals_unpacked(arch, executor, K):
    model = tiny_model(arch, layers=L)
    exs = [make_example("bos", 2, seed=3), make_example("bos", 1, seed=4), make_example("system", 3, seed=5)]
    unpacked, packed = collate(exs, pad_id=0), collate(pack_first_fit(exs, 128), pad_id=0, pack_to=128)
    assert packed.input_ids.shape[0] == 1 and int(packed.seq_ids.max()) == 2
    with torch.no_grad():
        a = speed_forward(model, unpacked, K, executor=executor, positions="targets")
        b = speed_forward(model, packed, K, executor=executor, positions="targets")
        la = speed_loss(model, unpacked, K, executor=executor)
        lb = speed_loss(model, packed, K, executor=executor)
    # same tokens in the same order (conversation by conversation)
    assert torch.equal(
        unpacked.input_ids[a.batch_idx, a.pos_idx + 1], packed.input_ids[b.batch_idx, b.pos_idx + 1]
    )
    assert float((a.logits - b.logits).abs().max()) <= ATOL
    assert la.num_tokens == lb.num_tokens
    assert abs(float(la.loss_sum - lb.loss_sum)) <= 1e-4


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_full_depth_is_the_unmodified_model(arch):
    model = tiny_model(arch, layers=L)
    exs = [make_example("bos", 1, seed=6), make_example("bos", 2, seed=7)]
    batch = collate(exs, pad_id=0)
    parts = model_parts(model)
    with torch.no_grad():
        hf = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        for executor in ("mask", "gather"):
            out = speed_forward(model, batch, L, executor=executor)
            expect = parts.lm_head(hf[out.batch_idx, out.pos_idx])
            assert torch.equal(out.logits, expect), executor
    # and K = L generation is HF's greedy generate, token for token
    ex = exs[1]
    n = ex.roles.index(DECODE) + 2
    prompt = EncodedExample(ex.input_ids[:n], ex.roles[:n], ex.turns[:n], [IGNORE] * n)
    hf_out = model.generate(
        torch.tensor([prompt.input_ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    ours = speed_generate(model, [prompt], L, max_new_tokens=8)
    assert ours.sequences[0] == hf_out[0, n:].tolist()


def test_speed_config_fraction_and_errors():
    assert SpeedConfig(k=0.75).resolve_k(30) == 22  # round(22.5) -> banker's 22
    assert SpeedConfig(k=0.8).resolve_k(30) == 24
    assert SpeedConfig(k=24).resolve_k(32) == 24
    assert SpeedConfig().resolve_k(30) == 30
    with pytest.raises(SpeedConfigError, match="exceeds the model's 4 layers"):
        SpeedConfig(k=5).resolve_k(4)
    with pytest.raises(SpeedConfigError, match="at least 1 layer"):
        SpeedConfig(k=0)
    with pytest.raises(SpeedConfigError, match=r"outside \(0, 1\]"):
        SpeedConfig(k=1.5)
    with pytest.raises(SpeedConfigError, match="layer count"):
        SpeedConfig(k="24")
    with pytest.raises(SpeedConfigError, match="unknown anchor policy 'eos'"):
        SpeedConfig(anchor="eos")
    with pytest.raises(SpeedConfigError, match="unknown loss scope"):
        SpeedConfig(loss_scope="first_turn")
    model = tiny_model("llama", layers=L)
    with pytest.raises(SpeedConfigError, match="exceeds the model's 4 layers"):
        mask_forward(model, padded_batch("bos"), 7)
    for unresolved in (0.5, None, SpeedConfig(k=2)):  # K is resolved once, where the model is known
        with pytest.raises(SpeedConfigError, match="SPEED executions take a layer count"):
            mask_forward(model, padded_batch("bos"), unresolved)
    with pytest.raises(ValueError, match="unknown executor 'dense'"):
        speed_forward(model, padded_batch("bos"), 2, executor="dense")


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="no adapter for architecture 'gpt2'.*supported: llama"):
        mask_forward(gpt2, padded_batch("bos"), 1)


def test_sliding_window_longer_than_sequence_is_refused():
    model = tiny_model("mistral", layers=2, sliding_window=8)
    with pytest.raises(UnsupportedModelError, match="exceeds the model's sliding window"):
        gather_forward(model, padded_batch("bos"), 1)


def test_generation_prompt_must_end_in_decode_phase():
    model = tiny_model("llama", layers=L)
    ex = make_example("bos", 1, seed=1)
    bad = EncodedExample(ex.input_ids[:4], ex.roles[:4], ex.turns[:4], [IGNORE] * 4)
    with pytest.raises(ValueError, match="prompt 0 does not end with a decode-phase token"):
        speed_generate(model, [bad], 2)


def test_generation_stops_and_samples_reproducibly():
    model = tiny_model("llama", layers=L)
    ex = make_example("bos", 1, seed=1)
    n = ex.roles.index(DECODE) + 2
    prompt = EncodedExample(ex.input_ids[:n], ex.roles[:n], ex.turns[:n], [IGNORE] * n)
    greedy = speed_generate(model, [prompt], 2, max_new_tokens=6).sequences[0]
    stop = greedy[2]
    stopped = speed_generate(model, [prompt], 2, max_new_tokens=6, stop_token_ids=[stop]).sequences[0]
    assert stopped == greedy[: greedy.index(stop) + 1]
    # a stop predicate (stop strings) ends one row early; the other row runs on unchanged
    ex2 = make_example("bos", 1, seed=2)
    n2 = ex2.roles.index(DECODE) + 2
    prompt2 = EncodedExample(ex2.input_ids[:n2], ex2.roles[:n2], ex2.turns[:n2], [IGNORE] * n2)
    greedy2 = speed_generate(model, [prompt2], 2, max_new_tokens=6).sequences[0]
    assert greedy2[:3] != greedy[:3]
    out = speed_generate(
        model, [prompt, prompt2], 2, max_new_tokens=6, stop_fn=lambda ids: ids == greedy[:3]
    ).sequences
    assert out == [greedy[:3], greedy2]

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return speed_generate(
            model,
            [prompt, prompt],
            2,
            max_new_tokens=6,
            do_sample=True,
            temperature=1.5,
            top_k=20,
            top_p=0.9,
            generator=g,
        ).sequences

    assert sample(0) == sample(0)
    assert len(sample(1)[0]) == 6


def test_cache_holds_only_anchor_and_decode_in_upper_layers():
    model = tiny_model("llama", layers=L)
    ex = make_example("system", 2, seed=9)
    last = max(ex.turns)
    n = next(i for i, (r, t) in enumerate(zip(ex.roles, ex.turns)) if r == DECODE and t == last) + 2
    prompt = EncodedExample(ex.input_ids[:n], ex.roles[:n], ex.turns[:n], [IGNORE] * n)
    out = speed_generate(model, [prompt], 2, max_new_tokens=5, stop_token_ids=[])
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # K+V fp32
    n_anchor = prompt.roles.count(ANCHOR)
    written = len(out.sequences[0]) - 1  # the last sampled token is never fed back
    active = out.cache.active_bytes_per_layer()
    assert active[:2] == [(n + written) * per_token] * 2
    assert active[2:] == [(n_anchor + 2 + written) * per_token] * 2


def test_a_sequence_past_the_models_positions_is_warned_about():
    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.speed.chat_roles import encode_generation_prompt

    tok = load_smollm2_tokenizer()
    model = tiny_model("llama", layers=4, vocab=len(tok))
    model.config.max_position_embeddings = 64  # as a 4,096-position model sees a 6,000-token prompt
    prompt = encode_generation_prompt([{"role": "user", "content": "word " * 80}], tok, SpeedConfig(k=2))
    assert len(prompt) > 64
    with pytest.warns(
        UserWarning,
        match=rf"a sequence of {len(prompt) + 2} tokens \(prompt plus new tokens\) runs past the model's 64 positions",
    ):
        speed_generate(model, [prompt], 2, max_new_tokens=2)


# -- Gemma-3: sliding-window layers (tiny configs: window 8, full attention every third layer) --


def _gen_prompt(ex: EncodedExample) -> EncodedExample:
    """Everything up to and including the last turn's 2-token header."""
    last = max(ex.turns)
    n = next(i for i, (r, t) in enumerate(zip(ex.roles, ex.turns)) if r == DECODE and t == last) + 2
    return EncodedExample(ex.input_ids[:n], ex.roles[:n], ex.turns[:n], [IGNORE] * n)


def test_sliding_window_rule_exact_values():
    """One row: BoS anchor at position 0, prompt 1..10, decode 11..13; a window of 8 hides every key
    8 or more positions back, at both depths and for every role: the anchor included."""
    from speed_train.speed.visibility import TokenMeta, dense_mask, is_plain_causal

    roles = torch.tensor([[ANCHOR] + [PROMPT] * 10 + [DECODE] * 3])
    turns = torch.tensor([[-1] * 11 + [0] * 3])
    meta = TokenMeta(roles, turns, torch.zeros_like(roles), torch.arange(14)[None])

    def seen(upper, window, q=13):
        return dense_mask(meta, upper, window)[0, 0, q].nonzero().flatten().tolist()

    assert seen(False, None) == list(range(14))
    assert seen(False, 8) == list(range(6, 14))
    assert seen(True, None) == [0, 11, 12, 13]  # an upper full-attention layer: the anchor + the turn
    assert seen(True, 8) == [11, 12, 13]  # an upper sliding layer: position 0 is out of the window
    assert seen(True, 8, q=7) == [7]  # a prompt token sees itself
    # a 10-token row, decode at 7..9: the anchor is within the window of position 7 only
    short = TokenMeta(
        torch.tensor([[ANCHOR] + [PROMPT] * 6 + [DECODE] * 3]),
        torch.tensor([[-1] * 7 + [0] * 3]),
        torch.zeros(1, 10, dtype=torch.long),
        torch.arange(10)[None],
    )
    rows = dense_mask(short, True, 8)[0, 0, 7:]
    assert [r.nonzero().flatten().tolist() for r in rows] == [[0, 7], [7, 8], [7, 8, 9]]
    # a gather row (anchor + decode at their original positions) gets the full row's mask
    keep = [0, 11, 12, 13]
    row = TokenMeta(roles[:, keep], turns[:, keep], torch.zeros(1, 4, dtype=torch.long), torch.tensor([keep]))
    assert not is_plain_causal(row, True, 8) and is_plain_causal(row, True, None)
    assert torch.equal(dense_mask(row, True, 8)[0, 0], dense_mask(meta, True, 8)[0, 0][keep][:, keep])
    with pytest.raises(ValueError, match="needs the tokens' positions"):
        dense_mask(TokenMeta(roles, turns, torch.zeros_like(roles)), True, 8)


def test_sliding_window_is_exercised_and_applied():
    """The test prompts are longer than the window, so dropping the window changes the decode
    logits; the executions follow the windowed reference, not the unwindowed one."""
    model = tiny_model("gemma3", layers=L)
    wide = tiny_model("gemma3", layers=L, sliding_window=4096)  # the same weights, no effective window
    batch = padded_batch("bos")
    sel = (batch.roles == DECODE) & (batch.seq_ids >= 0)
    with torch.no_grad():
        for K in (2, L):
            ref, ref_wide = reference_logits(model, batch, K), reference_logits(wide, batch, K)
            assert float((ref[sel] - ref_wide[sel]).abs().max()) > 1e-2
            for run in (mask_forward, gather_forward):
                assert _decode_err(run(model, batch, K), ref, batch) <= ATOL


@pytest.mark.parametrize("anchor", ["none", "bos"])
@pytest.mark.parametrize("K", [2, 3, 5])
def test_gemma3_global_layers_above_and_below_k_long_prompts(anchor, K):
    """Six layers, full attention at 2 and 5 (K=3: one below, one above); prompts three windows
    long and a generation longer than the window (decode tokens leave each other's window)."""
    model = tiny_model("gemma3", layers=6)
    assert [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"] == [2, 5]
    convs = [make_example(anchor, 1, seed=11, prompt_len=24), make_example(anchor, 2, seed=12, prompt_len=9)]
    batch = collate(convs, pad_id=0)
    with torch.no_grad():
        ref = reference_logits(model, batch, K)
        assert _decode_err(mask_forward(model, batch, K), ref, batch) <= ATOL
        assert _decode_err(gather_forward(model, batch, K), ref, batch) <= ATOL
    prompts = [_gen_prompt(ex) for ex in convs]
    gen = speed_generate(model, prompts, K, max_new_tokens=12, keep_logits=True)
    fulls = [
        EncodedExample(
            p.input_ids + seq,
            p.roles + [DECODE] * len(seq),
            p.turns + [p.turns[-1]] * len(seq),
            [IGNORE] * (len(p) + len(seq)),
        )
        for p, seq in zip(prompts, gen.sequences)
    ]
    assert all(len(seq) == 12 for seq in gen.sequences)
    with torch.no_grad():
        ref = reference_logits(model, collate(fulls, pad_id=0), K)
    for b, (p, seq) in enumerate(zip(prompts, gen.sequences)):
        for s_ in range(len(seq)):
            err = (gen.step_logits[s_][b] - ref[b, len(p) - 1 + s_]).abs().max()
            assert err <= ATOL, (b, s_, float(err))


def test_gemma3_full_depth_generation_equals_hf_beyond_the_window():
    """K = L: 20 greedy tokens after a 30-token prompt, token for token HF's own generate()
    (its sliding-window cache)."""
    model = tiny_model("gemma3", layers=6)
    prompt = _gen_prompt(make_example("bos", 1, seed=13, prompt_len=24))
    assert len(prompt) > 3 * model.config.sliding_window
    hf_out = model.generate(
        torch.tensor([prompt.input_ids]),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    ours = speed_generate(model, [prompt], 6, max_new_tokens=20)
    assert ours.sequences[0] == hf_out[0, len(prompt) :].tolist()


def test_gemma3_final_logit_softcapping_is_applied():
    model = tiny_model("gemma3", layers=L, final_logit_softcapping=0.5)
    batch = padded_batch("bos")
    with torch.no_grad():
        out = mask_forward(model, batch, 2)
        ref = reference_logits(model, batch, 2)
    assert float(out.logits.abs().max()) <= 0.5
    assert _decode_err(out, ref, batch) <= ATOL
