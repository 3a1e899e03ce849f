"""A CSV log that survives resumption.

Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts, so a resumed run
would lose the history before the checkpoint. ``ResumableCSVLogger`` instead keeps the rows
of the steps before the resumed step (rows of later steps, logged by the interrupted run after
its checkpoint, are dropped: the resumed run logs them again) and appends. It flushes every
``log_every_n_steps`` so a hard kill loses at most those rows.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from speed_train.atomic import atomic_write


class _KeepingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self.keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.keep_before_step is None or not os.path.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()  # a fresh run: start a fresh file
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [
                r
                for r in reader
                if r.get("step") not in (None, "") and int(float(r["step"])) < self.keep_before_step
            ]

        def write(fh) -> None:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

        atomic_write(self.metrics_file_path, write)
        self.metrics_keys = fields


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that appends to the log of the run it resumes (see the module doc)."""

    def __init__(self, save_dir, *, keep_before_step: int | None, **kw) -> None:
        super().__init__(save_dir, **kw)
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._keep_before_step)
        return self._experiment
