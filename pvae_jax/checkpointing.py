"""Checkpoints of the train state and the data position, with orbax.

One checkpoint holds two items: ``state`` (the train state pytree: params, optimiser,
EMA, step, rng) and ``data`` (the grain iterator's position, one small JSON file per
process). Every process takes part in a save. Saves are asynchronous and atomic: orbax
writes into a temporary directory and renames it when complete, so a run killed
mid-save never leaves a checkpoint that looks finished (the temporary directory is
removed on the next start). ``wait()`` before exiting.

What goes wrong, and what happens:

- A save fails (disk full, quota, permissions): the next ``save``/``check``/``wait``
  raises ``CheckpointError`` naming the failed step and the last complete one, which
  orbax has not deleted (old checkpoints go only after a new one is complete).
- The newest checkpoint cannot be read (truncated, corrupt): restore logs its step and
  the reason and falls back to the one before. Training moves it to
  ``<directory>_unreadable/<step>`` (it is evidence, and its step will be saved again).
  If none can be read, nothing is moved and ``CheckpointError`` says why for each.

``run.json`` in the workdir records what the checkpoints are of (model config and
data shape); a restart with a different model in the same workdir stops with a
message instead of mixing runs.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from pvae_jax import fileio

RUN_FILE = "run.json"
# Beside the checkpoint directory: checkpoints that could not be restored, moved out of
# the way of new saves of the same step and kept for inspection.
UNREADABLE_SUFFIX = "_unreadable"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none of those on disk could be read."""


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    # Storage errors repeat long paths and end with the OS's reason ("File too large",
    # "No space left on device"): keep the head and that tail.
    if len(text) > 400:
        text = f"{text[:150]} ... {text[-240:]}"
    return f"{type(e).__name__}: {text}"


class Checkpointer:
    """Saves and restores (train state, data iterator) pairs under ``directory``.

    A failed save is reported as a ``CheckpointError`` by the next ``save``,
    ``check`` or ``wait``, naming the step that failed and the last complete one,
    which is never deleted for it (orbax removes old checkpoints only after a new one
    is complete).
    """

    def __init__(self, directory: str, keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # Half-written saves of a killed run: never restorable, only taking space.
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=options,
            item_names=("state", "data"),
        )
        self._pending: int | None = None  # The step of a save in flight.
        self._failed = False
        self._complete = self._manager.latest_step()

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    @property
    def unreadable_directory(self) -> str:
        return self.directory + UNREADABLE_SUFFIX

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    @property
    def complete_step(self) -> int | None:
        """The newest step known to be durable on disk (or restored from it)."""
        return self._complete

    @property
    def saved_step(self) -> int | None:
        """The step of the newest save started, complete or not."""
        return self._pending if self._pending is not None else self._complete

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off device.

        Raises:
          CheckpointError: this save, or the one before it, failed.
        """
        self.wait()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ), force=True)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, quota, ...
            raise self._save_failed(step, e) from e
        self._pending = step

    def check(self) -> None:
        """Raises ``CheckpointError`` as soon as a save in flight has failed; cheap."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until every save in flight is durable on disk.

        Raises:
          CheckpointError: the save in flight failed.
        """
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(step, e) from e
        self._complete = step

    def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
        self._failed = True
        kept = (f"The last complete checkpoint, step {self._complete}, is kept; run the "
                f"same command again to resume from it" if self._complete is not None
                else "No complete checkpoint exists yet; run the same command again to "
                "start over")
        return CheckpointError(
            f"saving the checkpoint of step {step} in {self.directory} failed "
            f"({_reason(e)}), so training stopped. {kept}, once the disk has space "
            "again (or the directory is writable).")

    def restore(self, abstract_state: Any, data_iterator: Any, *,
                set_aside_unreadable: bool = False) -> tuple[Any, int] | None:
        """Restores the newest checkpoint that can be read, or returns None if none exist.

        The data iterator, if given, is restored in place (samplers and evaluation
        pass None and read only the state). A checkpoint that fails to restore is
        reported with its step and the reason, and the one before it is tried. It is
        never deleted: with ``set_aside_unreadable`` (training, which will save that
        step again) it is moved to ``unreadable_directory``, otherwise left in place.

        Returns:
          (state, step), or None when the directory holds no checkpoint.

        Raises:
          CheckpointError: checkpoints exist but none could be restored (then all are
            left where they are), or processes restored different steps.
        """
        errors = []
        restored = None
        for step in reversed(self.all_steps()):
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                same_processes = data_iterator is not None and os.path.exists(
                    self._data_file(step, jax.process_index(), jax.process_count()))
                if same_processes:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
                if data_iterator is not None and not same_processes:
                    self._restore_data_of_other_process_count(step, data_iterator)
            except Exception as e:  # noqa: BLE001 - any failure means "try the previous one"
                logging.error("the checkpoint of step %d in %s cannot be restored (%s); "
                              "falling back to the one before it", step, self.directory,
                              _reason(e))
                errors.append((step, _reason(e)))
                continue
            restored = (restored.state, step)
            break
        if restored is None and errors:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored; all are left as "
                "they were. Errors, newest first:\n" +
                "\n".join(f"step {s}: {r}" for s, r in errors))
        _check_same_on_all_processes(-1 if restored is None else restored[1])
        if errors and set_aside_unreadable:
            self._set_aside([s for s, _ in errors])
        if restored is not None:
            self._complete = restored[1]
        return restored

    def _data_file(self, step: int, index: int | str, count: int | str) -> str:
        # grain's own name for a process's iterator state in a checkpoint.
        return os.path.join(self.directory, str(step), "data",
                            f"process_{index}-of-{count}.json")

    def _restore_data_of_other_process_count(self, step: int, data_iterator: Any) -> None:
        """Resumes the data of a checkpoint written by another number of processes.

        Every process iterates the same global batch stream and reads its own slice,
        so all processes save the same position, and any process may resume from
        process 0's (with the same global batch size and worker count).
        """
        written = glob.glob(self._data_file(step, 0, "*"))
        if not written:
            raise FileNotFoundError(f"no data position (process_0-of-N.json) in {self.directory}/"
                                    f"{step}/data")
        with open(written[0]) as f:
            data_iterator.set_state(json.load(f))
        logging.warning("the checkpoint of step %d was written by another number of "
                        "processes (%s); this run has %d and resumes the same global batch "
                        "stream", step, os.path.basename(written[0]), jax.process_count())

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            os.makedirs(self.unreadable_directory, exist_ok=True)
            for step in steps:
                target = os.path.join(self.unreadable_directory, str(step))
                n = 1
                while os.path.exists(target):
                    target = os.path.join(self.unreadable_directory, f"{step}.{n}")
                    n += 1
                os.rename(os.path.join(self.directory, str(step)), target)
                logging.warning("moved the unreadable checkpoint of step %d to %s, where it "
                                "is kept for inspection", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("pvae_jax:set_aside_unreadable")
        self._manager.reload()

    def close(self) -> None:
        """Waits for saves in flight (see ``wait``) and releases the manager."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001
                if not self._failed:  # A failure already reported is not raised twice.
                    raise


def _check_same_on_all_processes(step: int) -> None:
    if jax.process_count() == 1:
        return
    steps = np.asarray(multihost_utils.process_allgather(np.int32(step)))
    if np.any(steps != step):
        raise CheckpointError(
            f"the processes restored different checkpoints (steps {steps.tolist()}, -1 "
            "for none): their view of the checkpoint directory differs. Checkpoints must "
            "be on a file system every process sees the same way.")


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
