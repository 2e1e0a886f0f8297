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


def _truncate_largest_file(directory):
    """Cuts the largest file of a checkpoint item in half, as a disk-full write or a
    copy interrupted half way leaves it; returns its path and remaining bytes."""
    files = [os.path.join(root, name) for root, _, names in os.walk(directory)
             for name in names]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with open(path, "rb") as f:
        return path, f.read()


def test_truncated_newest_checkpoint_falls_back_with_a_message_and_is_kept(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    _save_steps(str(directory), [2, 5])
    path, contents = _truncate_largest_file(directory / "5" / "state")
    ckpt = checkpointing.Checkpointer(str(directory), keep=5)
    it = _iterator()
    state, step = ckpt.restore(_state(0), it)
    assert step == 2 and int(state["step"]) == 2
    assert next(it) == 2
    assert "checkpoint of step 5" in caplog.text and "cannot be restored" in caplog.text
    assert (directory / "5").exists()  # Without set_aside_unreadable (samplers), untouched.
    ckpt.close()


def test_training_sets_an_unreadable_checkpoint_aside_and_can_save_its_step_again(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(str(directory), [2, 5])
    path, contents = _truncate_largest_file(directory / "5" / "state")
    ckpt = checkpointing.Checkpointer(str(directory), keep=5)
    it = _iterator()
    _, step = ckpt.restore(_state(0), it, set_aside_unreadable=True)
    assert step == 2 and ckpt.all_steps() == [2]
    # The evidence is moved, byte for byte, out of the way of the new step 5.
    moved = os.path.join(ckpt.unreadable_directory, "5",
                         os.path.relpath(path, directory / "5"))
    assert ckpt.unreadable_directory == str(tmp_path / "checkpoints_unreadable")
    with open(moved, "rb") as f:
        assert f.read() == contents
    for _ in range(3):
        next(it)
    ckpt.save(5, _state(5), it)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5] and ckpt.complete_step == 5
    state, step = ckpt.restore(_state(0), _iterator())
    assert step == 5 and int(state["step"]) == 5
    ckpt.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _save_steps(str(tmp_path), [3])
    for root, _, files in os.walk(tmp_path / "3" / "state"):
        for name in files:
            os.remove(os.path.join(root, name))
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=5)
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint .* could be "
                       "restored; all are left as they were"):
        ckpt.restore(_state(0), _iterator(), set_aside_unreadable=True)
    assert ckpt.all_steps() == [3]


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


def test_data_position_of_another_process_count_is_resumed(tmp_path):
    # Every process saves the same position of the shared global stream; a run on
    # another number of processes resumes from process 0's.
    _save_steps(str(tmp_path), [4])
    data_dir = tmp_path / "4" / "data"
    position = (data_dir / "process_0-of-1.json").read_text()
    (data_dir / "process_0-of-1.json").unlink()
    for p in range(4):
        (data_dir / f"process_{p}-of-4.json").write_text(position)
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=5)
    it = _iterator()
    state, step = ckpt.restore(_state(0), it)
    assert step == 4 and int(state["step"]) == 4
    assert next(it) == 4
    ckpt.close()
