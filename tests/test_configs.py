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
    assert {
        "full_it",
        "speed24",
        "speed24_bos",
        "speed16_bos",
        "speed20_bos",
        "speed28_bos",
        "lora_pilot",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_composes_and_validates(exp):
    cfg = compose_cfg([f"+experiment={exp}", "output_dir=/tmp/x"])
    paper = exp not in ("lora_pilot", "small_study")  # the 8B runs on 8+ GPUs; the others on one device
    validate(cfg, world_size=8 if paper else 1)
    text = (ROOT / "conf" / "experiment" / f"{exp}.yaml").read_text()
    assert text.startswith("# @package _global_") and "Launch" in text or "Sweep" in text
    if exp.startswith("speed") and exp[5:7].isdigit():
        assert cfg.speed.k == int(exp[5:7]) and cfg.model.num_layers == 32
        assert cfg.speed.anchor == ("bos" if exp.endswith("_bos") else "none")
    if paper:
        # the paper's controlled study: Tulu-3 SFT hyper-parameters, full FT, ZeRO-3, bf16
        assert (cfg.optim.lr, cfg.trainer.epochs, cfg.trainer.global_batch_size, cfg.data.max_length) == (
            5e-6,
            2,
            128,
            4096,
        )
        assert cfg.optim.schedule == "linear" and cfg.optim.warmup_ratio == 0.03
        assert cfg.strategy.zero_stage == 3 and not cfg.lora.enabled and cfg.trainer.precision == "bf16-mixed"


def test_default_is_offline_lora_smollm2():
    cfg = compose_cfg(["output_dir=/tmp/x"])
    validate(cfg)
    assert cfg.model.source == "smollm2" and cfg.lora.enabled and cfg.data.recipe == "packaged_chat"
    assert cfg.speed.anchor == "bos" and cfg.speed.k == 0.75
    assert cfg.trainer.precision == "auto"  # bf16 where the CPU has it natively


@pytest.mark.parametrize(
    "flags, accelerator, given, want",
    [
        ("fpu sse avx512f avx512_bf16 amx_tile", "cpu", "auto", "bf16-mixed"),
        ("fpu sse amx_bf16", "cpu", "auto", "bf16-mixed"),
        ("fpu sse avx2", "cpu", "auto", "32-true"),
        (None, "cpu", "auto", "32-true"),  # no /proc/cpuinfo
        ("fpu sse avx512_bf16", "cpu", "32-true", "32-true"),  # an explicit value is kept
        ("fpu sse avx2", "cpu", "bf16-mixed", "bf16-mixed"),
    ],
)
def test_precision_auto_follows_native_bf16(tmp_path, monkeypatch, flags, accelerator, given, want):
    from speed_train.train import trainer

    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    probe = trainer.cpu_has_fast_bf16
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: probe(str(cpuinfo)))
    cfg = compose_cfg(
        ["output_dir=/tmp/x", f"trainer.accelerator={accelerator}", f"trainer.precision={given}"]
    )
    assert cfg.trainer.precision == given
    assert trainer.resolve_precision(cfg) == want and cfg.trainer.precision == want


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["speed.k=40"], "speed.k: cutoff k=40 exceeds the model's 30 layers"),
        (["speed.k=0"], "at least 1 layer"),
        (["speed.k=1.5"], r"outside \(0, 1\]"),
        (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], "not divisible by micro_batch_size"),
        (["objective.kind=distill", "lora.enabled=false"], "distill needs lora.enabled=true"),
        (["optim.lr=-1"], r"optim.lr=-1.0: must be > 0"),
        (["optim.betas=[0.9,1.5]"], r"optim.betas=\[0.9, 1.5\]: must be two numbers in \[0, 1\)"),
        (["optim.warmup_ratio=2"], r"optim.warmup_ratio=2.0: must be in \[0, 1\]"),
        (["data.max_length=1"], "data.max_length=1: must be >= 2 tokens"),
        (["data.num_proc=0"], "data.num_proc=0: must be >= 1"),
        (["speed.add_bos=maybe"], "speed.add_bos='maybe': use 'auto', true or false"),
        (["data.held_out=-2"], "data.held_out=-2: a count must be >= 0"),
        (["data.max_bad_fraction=1.5"], r"data.max_bad_fraction=1.5: must be in \[0, 1\]"),
        (["lora.dropout=1.0"], r"lora.dropout=1.0: must be in \[0, 1\)"),
        (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0: must be >= 1"),
        (["objective.temperature=0"], "objective.temperature=0.0: must be > 0"),
        # a sliding window shorter than the data: refused before any data or weight is read
        (
            ["model=tiny_mistral", "+model.tiny.sliding_window=64", "data.max_length=256"],
            "sliding window of 64 tokens, shorter than data.max_length=256",
        ),
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
    # allowed values live in the schema (enums): OmegaConf refuses others at composition
    for override, field in (
        ("speed.executor=dense", "Executor"),
        ("model.dtype=int8", "DType"),
        ("optim.schedule=step", "Schedule"),
        ("speed.anchor=eos", "Anchor"),
        ("objective.reduce=max", "Reduce"),
        ("data.truncate=cut", "Truncate"),
        ("model.attn_backend=eager", "AttentionBackend"),
    ):
        with pytest.raises(ConfigCompositionException) as e:
            compose_cfg([override])
        assert f"Invalid value '{override.split('=')[1]}', expected one of" in str(e.value.__cause__), field


def test_output_folder_must_be_writable(tmp_path):
    from speed_train.train.build import check_output_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder cannot be made under a file (EROFS and EACCES end up the same way)
    with pytest.raises(ConfigError, match=r"output folder .*a_file/run is not writable"):
        check_output_dir(blocker / "run")
    assert check_output_dir(tmp_path / "ok").is_dir()


def test_recipe_values_hold_unless_the_run_sets_them():
    cfg = compose_cfg(["output_dir=/tmp/x"])
    assert cfg.data.max_bad_fraction is None and cfg.data.held_out is None  # null = the recipe's
    cfg = compose_cfg(["+experiment=speed24_bos", "output_dir=/tmp/x"])
    assert cfg.objective.reduce == "sum" and cfg.model.chat_template == "tulu" and cfg.speed.add_bos == "auto"


@pytest.mark.slow
def test_configs_ship_in_a_plain_wheel_install(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    py = sys.executable
    subprocess.run(
        [
            py,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(wheel_dir.glob("*.whl"))
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run(
        [py, "-m", "speed_train", "+experiment=speed24_bos", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.speed.k == 24 and cfg.model.pretrained == "meta-llama/Llama-3.1-8B"
    r = subprocess.run(
        [py, "-c", "import speed_train; print(speed_train.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.stdout.startswith(str(target)), r.stdout  # the wheel's copy, not the source tree


def test_gemma3_windows_shorter_than_the_data_are_supported():
    """SPEED implements Gemma-3's sliding windows: its window (8 in the tiny config) may be shorter
    than data.max_length; a Mistral window may not (above)."""
    validate(compose_cfg(["output_dir=/tmp/x", "model=tiny_gemma3", "data.max_length=256"]))


def test_gemma3_without_its_asset_is_a_one_line_error_before_any_work(monkeypatch):
    import importlib.util

    from speed_train.assets import AssetError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a),
    )
    with pytest.raises(
        AssetError, match=r"^Gemma-3-270M asset not installed \(missing .*\): run `make setup-gemma`"
    ):
        validate(compose_cfg(["output_dir=/tmp/x", "model=gemma3_270m"]))
