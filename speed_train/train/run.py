"""The training recipe, top to bottom: validate -> data -> model -> fit -> evaluate -> export.

Called by the Hydra entry point (``python -m speed_train``) with the composed config.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf

from speed_train.atomic import write_json
from speed_train.speed.adapters import unwrap
from speed_train.train.build import (
    ConfigError,
    load_model,
    load_tokenizer,
    speed_config,
    validate,
    zero3_construction,
)
from speed_train.train.checkpointing import (
    AtomicCheckpointIO,
    CompleteCheckpoint,
    PreemptionCheckpoint,
    checkpoint_step,
    resolve_resume,
)
from speed_train.train.export import consolidate, export, is_zero3
from speed_train.train.loader import ResumableLoader, StepPlan
from speed_train.train.module import SpeedLM, StepBookkeeping
from speed_train.train.strategies import build_strategy
from speed_train.train.validation import HeldoutBeforeTraining, Validation, sharded_heldout_loss

# Dense bf16 peak per device, for the MFU estimate (override with trainer.peak_tflops in code).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def world_size_of(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    n = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else 1)
    return max(1, n) * cfg.trainer.num_nodes


def _peak_flops(accelerator: str) -> float | None:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


@torch.no_grad()
def heldout_loss(model, examples, k: int, pad_id: int, micro_batch: int = 8) -> float:
    """Mean decode-token cross-entropy over held-out examples (token-weighted), one process."""
    return sharded_heldout_loss(model, examples, k, pad_id, micro_batch=micro_batch)


def _supervised_counts(examples) -> list[int]:
    if hasattr(examples, "supervised_counts"):
        return [int(x) for x in examples.supervised_counts()]
    return [ex.num_supervised() for ex in examples]


def _wandb_mode(cfg: DictConfig) -> str:
    """logger.mode, else $WANDB_MODE, else online only with an API key in the environment:
    offline runs write to <output_dir>/wandb and never touch the network (``wandb sync`` later)."""
    return (
        cfg.logger.mode
        or os.environ.get("WANDB_MODE")
        or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    )


def _hydra_job() -> tuple[str, int] | None:
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


def _loggers(cfg: DictConfig, out: Path, resume_step: int | None):
    loggers = []
    kinds = list(cfg.logger.kind)
    if "csv" in kinds:
        from speed_train.train.logs import ResumableCSVLogger

        loggers.append(ResumableCSVLogger(str(out), name="logs", version="", keep_before_step=resume_step,
                                          flush_logs_every_n_steps=cfg.trainer.log_every_n_steps))  # fmt: skip
    if "wandb" in kinds:
        from lightning.pytorch.loggers import WandbLogger

        # One run per job (run.train finishes it), all jobs of a sweep in the group logger.group.
        name = cfg.logger.name
        job = _hydra_job()
        if name is None and job is not None:
            name = f"{cfg.logger.group or job[0]}-{job[1]}"
        loggers.append(WandbLogger(project=cfg.logger.project, group=cfg.logger.group, name=name, job_type="train",
                                   save_dir=str(out), mode=_wandb_mode(cfg),
                                   config=OmegaConf.to_container(cfg, resolve=True)))  # fmt: skip
    return loggers


def under_slurm() -> bool:
    """True where Lightning itself would pick its SLURM environment: a SLURM job with tasks,
    not an interactive one (job name bash/interactive), not torchrun inside an allocation."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    try:
        ntasks = int(os.environ.get("SLURM_NTASKS", "0"))
    except ValueError:
        ntasks = 0
    return (bool(os.environ.get("SLURM_JOB_ID")) and ntasks > 0 and SLURMEnvironment.detect()
            and not TorchElasticEnvironment.detect())  # fmt: skip


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


def train(cfg: DictConfig, *, callbacks=()) -> dict:
    """Runs the recipe; ``callbacks``: extra Lightning callbacks (tests, user code). Returns the
    results (also written to ``<output_dir>/results.json`` by rank 0)."""
    try:
        results = _train(cfg, callbacks)
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb()
    return results


def _train(cfg: DictConfig, callbacks) -> dict:
    world = world_size_of(cfg)
    validate(cfg, world)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.trainer.seed, workers=True)

    tokenizer = load_tokenizer(cfg)
    sc = speed_config(cfg)
    from speed_train.data.tokenize import build_dataset

    train_ex, held_ex, report = build_dataset(
        cfg.data.recipe, tokenizer, sc, max_length=cfg.data.max_length, cache_dir=cfg.data.cache_dir,
        truncate=cfg.data.truncate, max_bad_fraction=cfg.data.max_bad_fraction,
    )  # fmt: skip
    if cfg.data.max_train_examples:
        train_ex = train_ex[: cfg.data.max_train_examples]
    if cfg.data.max_eval_examples is not None:
        held_ex = held_ex[: cfg.data.max_eval_examples]
    plan = StepPlan(_supervised_counts(train_ex), cfg.trainer.global_batch_size,
                    cfg.trainer.micro_batch_size, world, cfg.trainer.seed)  # fmt: skip
    total_steps = (
        cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else cfg.trainer.epochs * plan.steps_per_epoch
    )
    pad_id = tokenizer.pad_token_id
    zero3 = is_zero3(cfg)

    accelerator = cfg.trainer.accelerator
    strategy = build_strategy(cfg, "cpu" if accelerator == "cpu" else "gpu")
    ckpt_dir = out / "checkpoints"
    ckpt = resolve_resume(cfg.resume, ckpt_dir)
    preemption = PreemptionCheckpoint(ckpt_dir, requeue=bool(os.environ.get("SLURM_JOB_ID")))
    validation = None
    if cfg.trainer.eval_every_n_steps is not None:
        validation = Validation(held_ex, pad_id, every_n_steps=cfg.trainer.eval_every_n_steps, total_steps=total_steps,
                                micro_batch=cfg.trainer.micro_batch_size, lockstep=zero3)  # fmt: skip
    before = HeldoutBeforeTraining(held_ex, pad_id, micro_batch=8)  # used when the model is partitioned
    # Order matters for the on_train_batch_end hooks: book-keeping (loader position, step loss)
    # first, then validation, then the pre-emption save; Lightning moves ModelCheckpoint to the very end.
    all_callbacks = [
        StepBookkeeping(),
        *([validation] if validation else []),
        preemption,
        CompleteCheckpoint(dirpath=str(ckpt_dir), filename="{step}", every_n_train_steps=cfg.trainer.checkpoint_every_n_steps or total_steps,
                           save_top_k=cfg.trainer.keep_checkpoints, monitor="step", mode="max", save_last=False),
        *callbacks,
    ]  # fmt: skip
    if cfg.trainer.progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        all_callbacks.append(RichProgressBar())
    trainer = L.Trainer(
        accelerator=accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        precision=cfg.trainer.precision, strategy=strategy, max_steps=total_steps, max_epochs=-1,
        accumulate_grad_batches=plan.accumulation, gradient_clip_val=cfg.optim.gradient_clip or None,
        logger=_loggers(cfg, out, checkpoint_step(ckpt) if ckpt else None) or False, callbacks=all_callbacks,
        use_distributed_sampler=False, default_root_dir=str(out), enable_progress_bar=cfg.trainer.progress_bar,
        log_every_n_steps=cfg.trainer.log_every_n_steps, num_sanity_val_steps=0,
        deterministic=cfg.trainer.deterministic, plugins=trainer_plugins(cfg),
    )  # fmt: skip

    # ZeRO-3 with externally started ranks (torchrun, srun, ...): build the model partitioned, so
    # no rank ever holds all of it. That needs the process group first: Lightning's strategy sets
    # it up from the launcher's environment (fit finds it ready). When Lightning starts the ranks
    # itself (LightningEnvironment), they do not exist yet when rank 0 builds its model: every
    # process then builds the full model, which the engine partitions at setup.
    env = getattr(trainer.strategy, "cluster_environment", None)
    partitioned = (zero3 and env is not None and env.creates_processes_externally
                   and not isinstance(env, LightningEnvironment))  # fmt: skip
    with ExitStack() as zero3_scope:
        if partitioned:
            trainer.strategy.setup_environment()
            zero3_scope.enter_context(zero3_construction(trainer.strategy.config))
            if cfg.eval_report:
                trainer.callbacks.append(before)
        model = load_model(cfg, tokenizer)
        num_layers = unwrap(model).config.num_hidden_layers
        k = sc.resolve_k(num_layers)

        results: dict = {"k": k, "num_layers": num_layers, "anchor": sc.anchor, "report": report.summary(),
                         "zero3_partitioned_at_construction": partitioned}  # fmt: skip
        if cfg.eval_report and not partitioned:
            base = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
            with base:
                results["heldout_full_depth"] = heldout_loss(model, held_ex, num_layers, pad_id)
                results["heldout_speed_zero_shot"] = heldout_loss(model, held_ex, k, pad_id)

        module = SpeedLM(model, k=k, executor=cfg.speed.executor, backend=cfg.model.attn_backend, optim=cfg.optim,
                         objective=cfg.objective, total_steps=total_steps, accumulation=plan.accumulation,
                         peak_flops=_peak_flops(accelerator))  # fmt: skip
        loader = ResumableLoader(train_ex, plan, trainer.global_rank, pad_id,
                                 pack_to=cfg.data.max_length if cfg.data.pack else None,
                                 num_workers=cfg.data.num_workers)  # fmt: skip
        fit_start, step_start = time.perf_counter(), trainer.global_step
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt)
        fit_seconds = time.perf_counter() - fit_start
    results["fit_seconds"] = fit_seconds
    results["steps_per_s"] = (trainer.global_step - step_start) / max(fit_seconds, 1e-9)
    # (transformers' ZeRO-3 config is released here: the consolidated rank-0 model is a full one)
    results.update(before.results)
    preempted = preemption.received
    results["preempted_by_signal"] = preempted
    results["preempt_checkpoint"] = preemption.saved
    results["resumed_from"] = ckpt
    results["step_losses"] = module.step_losses
    if validation is not None:
        results["val_losses"] = {str(s): v for s, v in sorted(validation.history.items())}
    results["global_step"] = trainer.global_step
    results["rank"] = trainer.global_rank
    results["world_size"] = trainer.world_size
    # ZeRO-3: gather the shards into one model on rank 0 (all ranks take part), then evaluate
    # and export that; otherwise the trained model itself. Pre-empted: no time for either.
    wanted = (cfg.eval_report or cfg.export) and preempted is None
    final = consolidate(model, cfg, tokenizer, trainer.is_global_zero) if wanted else None
    if trainer.is_global_zero:
        if cfg.eval_report and final is not None:
            results["heldout_speed_adapted"] = heldout_loss(final, held_ex, k, pad_id)
        if cfg.export and final is not None:
            results["export"] = export(final, tokenizer, cfg, k, out / "export")
        write_json(out / "results.json", results, default=str)
    return results


def _finish_wandb(exit_code: int | None = None) -> None:
    """One wandb run per Hydra job: finish explicitly (a failed job too), or multirun merges
    jobs into one run."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except ImportError:
        pass


__all__ = ["train", "export", "heldout_loss", "ConfigError"]
