"""Lightning strategies from the config: auto, DDP, DeepSpeed ZeRO-1/2/3 (+ CPU offload).

DeepSpeed on CPU (tests, laptops): stock Lightning refuses it (CUDA check, GPU device indices),
so ``CPUDeepSpeedStrategy`` skips both and places the model on the CPU. The process group is
gloo; the optimizer is the module's torch AdamW (``torch_adam``, ``zero_allow_untested_optimizer``)
and DeepSpeed's shared-memory all-reduce op is switched off, so no DeepSpeed op is compiled.
``DS_ACCELERATOR=cpu`` is set when the strategy is built (DeepSpeed picks its accelerator once).
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's "CUDA only" check

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed validates GPU indices (None on CPU): skip that
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        _disable_deepspeed_shm_op()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # as DeepSpeedStrategy's, but with device_rank = the local rank (the CPU device has no
        # index; DeepSpeed would then fall back to world size 1)
        import argparse

        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


def _disable_deepspeed_shm_op() -> None:
    """DeepSpeed's torch comm backend JIT-compiles a shared-memory all-reduce op on CPU on first
    use (minutes, needs a compiler). gloo does the same job: never build it."""
    import importlib

    # not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name `torch` (torch itself)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def deepspeed_config(
    stage: int,
    offload_optimizer: bool,
    offload_parameters: bool,
    cpu: bool,
    micro_batch_size: int = 1,
    precision: str = "32-true",
) -> dict:
    zero: dict = {"stage": stage, "overlap_comm": not cpu, "contiguous_gradients": True}
    if stage == 3:
        # export gathers parameters itself (run.consolidated_state_dict), one at a time
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    if offload_parameters and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    # The optimizer and its schedule come from the LightningModule; torch_adam: nothing to compile.
    # Gradient accumulation and clipping come from the Lightning Trainer (never set them here).
    config = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "torch_adam": True,
        # only used by DeepSpeed for throughput logging; our loader has no batch_sampler to read it from
        "train_micro_batch_size_per_gpu": micro_batch_size,
    }
    # Lightning adds these itself at setup, but ZeRO-3 construction (build.zero3_construction) reads
    # the config before that: without them zero.Init would cast a bf16 model to fp32 while partitioning.
    if precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
    elif precision.startswith("16"):
        config["fp16"] = {"enabled": True}
    return config


def build_strategy(cfg, accelerator: str):
    s = cfg.strategy
    cpu = accelerator == "cpu"
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        return DDPStrategy(process_group_backend="gloo" if cpu else None)
    config = deepspeed_config(
        s.zero_stage,
        s.offload_optimizer,
        s.offload_parameters,
        cpu,
        cfg.trainer.micro_batch_size,
        str(cfg.trainer.precision),
    )
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")
    return DeepSpeedStrategy(config=config)
