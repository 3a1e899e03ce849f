"""The LightningModule: an HF causal LM (optionally peft-wrapped) trained with the SPEED loss.

Loss normalisation: each micro-batch carries ``step_norm``, the normaliser of its whole
optimizer step (all micro-batches, all ranks; see loader.StepPlan): the step's supervised tokens
(``objective.reduce=mean``) or its conversations (``reduce=sum``, open-instruct's
``--reduce_loss sum`` made independent of the split). The module returns
``loss_sum * scale / step_norm`` where ``scale`` undoes the averaging that the training stack
applies afterwards (Lightning divides by the accumulation steps, data parallelism averages over
ranks), so the gradient of a step is exactly d(sum of token losses)/d(theta) / step_norm,
whatever the split.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F

from speed_train.speed.executors import speed_forward, speed_loss
from speed_train.speed.flops import ModelShape, step_flops
from speed_train.speed.roles import DECODE, PROMPT
from speed_train.train.schema import ObjectiveConfig, OptimConfig

# Our schedule names -> transformers.get_scheduler's (all with linear warm-up).
SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant_with_warmup",
    "cosine_with_min_lr": "cosine_with_min_lr",
    "warmup_stable_decay": "warmup_stable_decay",
}


class DivergenceError(RuntimeError):
    """The loss or the gradient norm of an optimizer step is not finite: the run stops before
    anything of that step is saved."""


def non_finite(named_tensors) -> list[str]:
    """Names of the floating-point tensors in ``named_tensors`` ((name, tensor) pairs) that hold a
    NaN or an infinity."""
    return [
        n
        for n, t in named_tensors
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """transformers.get_scheduler for ``optim.schedule`` with ``warmup_ratio`` x total steps of
    linear warm-up (stepped once per optimizer step)."""
    from transformers import get_scheduler

    warmup = round(optim.warmup_ratio * total_steps)
    name = str(optim.schedule)
    extra: dict = {}
    if name == "cosine_with_min_lr":
        extra = {"min_lr_rate": optim.min_lr_ratio}
    elif name == "warmup_stable_decay":
        decay = round(optim.decay_ratio * total_steps)
        extra = {"num_decay_steps": decay, "num_stable_steps": max(0, total_steps - warmup - decay)}
    return get_scheduler(
        SCHEDULERS[name],
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra or None,
    )


class SpeedLM(L.LightningModule):
    def __init__(
        self,
        model,
        *,
        k: int,
        executor: str,
        backend: str,
        optim: OptimConfig,
        objective: ObjectiveConfig,
        total_steps: int,
        accumulation: int,
        peak_flops: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.k, self.executor, self.backend = k, str(executor), str(backend)
        self.optim_cfg, self.objective = optim, objective
        self.total_steps, self.accumulation = total_steps, accumulation
        self.peak_flops = peak_flops
        self.shape = ModelShape.from_config(_config_of(model))
        self._acc = {
            "loss": 0.0,
            "tokens": 0,
            "all_tokens": 0,
            "cells": 0,
            "prompt": 0,
            "decode": 0,
            "flops": 0.0,
        }
        self._t0: float | None = None
        self._last_step = 0
        self.step_ended = False  # did the latest micro-batch finish an optimizer step?
        self.step_losses: list[float] = []  # per optimizer step (restored from the checkpoint on resume)
        self.last_metrics: dict[str, float] = {}  # of the newest step, for the progress bar
        self._grad_norm: float | None = None  # of the step being finished (on_before_optimizer_step)
        self.run_fingerprint: dict | None = None  # what defines the run (train.resume), in checkpoints

    # -- loss ------------------------------------------------------------------------------
    def _objective_sum(self, batch) -> tuple[torch.Tensor, int]:
        if self.objective.kind == "distill":
            return self._distill_sum(batch)
        out = speed_loss(self.model, batch, self.k, executor=self.executor, backend=self.backend)
        return out.loss_sum, out.num_tokens

    def _distill_sum(self, batch) -> tuple[torch.Tensor, int]:
        """KL(teacher || student) on supervised positions; teacher = same weights, adapters off,
        full depth (no second copy of the model)."""
        if not hasattr(self.model, "disable_adapter"):
            raise ValueError(
                "objective=distill needs a LoRA model: its teacher is the model with adapters disabled"
            )
        with torch.no_grad(), self.model.disable_adapter():
            teacher = speed_forward(
                self.model,
                batch,
                self.shape.layers,
                executor="gather",
                positions="targets",
                backend=self.backend,
            )
        student = speed_forward(
            self.model, batch, self.k, executor=self.executor, positions="targets", backend=self.backend
        )
        T = self.objective.temperature
        log_p_t = F.log_softmax(teacher.logits.float() / T, -1)
        log_p_s = F.log_softmax(student.logits.float() / T, -1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() * T * T
        n = int(student.logits.shape[0])
        if self.objective.ce_weight:
            tgt = batch.targets()[student.batch_idx, student.pos_idx]
            kl = kl + self.objective.ce_weight * F.cross_entropy(student.logits.float(), tgt, reduction="sum")
        return kl, n

    def _scale(self, step_norm: int) -> float:
        """Undo what the stack divides by afterwards: Lightning's closure divides the returned loss
        by GA; DDP and ZeRO average gradients over ranks; and the DeepSpeed engine's backward
        divides by GA once more (``scale_wrt_gas``; tests/test_train.py checks the gradients)."""
        scale = self.accumulation * self.trainer.world_size / max(step_norm, 1)
        if self._is_deepspeed():
            scale *= self.accumulation
        return scale

    def training_step(self, item, batch_idx):
        batch = item["batch"]
        if self._t0 is None:
            self._t0 = time.perf_counter()
        loss_sum, n = self._objective_sum(batch)
        a = self._acc
        a["loss"] += float(loss_sum.detach())
        a["tokens"] += n
        real = batch.seq_ids >= 0
        a["all_tokens"] += int(real.sum())
        a["cells"] += real.numel()
        a["prompt"] += int(((batch.roles == PROMPT) & real).sum())
        a["decode"] += int(((batch.roles == DECODE) & real).sum())
        a["flops"] += step_flops(self.shape, batch, self.k, "mask" if self.executor == "mask" else "gather")
        return loss_sum * self._scale(item["step_norm"])

    def end_of_micro_batch(self, item) -> None:
        """Book-keeping after each micro-batch, called by :class:`StepBookkeeping` — a callback, so
        that it runs *before* the checkpoint callbacks (Lightning calls callbacks before the
        module's own ``on_train_batch_end``, and moves checkpoint callbacks last): a checkpoint
        written at this step then holds this micro-batch as consumed and this step's loss."""
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_consumed"):
            loader.mark_consumed(item["epoch"])
        # The one place that knows whether this micro-batch ended an optimizer step (keyed off
        # global_step: with DeepSpeed the optimizer hooks fire per micro-batch); the callbacks
        # after StepBookkeeping (validation, pre-emption) read `step_ended`.
        self.step_ended = self.trainer.global_step != self._last_step
        if not self.step_ended:  # still accumulating
            return
        self._last_step = self.trainer.global_step
        keys = ("loss", "tokens", "all_tokens", "cells", "prompt", "decode", "flops")
        stats = torch.tensor([self._acc[k] for k in keys], dtype=torch.float64, device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        loss, tokens, all_tokens, cells, prompt, decode, flops = stats.tolist()
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        metrics = {
            "train/loss": loss / max(tokens, 1),
            "train/supervised_tokens": tokens,
            "train/prompt_tokens": prompt,
            "train/decode_tokens": decode,
            "train/padding_share": 1.0 - all_tokens / max(cells, 1),
            "train/tokens_per_s": all_tokens / max(dt, 1e-9),
            "train/supervised_tokens_per_s": tokens / max(dt, 1e-9),
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
        }
        if self.peak_flops:
            metrics["train/mfu"] = flops / max(dt, 1e-9) / (self.peak_flops * self.trainer.world_size)
        norm = self._grad_norm
        if self._is_deepspeed():
            norm = self.trainer.model.get_global_grad_norm()  # ZeRO: no full .grad on the params
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        self._grad_norm = None
        self._check_finite(metrics)
        self.log_dict(metrics, on_step=True, prog_bar=False, logger=True, rank_zero_only=True)
        self.step_losses.append(metrics["train/loss"])
        self.last_metrics = metrics
        for k in self._acc:
            self._acc[k] = 0.0 if k in ("loss", "flops") else 0
        self._t0 = time.perf_counter()

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Stop on a non-finite loss or gradient norm, here: before the checkpoint callbacks of this
        step run (so no diverged checkpoint replaces a finite one) and on every rank alike (the
        loss is reduced over the ranks, the gradient norm is global). Under fp16 loss scaling an
        infinite gradient is how the scaler finds its scale (it skips that step): only the loss
        counts there."""
        loss, norm = metrics["train/loss"], metrics.get("train/grad_norm")
        scaled = str(self.trainer.precision).startswith("16")
        if math.isfinite(loss) and (norm is None or scaled or math.isfinite(norm)):
            return
        raise DivergenceError(
            f"training diverged at optimizer step {self.trainer.global_step}: loss {loss:.4g}, gradient "
            f"norm {norm if norm is None else f'{norm:.4g}'}"
        )

    def on_fit_start(self) -> None:
        # HF from_pretrained / the tiny builder return models in eval mode, and Lightning keeps
        # submodule modes as found: without this, dropout (LoRA dropout included) and HF
        # gradient checkpointing (active only in training mode) would silently be off.
        self.model.train()

    def on_train_start(self) -> None:
        self._last_step = self.trainer.global_step

    def _is_deepspeed(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._is_deepspeed():  # called per micro-batch and grads are partitioned: logged at step end
            return
        from lightning.pytorch.utilities import grad_norm

        norms = grad_norm(self.model, norm_type=2)  # before clipping; logged with the step's metrics
        if norms:
            self._grad_norm = float(norms["grad_2.0_norm_total"])

    # -- optimiser ---------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [
            g
            for g in (
                {"params": decay, "weight_decay": o.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]
        # fused AdamW (one kernel for all parameters) where every trained parameter is on a GPU
        fused = o.fused if o.fused is not None else bool(params) and all(p.is_cuda for p in params)
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
        sched = build_scheduler(opt, o, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- exact resume: RNG state travels with the checkpoint ---------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["speed_run"] = self.run_fingerprint
        checkpoint["speed_rng"] = {"torch": torch.get_rng_state(), "last_step": self._last_step}
        checkpoint["speed_step_losses"] = list(self.step_losses)
        # Frozen weights (the base model under LoRA) are rebuilt from their source on resume:
        # keeping them out makes a LoRA checkpoint megabytes instead of the whole model.
        frozen = {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}
        state = checkpoint.get("state_dict")
        if frozen and state is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
            checkpoint["speed_frozen_excluded"] = len(frozen)
        bad = non_finite(checkpoint.get("state_dict", {}).items())
        if bad:  # weights can overflow while the step's loss and gradient norm were still finite
            raise DivergenceError(
                f"training diverged by optimizer step {self.trainer.global_step}: {len(bad)} weight "
                f"tensors hold NaN or infinite values (e.g. {bad[0]}); not saving them"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.run_fingerprint is not None:  # before any state is loaded into this run
            from speed_train.train.resume import check_loaded

            check_loaded(checkpoint, self.run_fingerprint, self.trainer.ckpt_path)
        # the frozen weights left out at save come from the model as built (the same source);
        # the load stays strict, so any other missing or unexpected key is still an error
        state = checkpoint.get("state_dict")
        if state is not None and checkpoint.get("speed_frozen_excluded"):
            own = self.state_dict()
            frozen = {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}
            state.update({k: own[k] for k in frozen if k not in state and k in own})
        if "speed_rng" in checkpoint:
            torch.set_rng_state(checkpoint["speed_rng"]["torch"])
        self.step_losses = list(checkpoint.get("speed_step_losses", []))


class StepBookkeeping(L.Callback):
    """Runs :meth:`SpeedLM.end_of_micro_batch` first thing after each micro-batch (see there)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.end_of_micro_batch(batch)


def _config_of(model):
    from speed_train.speed.adapters import unwrap

    return unwrap(model).config
