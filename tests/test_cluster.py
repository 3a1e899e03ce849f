"""Launch scripts (bash -n, dry runs), the SLURM launcher config, and sweep summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["scripts/slurm/train.sbatch", "scripts/torchrun.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_sbatch_dry_run_prints_the_srun_line_for_2_nodes_x_8_gpus():
    env = {**os.environ, "DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "8", "SLURM_JOB_ID": "4242"}
    env.pop("SLURM_JOB_NUM_NODES", None)
    out = subprocess.run(["bash", str(ROOT / "scripts/slurm/train.sbatch"), "+experiment=speed24_bos", "speed.k=20"],
                         env=env, capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    assert out[-1].strip() == (
        "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=8 python -m speed_train "
        "hydra.run.dir=outputs/slurm-4242 trainer.num_nodes=2 trainer.devices=8 resume=auto "
        "+experiment=speed24_bos speed.k=20"
    )


def test_torchrun_dry_run():
    env = {**os.environ, "DRY_RUN": "1", "NNODES": "2", "NPROC": "8", "NODE_RANK": "1", "MASTER_ADDR": "n0",
           "RUN_DIR": "outputs/x"}  # fmt: skip
    out = subprocess.run(["bash", str(ROOT / "scripts/torchrun.sh"), "+experiment=speed24_bos"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert out == ("python -m torch.distributed.run --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=n0 "
                   "--master_port=29500 -m speed_train hydra.run.dir=outputs/x trainer.num_nodes=2 trainer.devices=8 "
                   "+experiment=speed24_bos")  # fmt: skip


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    from speed_train.train.schema import register_schema

    register_schema()
    with initialize_config_module(config_module="speed_train.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "+experiment=lora_pilot"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.signal_delay_s == 120


def test_multirun_two_k_values_and_a_crash_are_summarised(tmp_path):
    sweep = tmp_path / "mr"
    args = [sys.executable, "-m", "speed_train", "-m", "model=tiny_llama", "speed.k=2,9,3", "trainer.max_steps=2",
            "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "data.max_length=128",
            "data.max_train_examples=16", "data.max_eval_examples=4", "trainer.progress_bar=false",
            "logger.kind=[csv]", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0  # the k=9 job failed, the sweep went on
    from speed_train.sweep.summarize import summarize

    s = summarize(sweep)
    status = {row["k"]: row["status"] for row in s["rows"]}
    assert status == {2: "ok", "9": "failed", 3: "ok"}
    ok = [row for row in s["rows"] if row["status"] == "ok"]
    assert len(ok) == 2 and all(isinstance(row["heldout_speed_adapted"], float) for row in ok)
    assert "job 1 (" in s["markdown"] and "exceeds the model's 4 layers" in s["markdown"]
    assert (sweep / "summary.png").stat().st_size > 0
    res = json.loads((sweep / "0" / "results.json").read_text())
    assert res["k"] == 2 and len(res["step_losses"]) == 2
