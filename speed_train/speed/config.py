"""SpeedConfig: the three knobs of SPEED, validated once, with errors that say what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ANCHOR_POLICIES = ("none", "bos", "system")
LOSS_SCOPES = ("last_turn", "all_assistant")


class SpeedConfigError(ValueError):
    """A SPEED setting is out of range or of the wrong kind."""


@dataclass(frozen=True)
class SpeedConfig:
    """SPEED-K settings.

    k: the cutoff. An int is a layer count (0 < k <= L); a float in (0, 1] is a fraction of
       the model's layers, rounded to the nearest layer. ``None`` means full depth (K = L).
    anchor: ``none`` (SPEED-K), ``bos`` (first token of each conversation), ``system`` (the
       whole leading system message; the first token when there is none).
    loss_scope: ``last_turn`` or ``all_assistant`` (token-weighted mean over turns).
    """

    k: int | float | None = None
    anchor: str = "bos"
    loss_scope: str = "all_assistant"

    def __post_init__(self) -> None:
        if self.anchor not in ANCHOR_POLICIES:
            raise SpeedConfigError(
                f"unknown anchor policy {self.anchor!r}: choose one of {', '.join(ANCHOR_POLICIES)}"
            )
        if self.loss_scope not in LOSS_SCOPES:
            raise SpeedConfigError(
                f"unknown loss scope {self.loss_scope!r}: choose one of {', '.join(LOSS_SCOPES)}"
            )
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
            k = max(1, min(num_layers, round(self.k * num_layers)))
            return k
        if self.k > num_layers:
            raise SpeedConfigError(
                f"cutoff k={self.k} exceeds the model's {num_layers} layers; use 1..{num_layers} "
                f"(k={num_layers} is full depth) or a fraction such as 0.75"
            )
        return self.k

    def to_dict(self) -> dict:
        return asdict(self)
