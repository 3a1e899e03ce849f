"""Launch scripts (bash -n, dry runs), the SLURM launcher config, and sweep summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # Hydra multiruns of real training processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["scripts/slurm/train.sbatch", "scripts/torchrun.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_sbatch_dry_run_prints_the_srun_line_for_2_nodes_x_8_gpus():
    env = {**os.environ, "DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "8", "SLURM_JOB_ID": "4242"}
    env.pop("SLURM_JOB_NUM_NODES", None)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/slurm/train.sbatch"), "+experiment=speed24_bos", "speed.k=20"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[-1].strip() == (
        "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=8 python -m speed_train "
        "hydra.run.dir=outputs/slurm-4242 trainer.num_nodes=2 trainer.devices=8 resume=auto "
        "+experiment=speed24_bos speed.k=20"
    )


def test_torchrun_dry_run():
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "NNODES": "2",
        "NPROC": "8",
        "NODE_RANK": "1",
        "MASTER_ADDR": "n0",
        "RUN_DIR": "outputs/x",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/torchrun.sh"), "+experiment=speed24_bos"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == (
        "python -m torch.distributed.run --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=n0 "
        "--master_port=29500 -m speed_train hydra.run.dir=outputs/x trainer.num_nodes=2 trainer.devices=8 "
        "+experiment=speed24_bos"
    )


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    from speed_train.train.schema import register_schema

    register_schema()
    with initialize_config_module(config_module="speed_train.conf", version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "+experiment=lora_pilot"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.signal_delay_s == 120


def test_multirun_two_k_values_and_a_crash_are_summarised(tmp_path):
    sweep = tmp_path / "mr"
    args = [
        sys.executable,
        "-m",
        "speed_train",
        "-m",
        "model=tiny_llama",
        "speed.k=2,9,3",
        "trainer.max_steps=2",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "data.max_length=128",
        "data.max_train_examples=16",
        "data.max_eval_examples=4",
        "trainer.progress_bar=false",
        "logger.kind=[csv]",
        f"hydra.sweep.dir={sweep}",
    ]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0  # the k=9 job failed, the sweep went on
    from speed_train.sweep.summarize import summarize

    s = summarize(sweep)
    status = {row["k"]: row["status"] for row in s["rows"]}
    assert status == {2: "ok", "9": "failed", 3: "ok"}
    ok = [row for row in s["rows"] if row["status"] == "ok"]
    assert len(ok) == 2 and all(isinstance(row["heldout_after"], float) for row in ok)
    assert "job 1 (" in s["markdown"] and "exceeds the model's 4 layers" in s["markdown"]
    assert (sweep / "summary.png").stat().st_size > 0
    res = json.loads((sweep / "0" / "results.json").read_text())
    assert res["k"] == 2 and len(res["step_losses"]) == 2


# -- SLURM: PreemptionCheckpoint owns SIGUSR1 -----------------------------------------------------
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_JOB_NAME",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NODELIST",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
A_SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "speed-train",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "n0",
}


def test_under_slurm_lightning_gets_a_slurm_environment_without_auto_requeue(monkeypatch):
    import signal

    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from speed_train.train.checkpointing import AtomicCheckpointIO
    from speed_train.train.trainer import trainer_plugins, under_slurm
    from tests.train_helpers import BASE, compose_cfg

    cfg = compose_cfg(BASE)
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)

    def kinds(plugins):
        return [type(p) for p in plugins or []]

    assert not under_slurm() and kinds(trainer_plugins(cfg)) == [
        AtomicCheckpointIO
    ]  # no SLURM: nothing added
    ds_cfg = compose_cfg([*BASE, "strategy=deepspeed_zero3"])
    assert trainer_plugins(ds_cfg) is None
    cases = [
        ({}, True),
        ({"SLURM_NTASKS": "0"}, False),  # no tasks
        ({"SLURM_JOB_NAME": "interactive"}, False),  # salloc shell: Lightning would not pick SLURM
        (
            {
                "TORCHELASTIC_RUN_ID": "x",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500",
            },
            False,
        ),
    ]  # torchrun in an allocation
    for extra, expected in cases:
        with monkeypatch.context() as mp:
            for key, value in {**A_SLURM_TASK, **extra}.items():
                mp.setenv(key, value)
            assert under_slurm() is expected, extra
            slurm = [p for p in trainer_plugins(ds_cfg) or [] if isinstance(p, SLURMEnvironment)]
            assert len(slurm) == expected and all(p.auto_requeue is False for p in slurm)
    with monkeypatch.context() as mp:  # SLURM_NTASKS without a job id: not a SLURM job
        for key, value in A_SLURM_TASK.items():
            mp.setenv(key, value)
        mp.delenv("SLURM_JOB_ID")
        assert not under_slurm()

    # in a Trainer: the SLURM environment is ours, and Lightning installs no SIGUSR1 handler
    # (with its default environment, auto_requeue=True, it would)
    def sigusr1_after_lightning(plugins) -> bool:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            plugins=plugins,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        env = trainer._accelerator_connector.cluster_environment
        assert isinstance(env, SLURMEnvironment)
        before = signal.getsignal(signal.SIGUSR1)
        trainer._signal_connector.register_signal_handlers()
        try:
            return signal.getsignal(signal.SIGUSR1) is not before
        finally:
            trainer._signal_connector.teardown()
            signal.signal(signal.SIGUSR1, before)

    for key, value in A_SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    assert sigusr1_after_lightning(trainer_plugins(ds_cfg)) is False
    assert sigusr1_after_lightning(None) is True  # what the plugin prevents


# -- wandb: one offline run per Hydra job, in one group -----------------------------------------
def _wandb_records(path: Path):
    """Records of a .wandb transaction log (LevelDB-log framing: 7-byte file header, 32 KiB blocks,
    chunks of checksum(4) length(2) type(1): 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_multirun_gives_one_offline_run_per_job_in_one_group(tmp_path):
    pytest.importorskip("wandb")
    sweep, wandb_dir = tmp_path / "mr", tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no WANDB_MODE, no API key
    # any network attempt would go to a closed local port (and show up as an error below)
    closed = "http://127.0.0.1:9"
    env.update(
        {
            "WANDB_DIR": str(wandb_dir),
            "WANDB_BASE_URL": closed,
            "HTTP_PROXY": closed,
            "HTTPS_PROXY": closed,
            "OMP_NUM_THREADS": "1",
        }
    )
    args = [
        sys.executable,
        "-m",
        "speed_train",
        "-m",
        "model=tiny_llama",
        "logger=wandb",
        "logger.group=g",
        "speed.k=2,3",
        "trainer.max_steps=1",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "data.max_length=128",
        "data.max_train_examples=8",
        "data.max_eval_examples=2",
        "trainer.progress_bar=false",
        "eval_report=false",
        "export.enabled=false",
        f"hydra.sweep.dir={sweep}",
    ]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    runs = sorted(sweep.glob("*/wandb/offline-run-*")) + sorted(wandb_dir.glob("**/offline-run-*"))
    assert [p.parts[-3] for p in runs] == ["0", "1"], runs  # one offline run per job, in its run folder
    seen = []
    for job, run in enumerate(runs):
        (log,) = run.glob("*.wandb")
        records = list(_wandb_records(log))
        (info,) = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
        config = {item.key: json.loads(item.value_json) for item in info.config.update}
        assert info.run_group == "g" and info.project == "speed-train" and info.display_name == f"g-{job}"
        assert config["logger"]["group"] == "g" and config["speed"]["k"] == job + 2  # this job's config
        (done,) = [rec.exit for rec in records if rec.WhichOneof("record_type") == "exit"]
        assert done.exit_code == 0  # finished: the next job did not continue this run
        seen.append(info.run_id)
        logs = "".join(p.read_text() for p in (run / "logs").glob("*.log"))
        assert "127.0.0.1:9" not in logs and '"level":"ERROR"' not in logs
    assert len(set(seen)) == 2
