"""The packaged real model (SmolLM2-135M-Instruct): SPEED generation is exactly the mask forward."""

from __future__ import annotations

import pytest
import torch

from speed_train.speed.batch import collate
from speed_train.speed.chat_roles import encode_generation_prompt
from speed_train.speed.config import SpeedConfig
from speed_train.speed.executors import gather_forward, mask_forward
from speed_train.speed.generate import speed_generate
from speed_train.speed.roles import DECODE, IGNORE, EncodedExample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from speed_train.assets import load_smollm2

    return load_smollm2()


def _prompt(tok, cfg, question):
    return encode_generation_prompt([{"role": "user", "content": question}], tok, cfg)


def test_full_depth_answers_capital_of_france(smollm2):
    model, tok = smollm2
    cfg = SpeedConfig(k=None, anchor="bos")
    p = _prompt(tok, cfg, "What is the capital of France?")
    out = speed_generate(
        model,
        [p],
        cfg.resolve_k(model.config.num_hidden_layers),
        max_new_tokens=20,
        stop_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )
    text = tok.decode(out.sequences[0])
    assert "Paris" in text, text
    # and it is HF generate, token for token
    hf = model.generate(
        torch.tensor([p.input_ids]),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert hf[0, len(p) :].tolist() == out.sequences[0]


def test_speed_generation_equals_argmax_of_mask_forward(smollm2):
    model, tok = smollm2
    cfg = SpeedConfig(k=0.75, anchor="bos")
    K = cfg.resolve_k(model.config.num_hidden_layers)
    prompts = [
        _prompt(tok, cfg, "What is the capital of France?"),
        _prompt(tok, cfg, "Give me two tips for sleeping well."),
    ]
    out = speed_generate(
        model,
        prompts,
        K,
        max_new_tokens=16,
        stop_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        keep_logits=True,
    )
    fulls = []
    for p, seq in zip(prompts, out.sequences):
        n = len(seq)
        fulls.append(
            EncodedExample(
                p.input_ids + seq,
                p.roles + [DECODE] * n,
                p.turns + [p.turns[-1]] * n,
                [IGNORE] * (len(p) + n),
            )
        )
    batch = collate(fulls, pad_id=tok.pad_token_id)
    with torch.no_grad():
        dense = mask_forward(model, batch, K).dense(batch.input_ids.shape)
        dense_g = gather_forward(model, batch, K).dense(batch.input_ids.shape)
    for b, (p, seq) in enumerate(zip(prompts, out.sequences)):
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(seq))
        assert dense[b, pos].argmax(-1).tolist() == seq
        assert dense_g[b, pos].argmax(-1).tolist() == seq
        step = torch.stack([s[b] for s in out.step_logits[: len(seq)]])
        err = float((step - dense[b, pos]).abs().max())
        assert err <= 1e-4  # 30 fp32 layers, logits ~20 in size: measured 6e-5 (relative 3e-6)


def test_gemma3_past_the_window_generation_equals_teacher_forcing():
    """The packaged Gemma-3-270M (make setup-gemma), a prompt longer than its 512-token window:
    SPEED-14+BoS generation equals the mask and gather executions over the generated sequence, and
    at full depth speed_generate is HF's generate() (its own sliding-window cache)."""
    import importlib.util

    from speed_train.assets import GEMMA3_PACKAGE

    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        pytest.skip("Gemma-3-270M asset not installed (make setup-gemma)")
    from speed_train.loading import load_model

    model, tok = load_model("gemma3")
    cfg = SpeedConfig(k=14, anchor="bos")
    story = " ".join(
        f"Day {i}: the lighthouse keeper counted {3 * i + 1} ships and wrote it down." for i in range(40)
    )
    p = _prompt(tok, cfg, story + "\nHow many ships did the keeper count on day 7?")
    assert len(p) > 600 > model.config.sliding_window
    out = speed_generate(model, [p], 14, max_new_tokens=12, stop_token_ids=[], keep_logits=True)
    seq = out.sequences[0]
    full = EncodedExample(
        p.input_ids + seq, p.roles + [DECODE] * 12, p.turns + [p.turns[-1]] * 12, [IGNORE] * (len(p) + 12)
    )
    batch = collate([full], pad_id=tok.pad_token_id)
    pos = torch.arange(len(p) - 1, len(p) + 11)
    step = torch.stack([s[0] for s in out.step_logits])
    with torch.no_grad():
        for run in (mask_forward, gather_forward):
            dense = run(model, batch, 14).dense(batch.input_ids.shape)[0, pos]
            assert dense.argmax(-1).tolist() == seq
            assert float((step - dense).abs().max()) <= 1e-3  # logits ~30: relative ~1e-5
    hf = model.generate(torch.tensor([p.input_ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert hf[0, len(p) :].tolist() == speed_generate(model, [p], 18, max_new_tokens=12).sequences[0]
