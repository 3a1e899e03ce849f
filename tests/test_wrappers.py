"""SPEED executors on peft LoRA-wrapped models, with gradient checkpointing, and the flex path."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from speed_train.speed.executors import gather_forward, mask_forward, speed_loss
from speed_train.speed.tiny import tiny_model
from tests.reference import reference_logits
from tests.test_executors import _decode_err, _rel, padded_batch


def lora_model(seed=0):
    model = tiny_model("llama", layers=4, seed=seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    # LoRA B starts at zero; make the adapters non-trivial so the test can see them
    torch.manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    return peft_model


def test_lora_wrapped_model_matches_reference():
    model = lora_model()
    batch = padded_batch("bos")
    with torch.no_grad():
        ref = reference_logits(model, batch, 2)
        base = reference_logits(model.get_base_model(), batch, 2)  # reference sees the adapters too
        assert _decode_err(mask_forward(model, batch, 2), ref, batch) <= 1e-5
        assert _decode_err(gather_forward(model, batch, 2), ref, batch) <= 1e-5
        with model.disable_adapter():
            plain = gather_forward(model, batch, 2)
    assert _decode_err(plain, ref, batch) > 1e-3  # the adapters did change the logits
    assert torch.equal(ref, base)


def test_lora_gradients_only_reach_adapters_and_agree():
    model = lora_model()
    batch = padded_batch("system")
    grads = {}
    for executor in ("mask", "gather"):
        model.zero_grad(set_to_none=True)
        speed_loss(model, batch, 2, executor=executor).mean.backward()
        grads[executor] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["mask"].keys() == grads["gather"].keys()
    assert grads["mask"] and all("lora_" in n for n in grads["mask"])
    for n in grads["mask"]:
        assert _rel(grads["gather"][n], grads["mask"][n]) <= 1e-5, n


@pytest.mark.parametrize("executor", ["mask", "gather"])
def test_gradient_checkpointing_gives_same_gradients(executor):
    batch = padded_batch("bos")
    out = {}
    for ckpt in (False, True):
        model = tiny_model("qwen3", layers=4)
        model.train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss = speed_loss(model, batch, 2, executor=executor)
        loss.mean.backward()
        out[ckpt] = (loss.loss_sum.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for n, g in out[False][1].items():
        assert _rel(out[True][1][n], g) <= 1e-6, n


@pytest.mark.slow
def test_flex_block_masks_match_reference():
    """flex_attention forward runs on CPU too (compiled; no backward there) — same masks."""
    model = tiny_model("llama", layers=4)
    batch = padded_batch("bos")
    with torch.no_grad():
        ref = reference_logits(model, batch, 2)
        assert _decode_err(mask_forward(model, batch, 2, backend="flex"), ref, batch) <= 1e-5
        assert _decode_err(gather_forward(model, batch, 2, backend="flex"), ref, batch) <= 1e-5
