"""HF-native SPEED models outside speed-train: the classes (``speed_train.speed.hf_model``, which
an export carries as code files) registered with transformers' Auto classes when this package
is imported, and the export that writes a folder anyone can load with transformers alone."""

from __future__ import annotations

from speed_train.speed.hf_model import SPEED_CLASSES, SpeedGenerationMixin


def register() -> None:
    """Make ``speed_<arch>`` folders load through the Auto classes in this process without
    ``trust_remote_code`` (the classes are this package's own; idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_cls, model_cls in SPEED_CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass


register()

__all__ = ["SPEED_CLASSES", "SpeedGenerationMixin", "register"]
