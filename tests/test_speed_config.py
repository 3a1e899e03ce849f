"""SpeedConfig as the one home of a model's SPEED settings: written into an export's config.json
and speed_config.json from one object, read back by SpeedConfig.from_pretrained (which copy wins,
old folders, adapters, bad values), laid under a command line's overrides."""

from __future__ import annotations

import json

import pytest

from speed_train.speed.config import SAVED, SpeedConfig, SpeedConfigError, with_overrides
from speed_train.train.resume import differences

L = 30


def folder(tmp_path, name, config=None, speed_file=None):
    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": L, **config}))
    if speed_file is not None:
        (d / "speed_config.json").write_text(json.dumps(speed_file))
    return d


def test_an_exports_fields_read_back_as_the_same_settings(tmp_path):
    written = SpeedConfig(k=0.75, anchor="none", loss_scope="last_turn", add_bos="false")
    fields = written.to_hf_fields(L)
    assert fields == {
        "speed_k": 22,  # round(0.75 * 30), as a layer count
        "speed_anchor": "none",
        "speed_loss_scope": "last_turn",
        "speed_add_bos": False,
    }
    d = folder(tmp_path, "export", fields)
    assert SpeedConfig.from_pretrained(d) == SpeedConfig(
        k=22, anchor="none", loss_scope="last_turn", add_bos=False
    )
    assert SpeedConfig.from_pretrained(d) == written.with_k(L)
    # full depth is stored as null (the unmodified model) and read back as K = L
    full = SpeedConfig(k=None).to_hf_fields(L)
    assert full["speed_k"] is None
    assert SpeedConfig.from_pretrained(folder(tmp_path, "full", full)).k == L


def test_which_copy_wins(tmp_path):
    older = {"k": 0.75, "k_layers": 22, "anchor": "bos", "add_bos": "true", "num_layers": L}
    # an export from before config.json carried the settings: its speed_config.json
    d = folder(tmp_path, "old", {}, older)
    assert SpeedConfig.from_pretrained(d) == SpeedConfig(k=22, anchor="bos", add_bos=True)
    # both: config.json (what transformers runs) wins over a stale copy
    d = folder(tmp_path, "both", {"speed_k": 20, "speed_anchor": "none"}, {**older, "k_layers": 3})
    assert SpeedConfig.from_pretrained(d).k == 20 and SpeedConfig.from_pretrained(d).anchor == "none"
    # a LoRA adapter carries its own training's settings: first
    adapter = folder(tmp_path, "adapter", None, {**older, "k_layers": 10, "anchor": "none"})
    assert SpeedConfig.from_pretrained(d, adapter).k == 10
    # a plain model has none
    assert SpeedConfig.from_pretrained(folder(tmp_path, "plain", {})) is None


def test_bad_saved_settings_are_refused_in_one_line(tmp_path):
    for value, message in (
        (0, "speed_k=0 in the saved model: cutoff k=0 must be at least 1 layer"),
        (31, "speed_k=31 in the saved model: cutoff k=31 exceeds the model's 30 layers"),
        ("x", "speed_k='x' in the saved model: cutoff k='x': give a layer count"),
    ):
        with pytest.raises(SpeedConfigError, match=message):
            SpeedConfig.from_pretrained(folder(tmp_path, f"k{value}", {"speed_k": value}))
    with pytest.raises(
        SpeedConfigError, match="the saved model's SPEED settings: unknown anchor policy 'top'"
    ):
        SpeedConfig.from_pretrained(folder(tmp_path, "anchor", {"speed_k": 3, "speed_anchor": "top"}))
    with pytest.raises(SpeedConfigError, match="speed_config.json: k=-1 in the saved model"):
        SpeedConfig.from_pretrained(folder(tmp_path, "file", {}, {"k_layers": -1}))
    with pytest.raises(SpeedConfigError, match="has no config.json: is it a saved model folder"):
        SpeedConfig.from_pretrained(folder(tmp_path, "empty"))


def test_overrides_lay_over_the_saved_settings():
    saved = SpeedConfig(k=22, anchor="none", add_bos=False)
    assert with_overrides(saved) == saved
    assert with_overrides(saved, k="full").k is None
    assert with_overrides(saved, k="0.5", anchor="bos", add_bos="auto") == SpeedConfig(k=0.5, add_bos="auto")
    assert with_overrides(None) == SpeedConfig()  # a plain model: full depth, BoS anchor, auto
    assert with_overrides(None, k=SAVED).k is None
    with pytest.raises(SpeedConfigError, match="add_bos='maybe': use 'auto', true or false"):
        with_overrides(saved, add_bos="maybe")


def test_a_checkpoint_from_before_add_bos_moved_is_compared_under_the_new_key():
    assert differences({"data.add_bos": "auto"}, {"speed.add_bos": False}) == [
        'speed.add_bos "auto" -> false'
    ]
    assert differences({"data.add_bos": "auto"}, {"speed.add_bos": "auto"}) == []
