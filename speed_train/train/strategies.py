"""Lightning strategies from the config: auto, DDP, DeepSpeed ZeRO-1/2/3 (+ CPU offload).

DeepSpeed on CPU (tests, laptops): stock Lightning refuses it, so ``CPUDeepSpeedStrategy``
skips the CUDA check and places the model on the CPU; the process group is gloo and the
optimizer is torch's Adam (``torch_adam``) so no DeepSpeed op is compiled.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's "CUDA only" check

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")


def deepspeed_config(stage: int, offload_optimizer: bool, offload_parameters: bool, cpu: bool) -> dict:
    zero: dict = {"stage": stage, "overlap_comm": not cpu, "contiguous_gradients": True}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    if offload_parameters and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    # The optimizer and its schedule come from the LightningModule; torch_adam: nothing to compile
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "torch_adam": True}


def build_strategy(cfg, accelerator: str):
    s = cfg.strategy
    cpu = accelerator == "cpu"
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        return DDPStrategy(process_group_backend="gloo" if cpu else None)
    config = deepspeed_config(s.zero_stage, s.offload_optimizer, s.offload_parameters, cpu)
    if cpu:
        return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")
    return DeepSpeedStrategy(config=config)
