"""SpeedConfig: the SPEED knobs, validated once, with errors that say what to do.

This dataclass is also the ``speed`` section of the training config (``train/schema.py``
extends it with the executor), so the allowed values below are the only copy: OmegaConf rejects
anything else when a config is composed, and the core checks them when called directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class StrEnum(str, Enum):
    """An enum whose members are their string values (also in f-strings and JSON)."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Anchor(StrEnum):
    none = "none"  # SPEED-K
    bos = "bos"  # SPEED-K+BoS: the first token (the model's BoS) stays visible at full depth
    system = "system"  # the whole leading system message


class LossScope(StrEnum):
    last_turn = "last_turn"
    all_assistant = "all_assistant"  # token-weighted mean over all assistant turns


class Executor(StrEnum):
    gather = "gather"  # upper layers on anchor + decode rows only (training default)
    mask = "mask"  # one HF forward with per-layer masks


class AttentionBackend(StrEnum):
    sdpa = "sdpa"  # boolean masks (CPU and GPU)
    flex = "flex"  # flex_attention BlockMasks (GPU: no backward on CPU)


ANCHOR_POLICIES = Anchor.values()
LOSS_SCOPES = LossScope.values()


class SpeedConfigError(ValueError):
    """A SPEED setting is out of range or of the wrong kind."""


def choice(enum: type[StrEnum], value: Any, what: str) -> StrEnum:
    """``value`` as a member of ``enum``, or SpeedConfigError naming ``what`` and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise SpeedConfigError(
            f"unknown {what} {value!r}: choose one of {', '.join(enum.values())}"
        ) from None


@dataclass
class SpeedConfig:
    """SPEED-K settings.

    k: the cutoff. An int is a layer count (0 < k <= L); a float in (0, 1] is a fraction of
       the model's layers, rounded to the nearest layer. ``None`` means full depth (K = L).
    anchor: ``none`` (SPEED-K), ``bos`` (first token of each conversation), ``system`` (the
       whole leading system message; the first token when there is none).
    loss_scope: ``last_turn`` or ``all_assistant`` (token-weighted mean over turns).
    """

    k: Any = None
    anchor: Anchor = Anchor.bos
    loss_scope: LossScope = LossScope.all_assistant

    def __post_init__(self) -> None:
        self.anchor = choice(Anchor, self.anchor, "anchor policy")
        self.loss_scope = choice(LossScope, self.loss_scope, "loss scope")
        k = self.k
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise SpeedConfigError(
                f"cutoff k must be a layer count (int) or a fraction of layers (float in (0, 1]), got {k!r}"
            )
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise SpeedConfigError(
                f"fractional cutoff k={k} is outside (0, 1]; give a fraction like 0.75 or a layer count like 24"
            )
        if isinstance(k, int) and k < 1:
            raise SpeedConfigError(f"cutoff k={k} must be at least 1 layer (k = number of layers is Full-IT)")

    def resolve_k(self, num_layers: int) -> int:
        """The cutoff as a layer count for a model with ``num_layers`` layers."""
        if self.k is None:
            return num_layers
        if isinstance(self.k, float):
            return max(1, min(num_layers, round(self.k * num_layers)))
        if self.k > num_layers:
            raise SpeedConfigError(
                f"cutoff k={self.k} exceeds the model's {num_layers} layers; use 1..{num_layers} "
                f"(k={num_layers} is full depth) or a fraction such as 0.75"
            )
        return self.k

    def core(self) -> SpeedConfig:
        """Only the method's knobs (drops what a subclass, e.g. the training schema, adds)."""
        return SpeedConfig(k=self.k, anchor=self.anchor, loss_scope=self.loss_scope)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self.core()).items()}


def parse_k(value: object) -> int | float | None:
    """The one reader of a cutoff given as text or a number (command lines, lm-eval model_args,
    configs): ``None``, ``""``, ``"none"``, ``"null"``, ``"full"`` -> None (full depth);
    ``"24"`` / 24 -> 24 layers; ``"0.75"`` / 0.75 -> a fraction of the layers."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "full")):
        return None
    if isinstance(value, bool):
        raise SpeedConfigError(f"cutoff k={value!r}: give a layer count (24), a fraction (0.75) or 'full'")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise SpeedConfigError(
            f"cutoff k={value!r}: give a layer count (24), a fraction (0.75) or 'full'"
        ) from None


def resolve_saved_k(value: object, num_layers: int, where: str = "speed_k") -> int:
    """A saved cutoff (an export's ``speed_k``, ``speed_config.json``'s ``k``) as a layer count,
    read exactly as every other cutoff: null -> L, an int in 1..L, a float in (0, 1] -> that share
    of the layers. Anything else is refused naming ``where``, never clamped into range."""
    try:
        return SpeedConfig(k=parse_k(value)).resolve_k(num_layers)
    except SpeedConfigError as e:
        raise SpeedConfigError(f"{where}={value!r} in the saved model: {e}") from None
