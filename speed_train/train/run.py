"""The training recipe, read top to bottom: validate -> data -> trainer -> model -> fit -> results -> export.

Called by the Hydra entry point (``python -m speed_train``) with the composed config; each step
is a function of its own below :func:`train`.
"""

from __future__ import annotations

import logging
import pickle  # for its exception type only: checkpoints load through Lightning with weights_only
import shlex
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from speed_train.atomic import write_json
from speed_train.speed.adapters import unwrap
from speed_train.train.build import (
    ConfigError,
    check_output_dir,
    check_window,
    load_model,
    load_tokenizer,
    speed_config,
    validate,
    zero3_construction,
)
from speed_train.train.checkpointing import checkpoint_step, newest_checkpoint, prune, resolve_resume
from speed_train.train.export import consolidate, export, is_zero3
from speed_train.train.loader import (
    ResumableLoader,
    StepPlan,
    data_fingerprint,
    examples_fingerprint,
    pack_rows,
)
from speed_train.train.module import DivergenceError, SpeedLM
from speed_train.train.resume import (
    ResumeError,
    check_init_from,
    check_resume,
    check_steps,
    load_initial_weights,
    run_fingerprint,
)
from speed_train.train.runlock import run_folder_lock
from speed_train.train.trainer import (
    build_trainer,
    peak_flops,
    resolve_precision,
    run_callbacks,
    world_size_of,
)

log = logging.getLogger("speed_train")


class ExportError(OSError):
    """The trained model could not be exported (its checkpoint is kept)."""

    def __str__(self) -> str:  # the message, without OSError's "[Errno N]" prefix
        return str(self.strerror)


@dataclass
class RunResult:
    """What a run did; written to ``<output_dir>/results.json`` by rank 0."""

    k: int
    num_layers: int
    anchor: str
    data_report: str
    seed: int = 0
    precision: str = ""  # as resolved (trainer.precision=auto becomes bf16-mixed or 32-true)
    add_bos: str = "auto"  # the BoS rule the data was encoded with
    # sha256 of the token ids each step trained on (train.loader.data_fingerprint) and of the
    # held-out set: equal across the arms of a study that share a seed
    data_fingerprint: str = ""
    heldout_fingerprint: str = ""
    global_step: int = 0
    rank: int = 0
    world_size: int = 1
    step_losses: list[float] = field(default_factory=list)
    val_losses: dict[str, float] = field(default_factory=dict)
    # held-out decode-token loss: heldout_full_depth, heldout_speed_zero_shot (before training);
    # heldout_after (as served), heldout_after_full_depth (K < L: the same weights at full depth)
    heldout: dict[str, float] = field(default_factory=dict)
    heldout_by_source: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> source -> loss
    heldout_examples: dict[str, int] = field(default_factory=dict)  # source -> held-out conversations
    fit_seconds: float = 0.0
    heldout_seconds: float = 0.0
    steps_per_s: float = 0.0
    resumed_from: str | None = None
    preempted_by_signal: int | None = None
    preempt_checkpoint: str | None = None
    export: dict[str, str] = field(default_factory=dict)
    zero3_partitioned_at_construction: bool = False
    packed_rows: int | None = None

    @property
    def full_it(self) -> bool:
        return self.k == self.num_layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("heldout"))  # flat keys in results.json
        return d


@dataclass
class TrainData:
    tokenizer: Any
    train: Any  # EncodedDataset
    held_out: Any
    report: Any  # DataReport
    plan: StepPlan
    total_steps: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def train(cfg: DictConfig, *, callbacks=()) -> RunResult:
    """Runs the recipe; ``callbacks``: extra Lightning callbacks (tests, user code)."""
    try:
        result = _train(cfg, callbacks)
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb()
    return result


def _train(cfg: DictConfig, callbacks) -> RunResult:
    # 1. validate everything that can be checked before data or weights are read
    world = world_size_of(cfg)
    validate(cfg, world)
    check_init_from(cfg.init_from, run_fingerprint(cfg))
    auto = str(cfg.trainer.precision) == "auto"
    precision = resolve_precision(cfg)
    if auto and rank_zero_only.rank == 0:
        log.info("precision: %s (trainer.precision=auto)", precision)
    out = check_output_dir(cfg.output_dir)
    with run_folder_lock(out):  # one live run per folder
        return _run(cfg, callbacks, world, out)


def _run(cfg: DictConfig, callbacks, world: int, out: Path) -> RunResult:
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    # 2. the checkpoint to resume from must be this run's: its record is checked before any data
    ckpt = resolve_resume(cfg.resume, out / "checkpoints", quarantine=rank_zero_only.rank == 0)
    check_resume(ckpt, run_fingerprint(cfg))
    # 3. data: tokenise (cached), plan the optimizer steps
    data = prepare_data(cfg, world)
    fingerprint = run_fingerprint(cfg, data)
    check_resume(ckpt, fingerprint)
    check_steps(ckpt, data.total_steps)
    if rank_zero_only.rank == 0:
        warn_without_held_out(cfg, data.held_out)
    # 4. trainer: strategy, loggers, callbacks
    cbs = run_callbacks(
        cfg, out, data.held_out, data.pad_id, data.total_steps, lockstep=is_zero3(cfg), extra=callbacks
    )
    trainer = build_trainer(
        cfg, out, cbs, data.total_steps, data.plan.accumulation, checkpoint_step(ckpt) if ckpt else None
    )
    if trainer.is_global_zero and ckpt is not None:
        prune(out / "checkpoints", cfg.trainer.keep_checkpoints, protect=ckpt)
    with ExitStack() as scope:
        # 5. model, built ZeRO-3-partitioned when the ranks exist already
        partitioned = _enter_zero3_construction(cfg, trainer, scope)
        model = load_model(cfg, data.tokenizer)
        config = unwrap(model).config
        check_window(config, cfg.data.max_length, cfg.model.name)
        num_layers = config.num_hidden_layers
        k = speed_config(cfg).resolve_k(num_layers)
        module = SpeedLM(
            model,
            k=k,
            executor=cfg.speed.executor,
            backend=cfg.model.attn_backend,
            optim=cfg.optim,
            objective=cfg.objective,
            total_steps=data.total_steps,
            accumulation=data.plan.accumulation,
            peak_flops=peak_flops(cfg.trainer.accelerator),
        )
        module.run_fingerprint = fingerprint
        if ckpt is None and cfg.init_from:  # a new run from another run's weights
            load_initial_weights(module, cfg.init_from, fingerprint)
        # 6. fit (the held-out table is computed on the devices at fit start and train end)
        loader = ResumableLoader(
            data.train,
            data.plan,
            trainer.global_rank,
            data.pad_id,
            pack_to=cfg.data.max_length if cfg.data.pack else None,
            num_workers=cfg.data.num_workers,
        )
        fit_start, step_start = time.perf_counter(), trainer.global_step
        _fit(trainer, module, loader, ckpt, out, cfg)
        fit_seconds = time.perf_counter() - fit_start
    # (transformers' ZeRO-3 config is released here: the consolidated rank-0 model is a full one)
    result = _result(
        cfg, trainer, module, cbs, data, k, num_layers, partitioned, ckpt, fit_seconds, step_start
    )
    # 7. export: ZeRO-3 shards are gathered into one model on rank 0 (all ranks take part)
    if cfg.export.enabled and result.preempted_by_signal is None:
        final = consolidate(model, cfg, data.tokenizer, trainer.is_global_zero)
        if trainer.is_global_zero:
            result.export = _export(final, data.tokenizer, cfg, out, result)
    if trainer.is_global_zero:
        write_json(out / "results.json", result.to_dict(), default=str)
        (out / "failed.json").unlink(missing_ok=True)  # of an earlier attempt (a failed export, say)
    return result


def _fit(trainer: L.Trainer, module: SpeedLM, loader, ckpt: str | None, out: Path, cfg: DictConfig) -> None:
    """``trainer.fit``; what stops it that a user must act on becomes a one-line error."""
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt, weights_only=True)
    except DivergenceError as e:
        newest = newest_checkpoint(out / "checkpoints")
        raise DivergenceError(
            f"{e}; stopped before saving it (newest checkpoint: {newest or 'none'}). Lower optim.lr "
            f"(now {cfg.optim.lr:g}) or check the data, then start a new run (another hydra.run.dir)"
        ) from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused what the file holds
        raise ResumeError(
            f"resume: {ckpt} holds objects other than tensors and plain data, which loading with "
            "weights_only refuses (it was not written by speed-train, or was altered): resume from "
            "another checkpoint, or start afresh with resume=never"
        ) from None


def _export(model, tokenizer, cfg: DictConfig, out: Path, result: RunResult) -> dict[str, str]:
    """The export; one that cannot be written (a full disk, a read-only folder) leaves the final
    checkpoint and says how to export again from it."""
    try:
        return export(model, tokenizer, cfg, out / "export", result=result)
    except OSError as e:
        raise ExportError(
            e.errno,
            f"cannot write the export into {out / 'export'} ({e.strerror or e}); the trained model is "
            f"saved in {newest_checkpoint(out / 'checkpoints')}: free space or make the folder "
            f"writable, then export from it with: {resume_command(str(out))}",
        ) from None


def warn_without_held_out(cfg: DictConfig, held_out) -> None:
    """Held-out evaluation that was asked for but has nothing to run on says so."""
    asked = []
    if cfg.eval_report:
        asked.append("eval_report=true")
    if cfg.trainer.eval_every_n_steps is not None:
        asked.append(f"trainer.eval_every_n_steps={cfg.trainer.eval_every_n_steps}")
    if asked and not len(held_out):
        log.warning(
            "%s: the held-out set is empty (data.held_out, data.max_eval_examples or the recipe's "
            "held_out): no held-out loss will be reported",
            " and ".join(asked),
        )


def prepare_data(cfg: DictConfig, world: int) -> TrainData:
    """Tokeniser, train/held-out sets (built once, cached; other ranks wait for the build) and the
    step plan. The data report (per source and reason) is printed by rank 0."""
    from speed_train.data.pipeline import build_dataset
    from speed_train.data.recipes import load_recipe

    d = cfg.data
    tokenizer = load_tokenizer(cfg)
    train_ex, held_ex, report = build_dataset(
        d.recipe,
        tokenizer,
        speed_config(cfg),
        max_length=d.max_length,
        cache_dir=d.cache_dir,
        truncate=str(d.truncate),
        max_bad_fraction=d.max_bad_fraction,
        num_proc=d.num_proc,
        held_out=d.held_out,
        held_out_recipe=d.held_out_recipe,
        dedup_held_out=d.held_out_dedup,
    )
    if rank_zero_only.rank == 0:
        log.info("data:\n%s", report.summary())
    if d.max_train_examples:
        train_ex = train_ex[: d.max_train_examples]
    if d.max_eval_examples is not None:  # the same sample for every arm and seed (the recipe's seed)
        held_ex = held_ex.stratified_sample(d.max_eval_examples, seed=load_recipe(d.recipe).seed)
    t = cfg.trainer
    counts = [int(x) for x in train_ex.supervised_counts()]
    rows = pack_rows([int(x) for x in train_ex.lengths], d.max_length, t.seed) if d.pack else None
    try:
        plan = StepPlan(
            counts,
            t.global_batch_size,
            t.micro_batch_size,
            world,
            t.seed,
            rows=rows,
            reduce=str(cfg.objective.reduce),
        )
    except ValueError as e:
        raise ConfigError(f"data.recipe={d.recipe}: {e}") from None
    total = t.max_steps if t.max_steps > 0 else t.epochs * plan.steps_per_epoch
    return TrainData(tokenizer, train_ex, held_ex, report, plan, total)


def _enter_zero3_construction(cfg: DictConfig, trainer: L.Trainer, scope: ExitStack) -> bool:
    """ZeRO-3 with externally started ranks (torchrun, srun, ...): build the model partitioned,
    so no rank ever holds all of it. That needs the process group first: Lightning's strategy
    sets it up from the launcher's environment (fit finds it ready). When Lightning starts the
    ranks itself (LightningEnvironment), they do not exist yet when rank 0 builds its model:
    every process then builds the full model, which the engine partitions at setup."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    partitioned = (
        is_zero3(cfg)
        and env is not None
        and env.creates_processes_externally
        and not isinstance(env, LightningEnvironment)
    )
    if partitioned:
        trainer.strategy.setup_environment()
        scope.enter_context(zero3_construction(trainer.strategy.config))
    return partitioned


def _result(
    cfg, trainer, module, cbs, data, k, num_layers, partitioned, ckpt, fit_seconds, step_start
) -> RunResult:
    table = cbs.get("heldout")
    preemption = cbs["preemption"]
    validation = cbs.get("validation")
    heldout_seconds = table.seconds if table is not None else 0.0
    return RunResult(
        k=k,
        num_layers=num_layers,
        anchor=str(cfg.speed.anchor),
        data_report=data.report.summary(),
        seed=int(cfg.trainer.seed),
        precision=str(trainer.precision),
        add_bos=str(speed_config(cfg).add_bos).lower(),
        data_fingerprint=data_fingerprint(data.train, data.plan, data.total_steps),
        heldout_fingerprint=examples_fingerprint(data.held_out),
        global_step=trainer.global_step,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        step_losses=list(module.step_losses),
        val_losses={str(s): v for s, v in sorted(validation.history.items())} if validation else {},
        heldout=dict(table.results) if table is not None else {},
        heldout_by_source=dict(table.by_source) if table is not None else {},
        heldout_examples=dict(Counter(data.held_out.sources())) if len(data.held_out) else {},
        fit_seconds=fit_seconds,
        heldout_seconds=heldout_seconds,
        steps_per_s=(trainer.global_step - step_start) / max(fit_seconds - heldout_seconds, 1e-9),
        resumed_from=ckpt,
        preempted_by_signal=preemption.received,
        preempt_checkpoint=preemption.saved,
        zero3_partitioned_at_construction=partitioned,
        packed_rows=data.plan.num_rows if cfg.data.pack else None,
    )


def resume_command(output_dir: str) -> str:
    """The command that continues this run: the same command line, pinned to its run folder."""
    own = ("hydra.run.dir=", "output_dir=", "resume=")  # replaced below
    args = [a for a in sys.argv[1:] if not a.startswith(own)]
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            args = [a for a in HydraConfig.get().overrides.task if not a.startswith(own)]
    except (ImportError, ValueError):
        pass
    return shlex.join(
        ["python", "-m", "speed_train", *args, f"hydra.run.dir={Path(output_dir)}", "resume=auto"]
    )


def _finish_wandb(exit_code: int | None = None) -> None:
    """One wandb run per Hydra job: finish explicitly (a failed job too), or multirun merges
    jobs into one run."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except ImportError:
        pass


__all__ = ["RunResult", "train", "ConfigError", "resume_command"]
