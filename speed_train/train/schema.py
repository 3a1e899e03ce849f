"""Structured schema of the training config: Hydra validates types and rejects unknown keys
(struct mode) when composing; :func:`validate` then checks what needs arithmetic or the model's
layer count — all before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    # smollm2: the packaged SmolLM2-135M-Instruct; hub: from_pretrained(pretrained); tiny: random init
    source: str = "hub"
    pretrained: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `pretrained`
    arch: str = "llama"  # tiny only
    num_layers: Optional[int] = None  # known layer count (validated against K before loading)
    tiny: dict[str, Any] = field(default_factory=dict)  # tiny_config overrides
    dtype: str = "float32"  # weights dtype: float32 | bfloat16
    attn_backend: str = "sdpa"  # sdpa (CPU/GPU) | flex (GPU)
    gradient_checkpointing: bool = False


@dataclass
class SpeedSection:
    k: Any = None  # int layer count | float fraction | null (full depth)
    anchor: str = "bos"
    loss_scope: str = "all_assistant"
    executor: str = "gather"  # gather | mask


@dataclass
class DataConfig:
    recipe: str = "packaged_chat"
    max_length: int = 512
    truncate: str = "drop_turns"
    pack: bool = False
    max_bad_fraction: float = 0.5
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    cache_dir: Optional[str] = None
    num_workers: int = 0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    layers_to_transform: Optional[list[int]] = None


@dataclass
class OptimConfig:
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.03
    gradient_clip: float = 1.0


@dataclass
class ObjectiveConfig:
    kind: str = "ce"  # ce | distill (KL to the full-depth teacher on decode tokens)
    temperature: float = 1.0
    ce_weight: float = 0.0  # distill only: add this much CE


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    micro_batch_size: int = 4
    global_batch_size: int = 8
    epochs: int = 1
    max_steps: int = -1
    log_every_n_steps: int = 1
    eval_every_n_steps: Optional[int] = None  # val/loss every N optimizer steps and at the end; null: none
    checkpoint_every_n_steps: Optional[int] = None
    keep_checkpoints: int = 2
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | ddp | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class LoggerConfig:
    kind: list[str] = field(default_factory=lambda: ["csv"])  # csv, wandb
    project: str = "speed-train"
    group: Optional[str] = None
    name: Optional[str] = None
    mode: Optional[str] = None  # wandb mode; offline unless a key/project is configured


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    speed: SpeedSection = field(default_factory=SpeedSection)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output_dir: str = "${hydra:runtime.output_dir}"
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | never | <path>
    export: bool = True
    eval_report: bool = True  # held-out decode loss table (full depth / SPEED zero-shot / after)
    task: str = "train"


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
