"""The Lightning Trainer of a run and its callbacks, from ``conf/trainer``, ``conf/strategy`` and
``conf/logger`` (one function each; ``run.py`` calls them in order)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from speed_train.train.checkpointing import AtomicCheckpointIO, CompleteCheckpoint, PreemptionCheckpoint
from speed_train.train.module import StepBookkeeping
from speed_train.train.strategies import build_strategy
from speed_train.train.validation import EVAL_MICRO_BATCH, HeldoutTable, Validation

# Dense bf16 peak per device, for the MFU estimate.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def world_size_of(cfg: DictConfig) -> int:
    """Data-parallel ranks of the run, from the config (the step plan needs it before the Trainer
    exists): ``devices`` as a count, a list of device ids, or -1/"auto" (every visible GPU)."""
    devices = cfg.trainer.devices
    if isinstance(devices, ListConfig):
        devices = list(devices)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif devices in (-1, "-1", "auto"):
        n = torch.cuda.device_count() if cfg.trainer.accelerator in ("gpu", "cuda", "auto") else 1
    else:
        n = int(devices)
    return max(1, n) * cfg.trainer.num_nodes


def peak_flops(accelerator: str) -> float | None:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def wandb_mode(cfg: DictConfig) -> str:
    """logger.mode, else $WANDB_MODE, else online only with an API key in the environment:
    offline runs write to <output_dir>/wandb and never touch the network (``wandb sync`` later)."""
    return (
        cfg.logger.mode
        or os.environ.get("WANDB_MODE")
        or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    )


def hydra_job() -> tuple[str, int] | None:
    """(job name, job number) of a Hydra multirun job; None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        job = HydraConfig.get().job
        return str(job.name), int(job.num)
    except (ImportError, ValueError):
        return None


def loggers(cfg: DictConfig, out: Path, resume_step: int | None) -> list:
    found = []
    kinds = list(cfg.logger.kind)
    if "csv" in kinds:
        from speed_train.train.logs import ResumableCSVLogger

        found.append(
            ResumableCSVLogger(
                str(out),
                name="logs",
                version="",
                keep_before_step=resume_step,
                flush_logs_every_n_steps=cfg.trainer.log_every_n_steps,
            )
        )
    if "wandb" in kinds:
        from lightning.pytorch.loggers import WandbLogger

        # One run per job (run.train finishes it), all jobs of a sweep in the group logger.group.
        name = cfg.logger.name
        job = hydra_job()
        if name is None and job is not None:
            name = f"{cfg.logger.group or job[0]}-{job[1]}"
        found.append(
            WandbLogger(
                project=cfg.logger.project,
                group=cfg.logger.group,
                name=name,
                job_type="train",
                save_dir=str(out),
                mode=wandb_mode(cfg),
                config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            )
        )
    return found


def under_slurm() -> bool:
    """True where Lightning itself would pick its SLURM environment: a SLURM job with tasks,
    not an interactive one (job name bash/interactive), not torchrun inside an allocation."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    try:
        ntasks = int(os.environ.get("SLURM_NTASKS", "0"))
    except ValueError:
        ntasks = 0
    return (
        bool(os.environ.get("SLURM_JOB_ID"))
        and ntasks > 0
        and SLURMEnvironment.detect()
        and not TorchElasticEnvironment.detect()
    )


def trainer_plugins(cfg: DictConfig) -> list | None:
    """Atomic checkpoint files (not DeepSpeed: the engine writes its own directories); under
    SLURM, Lightning's SLURM environment with ``auto_requeue=False``: with the default (True) it
    installs its own SIGUSR1 handler (save + requeue); PreemptionCheckpoint owns that signal."""
    plugins: list = []
    if cfg.strategy.name != "deepspeed":
        plugins.append(AtomicCheckpointIO())
    if under_slurm():
        from lightning.fabric.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins or None


def run_callbacks(
    cfg: DictConfig, out: Path, held_out, pad_id: int, total_steps: int, lockstep: bool, extra=()
) -> dict[str, L.Callback]:
    """The run's callbacks by name. Order matters for on_train_batch_end: book-keeping (loader
    position, step loss) first, then validation, then the pre-emption save; Lightning moves
    ModelCheckpoint to the very end."""
    t = cfg.trainer
    cbs: dict[str, L.Callback] = {"bookkeeping": StepBookkeeping()}
    if t.eval_every_n_steps is not None and len(held_out):
        cbs["validation"] = Validation(
            held_out,
            pad_id,
            every_n_steps=t.eval_every_n_steps,
            total_steps=total_steps,
            micro_batch=EVAL_MICRO_BATCH,
            lockstep=lockstep,
        )
    if cfg.eval_report:
        cbs["heldout"] = HeldoutTable(held_out, pad_id, micro_batch=EVAL_MICRO_BATCH, lockstep=lockstep)
    cbs["preemption"] = PreemptionCheckpoint(
        out / "checkpoints", requeue=bool(os.environ.get("SLURM_JOB_ID"))
    )
    cbs["checkpoint"] = CompleteCheckpoint(
        dirpath=str(out / "checkpoints"),
        filename="{step}",
        every_n_train_steps=t.checkpoint_every_n_steps or total_steps,
        keep=t.keep_checkpoints,
        save_last=False,
    )
    if t.progress_bar:
        from speed_train.train.progress import StepProgressBar

        cbs["progress"] = StepProgressBar()
    for i, cb in enumerate(extra):
        cbs[f"extra{i}"] = cb
    return cbs


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Does this CPU multiply bf16 natively (AMX-BF16 or AVX512-BF16)? Elsewhere bf16 autocast is
    emulated and slower than fp32."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:  # no /proc (macOS, Windows): assume not
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision=auto``: bf16 autocast where the device multiplies bf16 natively (a
    bf16-capable GPU; a CPU with AMX-BF16 or AVX512-BF16), else fp32. Resolved once, in place,
    before anything reads it; any other value is kept as given."""
    t = cfg.trainer
    if str(t.precision) != "auto":
        return str(t.precision)
    cuda = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    fast = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if cuda else cpu_has_fast_bf16()
    t.precision = "bf16-mixed" if fast else "32-true"
    return t.precision


def build_trainer(
    cfg: DictConfig,
    out: Path,
    callbacks: dict[str, L.Callback],
    total_steps: int,
    accumulation: int,
    resume_step: int | None,
) -> L.Trainer:
    t = cfg.trainer
    accelerator = t.accelerator
    return L.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=t.precision,
        strategy=build_strategy(cfg, "cpu" if accelerator == "cpu" else "gpu"),
        max_steps=total_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulation,
        gradient_clip_val=cfg.optim.gradient_clip or None,
        logger=loggers(cfg, out, resume_step) or False,
        callbacks=list(callbacks.values()),
        use_distributed_sampler=False,
        default_root_dir=str(out),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        plugins=trainer_plugins(cfg),
    )
