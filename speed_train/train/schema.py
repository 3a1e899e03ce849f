"""The typed schema of the training config.

Hydra composes ``conf/`` against it: unknown keys, wrong types and values outside an enum are
refused at composition, before anything runs. :func:`speed_train.train.build.validate` then
checks what needs arithmetic, ranges or the model's layer count, still before any weight or
data is loaded. The ``speed`` section *is* the core's :class:`SpeedConfig` (plus the executor),
so its allowed values exist once.

Keys whose recipe also sets them (``data.max_bad_fraction``, ``data.held_out``) default to
null here, which means "the recipe's value": a schema default must never silently win over the
recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from speed_train.speed.chat_roles import Truncate
from speed_train.speed.config import AttentionBackend, Executor, SpeedConfig, StrEnum


class ModelSource(StrEnum):
    smollm2 = "smollm2"  # the packaged SmolLM2-135M-Instruct
    gemma3 = "gemma3"  # the packaged Gemma-3-270M base model (opt-in: make setup-gemma)
    hub = "hub"  # from_pretrained(pretrained): a Hub id or a local folder
    tiny = "tiny"  # random init from the architecture's config (tests, rehearsals)


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Schedule(StrEnum):
    """Learning-rate schedules, by transformers.get_scheduler (all with linear warm-up)."""

    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    cosine_with_min_lr = "cosine_with_min_lr"  # cosine down to optim.min_lr_ratio x lr
    warmup_stable_decay = "warmup_stable_decay"  # constant, then linear decay over optim.decay_ratio


class ObjectiveKind(StrEnum):
    ce = "ce"
    distill = "distill"  # KL to the full-depth teacher (the same weights, adapters off)


class Reduce(StrEnum):
    mean = "mean"  # sum of token losses / supervised tokens of the optimizer step
    sum = "sum"  # sum of token losses / conversations of the step (open-instruct --reduce_loss sum)


class StrategyName(StrEnum):
    auto = "auto"
    ddp = "ddp"
    deepspeed = "deepspeed"


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = ModelSource.hub
    pretrained: Optional[str] = None
    tokenizer: Optional[str] = (
        None  # defaults to `pretrained`; also 'smollm2', 'gemma3' or 'llama3' (packaged)
    )
    chat_template: Optional[str] = None  # override: 'tulu', 'llama3', 'chatml' or a Jinja string
    arch: str = "llama"  # tiny only
    num_layers: Optional[int] = None  # known layer count (validated against K before loading)
    tiny: dict[str, Any] = field(default_factory=dict)  # tiny_config overrides
    dtype: DType = DType.float32  # weights dtype
    attn_backend: AttentionBackend = AttentionBackend.sdpa
    gradient_checkpointing: bool = False


@dataclass
class SpeedSection(SpeedConfig):
    executor: Executor = Executor.gather


@dataclass
class DataConfig:
    recipe: str = MISSING  # the data group (conf/data) names it
    max_length: int = 512
    truncate: Truncate = Truncate.drop_turns
    pack: bool = False  # pack conversations across the dataset into rows of max_length
    num_proc: Optional[int] = None  # preprocessing processes; null: every core of the node
    held_out: Any = None  # count (int) or share (float); null: the recipe's; 0: none
    held_out_recipe: Optional[str] = None  # take the held-out conversations from this recipe
    held_out_dedup: bool = True  # drop held-out conversations sharing a (normalised) turn with training
    max_bad_fraction: Optional[float] = None  # null: the recipe's
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None  # a stratified random sample over sources (seeded by the recipe)
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
    schedule: Schedule = Schedule.linear
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine_with_min_lr
    decay_ratio: float = 0.1  # warmup_stable_decay
    gradient_clip: float = 1.0
    fused: Optional[bool] = None  # fused AdamW; null: where every trained parameter is on a GPU


@dataclass
class ObjectiveConfig:
    kind: ObjectiveKind = ObjectiveKind.ce
    reduce: Reduce = Reduce.mean
    temperature: float = 1.0
    ce_weight: float = 0.0  # distill only: add this much CE


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"  # or "auto": bf16-mixed where the device has native bf16, else 32-true
    micro_batch_size: int = 4  # rows per micro-batch (a row is one conversation, or a packed row)
    global_batch_size: int = 8  # rows per optimizer step, all ranks and micro-batches
    epochs: int = 1
    max_steps: int = -1
    log_every_n_steps: int = 1
    eval_every_n_steps: Optional[int] = None  # val/loss every N optimizer steps and at the end; null: none
    checkpoint_every_n_steps: Optional[int] = None  # null: at the end only
    keep_checkpoints: int = 2
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class StrategyConfig:
    name: StrategyName = StrategyName.auto
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
class ExportConfig:
    enabled: bool = True
    push_to_hub: Optional[str] = None  # a Hub repo id: upload the exported folder + model card


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
    export: ExportConfig = field(default_factory=ExportConfig)
    output_dir: str = "${hydra:runtime.output_dir}"
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | never | <path>
    init_from: Optional[str] = None  # a checkpoint file: a new run starts from its trained weights
    eval_report: bool = True  # held-out decode-loss table before and after training


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
