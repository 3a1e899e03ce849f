"""`python -m speed_train [overrides]`: the thin Hydra entry point (see conf/config.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from speed_train.atomic import write_json
from speed_train.train.schema import register_schema

register_schema()


# version_base=None: Hydra 1.3 defaults; configs are the package `speed_train.conf` (mapped from
# the top-level conf/ by setuptools), so source, editable and wheel installs all find them.
@hydra.main(version_base=None, config_path="pkg://speed_train.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from speed_train.train.run import train
    from speed_train.train.summary import print_summary

    try:
        results = train(cfg)
    except Exception as e:  # leave a trace in the run folder: sweep summaries list the job as failed
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "failed.json", {"error": f"{type(e).__name__}: {e}"})
        raise
    print_summary(results, cfg)


if __name__ == "__main__":
    main()
