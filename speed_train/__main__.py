"""`python -m speed_train [overrides]`: the thin Hydra entry point (see conf/config.yaml).

Errors the framework raises for a user to fix (config, data, recipe, SPEED settings, missing
assets, a full disk or a read-only folder) print one line, ``error: ...``, and exit with status 1;
``HYDRA_FULL_ERROR=1`` shows the traceback. A run stopped by SIGTERM/SIGUSR1 or Ctrl-C saves a
checkpoint, prints the command that resumes it and exits with 128 + the signal number, so wrappers
know the run is unfinished.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from speed_train.atomic import write_json
from speed_train.train.schema import register_schema

register_schema()

# OS errors a user fixes (space, permissions, paths), as opposed to bugs
USER_OS_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
}


def user_errors() -> tuple[type[BaseException], ...]:
    from speed_train.assets import AssetError
    from speed_train.data.errors import DataError
    from speed_train.loading import ModelNotFoundError
    from speed_train.speed.adapters import UnsupportedModelError
    from speed_train.speed.config import SpeedConfigError
    from speed_train.speed.roles import RoleError
    from speed_train.train.build import ConfigError
    from speed_train.train.module import DivergenceError

    return (
        ConfigError,
        DivergenceError,
        DataError,
        SpeedConfigError,
        RoleError,
        AssetError,
        ModelNotFoundError,
        UnsupportedModelError,
    )


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, user_errors()):
        return True
    return isinstance(exc, OSError) and exc.errno in USER_OS_ERRORS


def quiet_console() -> None:
    """One copy of each log line: Lightning attaches its own console handler beside Hydra's root
    handler; its start-up tips and transformers' deprecation notices are not for this console."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # a deprecation inside Lightning
    # DeepSpeed's ZeRO-3 collectives call renamed torch.distributed functions on every gather
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    import torch

    if not torch.cuda.is_available():  # else DeepSpeed warns that it fell back to CPU when imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars between our lines


# version_base=None: Hydra 1.3 defaults; configs are the package `speed_train.conf` (mapped from
# the top-level conf/ by setuptools), so source, editable and wheel installs all find them.
@hydra.main(version_base=None, config_path="pkg://speed_train.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from speed_train.train.run import train
    from speed_train.train.summary import print_summary

    quiet_console()
    try:
        result = train(cfg)
    except Exception as e:  # leave a trace in the run folder: sweep summaries list the job as failed
        _record_failure(cfg, e)
        # a multirun goes on with its other jobs: let Hydra record this one as failed
        if is_user_error(e) and os.environ.get("HYDRA_FULL_ERROR") != "1" and not _in_multirun():
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise
    print_summary(result, cfg)
    if result.preempted_by_signal and not _in_multirun():
        sys.exit(128 + int(result.preempted_by_signal))


# Overrides whose values are checkpoint paths, and checkpoint names hold '=' (step=2.ckpt).
PATH_KEYS = ("resume", "init_from")


def quote_paths(argv: list[str]) -> list[str]:
    """``resume=runs/a/checkpoints/step=2.ckpt`` as Hydra's override grammar needs it: a value with
    '=' in it quoted (``resume='runs/a/checkpoints/step=2.ckpt'``); quoted values are kept."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in PATH_KEYS and "=" in value and value[:1] not in ("'", '"'):
            arg = f"{key}='" + value.replace("'", "\\'") + "'"
        out.append(arg)
    return out


def main() -> None:
    """``python -m speed_train [overrides]`` and the ``speed-train`` command."""
    sys.argv[1:] = quote_paths(sys.argv[1:])
    hydra_main()


def _in_multirun() -> bool:
    from speed_train.train.trainer import hydra_job

    return hydra_job() is not None


def _record_failure(cfg: DictConfig, e: BaseException) -> None:
    from speed_train.train.resume import ResumeError
    from speed_train.train.runlock import RunFolderBusy

    if isinstance(e, (ResumeError, RunFolderBusy)):
        return  # nothing was run: the folder holds another run's state, which stays as it was
    try:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "failed.json", {"error": f"{type(e).__name__}: {e}"})
    except OSError:
        pass  # the run folder itself is the problem (read-only, full): the message says so


if __name__ == "__main__":
    main()
