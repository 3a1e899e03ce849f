"""Every experiment composes; bad configs fail before any model loads; configs ship in wheels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from speed_train.train.build import ConfigError, validate
from speed_train.train.schema import register_schema

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
register_schema()


def compose_cfg(overrides=()):
    with initialize_config_module(config_module="speed_train.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def test_all_paper_experiments_exist():
    assert {"full_it", "speed24", "speed24_bos", "speed16_bos", "speed20_bos", "speed28_bos",
            "lora_pilot"} <= set(EXPERIMENTS)  # fmt: skip


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_composes_and_validates(exp):
    cfg = compose_cfg([f"+experiment={exp}", "output_dir=/tmp/x"])
    validate(cfg, world_size=8 if exp != "lora_pilot" else 1)
    text = (ROOT / "conf" / "experiment" / f"{exp}.yaml").read_text()
    assert text.startswith("# @package _global_") and "Launch" in text or "Sweep" in text
    if exp.startswith("speed") and exp[5:7].isdigit():
        assert cfg.speed.k == int(exp[5:7]) and cfg.model.num_layers == 32
        assert cfg.speed.anchor == ("bos" if exp.endswith("_bos") else "none")
    if exp != "lora_pilot":
        # the paper's controlled study: Tulu-3 SFT hyper-parameters, full FT, ZeRO-3, bf16
        assert (cfg.optim.lr, cfg.trainer.epochs, cfg.trainer.global_batch_size, cfg.data.max_length) == (
            5e-6, 2, 128, 4096)  # fmt: skip
        assert cfg.optim.schedule == "linear" and cfg.optim.warmup_ratio == 0.03
        assert cfg.strategy.zero_stage == 3 and not cfg.lora.enabled and cfg.trainer.precision == "bf16-mixed"


def test_default_is_offline_lora_smollm2():
    cfg = compose_cfg(["output_dir=/tmp/x"])
    validate(cfg)
    assert cfg.model.source == "smollm2" and cfg.lora.enabled and cfg.data.recipe == "packaged_chat"
    assert cfg.speed.anchor == "bos" and cfg.speed.k == 0.75


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["speed.k=40"], "speed.k: cutoff k=40 exceeds the model's 30 layers"),
        (["speed.k=0"], "at least 1 layer"),
        (["speed.k=1.5"], r"outside \(0, 1\]"),
        (["speed.anchor=eos"], "unknown anchor policy 'eos'"),
        (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], "not divisible by micro_batch_size"),
        (["speed.executor=dense"], "speed.executor='dense'"),
        (["objective.kind=distill", "lora.enabled=false"], "distill needs lora.enabled=true"),
        (["model.dtype=int8"], "model.dtype='int8'"),
    ],
)
def test_invalid_configs_fail_clearly(overrides, message):
    cfg = compose_cfg(["output_dir=/tmp/x", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_unknown_keys_and_wrong_types_are_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["model.foo=1"])
    assert "Key 'foo' not in 'ModelConfig'" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["trainer.micro_batch_size=abc"])
    assert "could not be converted to Integer" in str(e.value.__cause__)


def test_configs_ship_in_a_plain_wheel_install(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    py = sys.executable
    subprocess.run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
                    str(ROOT)], check=True, capture_output=True)  # fmt: skip
    wheel = next(wheel_dir.glob("*.whl"))
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([py, "-m", "speed_train", "+experiment=speed24_bos", "--cfg", "job"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.speed.k == 24 and cfg.model.pretrained == "meta-llama/Llama-3.1-8B"
    r = subprocess.run([py, "-c", "import speed_train; print(speed_train.__file__)"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.stdout.startswith(str(target)), r.stdout  # the wheel's copy, not the source tree
