"""Metric logging: one JSON line per logged step in ``metrics.jsonl``, and TensorBoard.

Only process 0 writes. Lines are flushed as they are written, so a crash loses
nothing that was logged; a line cut short by a kill mid-write (no newline at its end)
is ignored when reading and dropped when a resumed run truncates the file.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from pvae_jax import fileio

METRICS_FILE = "metrics.jsonl"


def _to_float(value) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None  # JSON has no NaN; null marks it.


class MetricWriter:
    """Appends ``{"step", "split", name: value, ...}`` records to ``workdir/metrics.jsonl``."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if self._active and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records of steps after ``step``: a resumed run recomputes them exactly."""
        if not self._active or not os.path.exists(self._path):
            return
        kept = [json.dumps(r) + "\n" for r in read_metrics(os.path.dirname(self._path))
                if r["step"] <= step]
        with fileio.atomic_write(self._path) as f:
            f.writelines(kept)

    def write(self, step: int, split: str, metrics: dict) -> dict:
        """Logs ``metrics`` (names like 'train/loss') and returns them as Python floats."""
        record = {name: _to_float(value) for name, value in metrics.items()}
        if self._active:
            with open(self._path, "a") as f:
                f.write(json.dumps({"step": int(step), "split": split, **record}) + "\n")
            if self._tb is not None:
                for name, value in record.items():
                    if value is not None:
                        self._tb.add_scalar(name, value, int(step))
                self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All complete records of ``workdir/metrics.jsonl``, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # Cut short by a kill mid-write; that step is logged again on resume.
    return [json.loads(line) for line in lines if line.strip()]
