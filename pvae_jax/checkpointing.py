"""Checkpoints of the train state and the data position, with orbax.

One checkpoint holds two items: ``state`` (the train state pytree: params, optimiser,
EMA, step, rng) and ``data`` (the grain iterator's position, one small JSON file per
process). Saves are asynchronous and atomic: orbax writes into a temporary directory
and renames it when complete, so a run killed mid-save never leaves a checkpoint that
looks finished. ``wait()`` before exiting.

``run.json`` in the workdir records what the checkpoints are of (model config and
data shape); a restart with a different model in the same workdir stops with a
message instead of mixing runs.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from pvae_jax import fileio

RUN_FILE = "run.json"


class Checkpointer:
    """Saves and restores (train state, data iterator) pairs under ``directory``."""

    def __init__(self, directory: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=options,
            item_names=("state", "data"),
        )

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off device."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        ), force=True)

    def restore(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
        """Restores the newest checkpoint that can be read, or returns None if none exist.

        The data iterator, if given, is restored in place (samplers and evaluation
        pass None and read only the state). A checkpoint that fails to restore is
        reported and left on disk (it is evidence), and the one before it is tried.

        Returns:
          (state, step), or None when the directory holds no checkpoint.

        Raises:
          RuntimeError: checkpoints exist but none could be restored.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if data_iterator is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure means "try the previous one"
                logging.error("checkpoint at step %d in %s could not be restored (%s: %s); "
                              "trying the previous one", step, self.directory,
                              type(e).__name__, e)
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                continue
            return restored.state, step
        if errors:
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored; they are left as "
                "they were. Errors, newest first:\n" + "\n".join(errors))
        return None

    def wait(self) -> None:
        """Blocks until every save in flight is durable on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def check_run_file(workdir: str, run: dict) -> None:
    """Writes ``run`` to ``workdir/run.json``, or checks it equals what is there.

    Raises:
      ValueError: the workdir belongs to a run of another model or data shape.
    """
    path = os.path.join(workdir, RUN_FILE)
    run = json.loads(json.dumps(run))  # Tuples become lists, as they read back.
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != run:
            changed = sorted(k for k in set(previous) | set(run)
                             if previous.get(k) != run.get(k))
            raise ValueError(
                f"workdir {workdir} holds a run of another configuration (differs in "
                f"{', '.join(changed)}: was {[previous.get(k) for k in changed]}, now "
                f"{[run.get(k) for k in changed]}). Use a new --workdir, or restore the "
                f"original config to resume; nothing in the workdir was changed.")
        return
    with fileio.atomic_write(path) as f:
        json.dump(run, f, indent=2, sort_keys=True)
