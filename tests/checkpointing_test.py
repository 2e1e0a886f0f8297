"""Tests of checkpoint save/restore, fallback past a corrupt checkpoint, and run files."""

import json
import os

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from pvae_jax import checkpointing


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _state(value):
    return {"w": jnp.full((3, 2), value, jnp.float32), "step": jnp.int32(value)}


def _save_steps(directory, steps):
    ckpt = checkpointing.Checkpointer(directory, keep=5)
    it, consumed = _iterator(), 0
    for step in steps:  # The data position at step s is s examples in.
        while consumed < step:
            next(it)
            consumed += 1
        ckpt.save(step, _state(step), it)
    ckpt.wait()
    ckpt.close()


def test_restore_returns_newest_state_and_data_position(tmp_path):
    _save_steps(str(tmp_path), [2, 5])
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=5)
    it = _iterator()
    state, step = ckpt.restore(_state(0), it)
    assert step == 5 and int(state["step"]) == 5
    np.testing.assert_array_equal(state["w"], 5.0)
    assert next(it) == 5  # Five examples were consumed before the save.
    state_only, step_only = ckpt.restore(_state(0), data_iterator=None)  # As samplers do.
    assert step_only == 5
    np.testing.assert_array_equal(state_only["w"], 5.0)


def test_empty_directory_restores_nothing(tmp_path):
    assert checkpointing.Checkpointer(str(tmp_path), keep=2).restore(_state(0), _iterator()) \
        is None


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(tmp_path):
    _save_steps(str(tmp_path), [2, 5])
    state_dir = tmp_path / "5" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage")
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=5)
    it = _iterator()
    state, step = ckpt.restore(_state(0), it)
    assert step == 2 and int(state["step"]) == 2
    assert next(it) == 2
    assert (tmp_path / "5").exists()  # The evidence stays.


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _save_steps(str(tmp_path), [3])
    for root, _, files in os.walk(tmp_path / "3" / "state"):
        for name in files:
            os.remove(os.path.join(root, name))
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=5)
    with pytest.raises(RuntimeError, match="no checkpoint .* could be restored"):
        ckpt.restore(_state(0), _iterator())


def test_run_file_is_written_once_and_guards_the_workdir(tmp_path):
    run = {"model": {"name": "gated_noup", "latent_dim": 16}, "image_shape": (28, 28, 1)}
    checkpointing.check_run_file(str(tmp_path), run)
    checkpointing.check_run_file(str(tmp_path), run)  # The same run may resume.
    on_disk = json.loads((tmp_path / checkpointing.RUN_FILE).read_text())
    assert on_disk["image_shape"] == [28, 28, 1]
    other = {**run, "model": {"name": "pixelcnn", "latent_dim": 16}}
    with pytest.raises(ValueError, match="differs in model"):
        checkpointing.check_run_file(str(tmp_path), other)
    assert json.loads((tmp_path / checkpointing.RUN_FILE).read_text()) == on_disk
