"""SpeedConfig: the SPEED knobs, validated once, with errors that say what to do.

This dataclass is also the ``speed`` section of the training config (``train/schema.py``
extends it with the executor), so the allowed values below are the only copy: OmegaConf rejects
anything else when a config is composed, and the core checks them when called directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal


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


AddBos = Literal["auto", True, False]
ADD_BOS_VALUES = ("auto", True, False)

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


def check_add_bos(value: Any) -> AddBos:
    """``value`` as one of ``"auto"``, True, False (also accepts "true"/"false" strings)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value in ADD_BOS_VALUES and (isinstance(value, bool) or value == "auto"):
        return value
    raise SpeedConfigError(f"add_bos={value!r}: use 'auto', true or false")


@dataclass
class SpeedConfig:
    """SPEED-K settings.

    k: the cutoff. An int is a layer count (0 < k <= L); a float in (0, 1] is a fraction of
       the model's layers, rounded to the nearest layer. ``None`` means full depth (K = L).
    anchor: ``none`` (SPEED-K), ``bos`` (first token of each conversation), ``system`` (the
       whole leading system message; the first token when there is none).
    loss_scope: ``last_turn`` or ``all_assistant`` (token-weighted mean over turns).
    add_bos: the BoS rule of :mod:`.roles`, the same for every arm of a study: ``auto`` (a BoS
       on every sequence whenever the tokenizer has one), ``true`` (required), ``false`` (none).

    This one object is a model's SPEED settings everywhere: the ``speed`` section of a training
    config, an export's ``config.json`` (``speed_*`` keys, :meth:`to_hf_fields`) and its
    ``speed_config.json`` (:meth:`to_dict`), read back by :meth:`from_pretrained`.
    """

    k: Any = None
    anchor: Anchor = Anchor.bos
    loss_scope: LossScope = LossScope.all_assistant
    add_bos: Any = "auto"

    def __post_init__(self) -> None:
        self.anchor = choice(Anchor, self.anchor, "anchor policy")
        self.add_bos = check_add_bos(self.add_bos)
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
        return SpeedConfig(k=self.k, anchor=self.anchor, loss_scope=self.loss_scope, add_bos=self.add_bos)

    def with_k(self, num_layers: int) -> SpeedConfig:
        """A copy whose ``k`` is the resolved layer count (what an export records)."""
        return replace(self.core(), k=self.resolve_k(num_layers))

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self.core()).items()}

    def to_hf_fields(self, num_layers: int) -> dict:
        """The ``speed_*`` keys of an HF-native export's ``config.json``: K as a layer count, null at
        full depth (the unmodified base model); the role ids an export also needs are added by
        ``hf_model.speed_config_fields``."""
        k = self.resolve_k(num_layers)
        return {
            "speed_k": None if k >= num_layers else k,
            "speed_anchor": str(self.anchor),
            "speed_loss_scope": str(self.loss_scope),
            "speed_add_bos": self.add_bos,
        }

    @classmethod
    def from_hf_config(cls, config: Any) -> SpeedConfig | None:
        """The settings in an HF config (object or dict) with ``speed_k``; None for a plain model.
        K is checked against the model's layers (one line naming the key, never clamped)."""
        get = config.get if isinstance(config, dict) else lambda key, d=None: getattr(config, key, d)
        if get("speed_k", _MISSING) is _MISSING:
            return None
        layers = get("num_hidden_layers")
        return cls._saved(
            get("speed_k"),
            layers,
            get("speed_anchor") or "none",
            get("speed_add_bos", "auto"),
            "speed_k",
            get("speed_loss_scope") or LossScope.all_assistant,
        )

    @classmethod
    def from_file(cls, path: str | Path, num_layers: int) -> SpeedConfig | None:
        """The settings in a ``speed_config.json`` (a LoRA adapter's, or an older export's); None
        when the file is absent."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEED_CONFIG_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        k = saved.get("k_layers", saved.get("k"))
        return cls._saved(
            k,
            num_layers,
            saved.get("anchor", "bos"),
            saved.get("add_bos", "auto"),
            f"{path.name}: k",
            saved.get("loss_scope") or LossScope.all_assistant,
        )

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, adapter: str | Path | None = None, *, config: Any = None
    ) -> SpeedConfig | None:
        """The SPEED settings a model was trained with, K as a layer count; None for a plain model.

        The one reader of saved settings (eval, chat, the lm-eval adapter, serving, the HF-native
        classes). First found: the LoRA adapter's ``speed_config.json`` (an adapter carries its own
        training's settings); the model's ``config.json`` ``speed_*`` keys (what transformers runs,
        so it wins over the folder's copy); the folder's ``speed_config.json``. ``config``: the
        model's loaded config, saving a read (a Hub id is read through transformers' cache)."""
        if config is None:
            config = _read_hf_config(name_or_path)
        layers = config["num_hidden_layers"] if isinstance(config, dict) else config.num_hidden_layers
        found = cls.from_file(adapter, layers) if adapter else None
        if found is None:
            found = cls.from_hf_config(config)
        if found is None and Path(str(name_or_path)).is_dir():
            found = cls.from_file(name_or_path, layers)
        return found

    @classmethod
    def _saved(cls, k, layers, anchor, add_bos, where: str, loss_scope) -> SpeedConfig:
        k = resolve_saved_k(k, layers, where)
        try:
            return cls(k=k, anchor=anchor, add_bos=add_bos, loss_scope=loss_scope)
        except SpeedConfigError as e:
            raise SpeedConfigError(f"the saved model's SPEED settings: {e}") from None


_MISSING = object()
SPEED_CONFIG_FILE = "speed_config.json"


def _read_hf_config(name_or_path: str | Path) -> dict:
    """``config.json`` of a local folder or a Hub id (no model code is imported)."""
    folder = Path(str(name_or_path))
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise SpeedConfigError(f"{folder} has no config.json: is it a saved model folder?")
    else:
        from transformers.utils import cached_file

        path = Path(cached_file(str(name_or_path), "config.json"))
    return json.loads(path.read_text(encoding="utf-8"))


SAVED = "saved"


def with_overrides(
    saved: SpeedConfig | None, *, k: Any = SAVED, anchor: Any = None, add_bos: Any = None
) -> SpeedConfig:
    """The settings to run a loaded model with: each given value (a command line's ``--k``,
    ``--anchor``, ``--add-bos``; lm-eval's model_args) over the model's saved ones, else the
    defaults. ``k=SAVED``: the saved cutoff (full depth for a plain model); a given ``k`` goes
    through :func:`parse_k` ("full" -> full depth)."""
    base = saved or SpeedConfig()
    return SpeedConfig(
        k=(saved.k if saved else None) if k == SAVED else parse_k(k),
        anchor=anchor or base.anchor,
        add_bos=base.add_bos if add_bos is None else add_bos,
        loss_scope=base.loss_scope,
    )


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
