"""Tests of multi-process training and fault tolerance: two processes on loopback equal
one process on two devices and stop together when one is sent SIGTERM, each process
reads its own shard of the data, SIGTERM stops with a checkpoint, kill -9 at random
points changes nothing, a failing save stops the run.

Runs that must be killed or span processes are subprocesses of launch/main.py (or a
short driver) with timeouts, so a hang fails the test instead of blocking CI. The
uninterrupted reference runs in this process, on the same two virtual CPU devices.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from pvae_jax import checkpointing, data, distributed, train
from pvae_jax.metrics import read_metrics

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 300

# One tiny run for the SIGTERM and kill -9 tests: long enough (log every step, so each
# step waits for the device) to be stopped in the middle, short enough to finish fast.
_RUN = {"num_train_steps": 20, "log_every_steps": 1, "checkpoint_every_steps": 4,
        "keep_checkpoints": 2, "num_image_samples": 0, "eval_batch_size": 500}


def _config(overrides):
    config = tiny.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The test suite's compilation cache (see conftest), so restarts do not recompile.
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"pvae_jax_test_xla_cache_{os.getuid()}")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def _main(workdir, overrides, *flags, cpu_devices=2, **popen_kwargs):
    args = [sys.executable, os.path.join(_ROOT, "launch", "main.py"),
            "--config=" + os.path.join(_ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
            f"--cpu_devices={cpu_devices}", *flags]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return subprocess.Popen(args, cwd=_ROOT, env=_env(), text=True, **popen_kwargs)


def _run_main(workdir, overrides, *flags):
    proc = _main(workdir, overrides, *flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=_TIMEOUT_S)
    return proc.returncode, err


def _wait_for_line(proc, text):
    """Reads the process's stderr until a line contains ``text``; returns all read."""
    lines = []
    deadline = time.time() + _TIMEOUT_S
    for line in proc.stderr:
        lines.append(line)
        if text in line or time.time() > deadline:
            break
    return "".join(lines)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _final_state(workdir, config):
    """The newest checkpoint's state, restored onto this process's two devices."""
    trainer = train.Trainer(config)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 5)
    try:
        state, step = ckpt.restore(trainer.init_state(jax.random.key(0)), None)
    finally:
        ckpt.close()
    return jax.device_get(state), step


def _assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


def _train_records(workdir):
    return [{k: v for k, v in r.items() if k != "train/steps_per_sec"}
            for r in read_metrics(workdir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(workdir, final state) of the uninterrupted _RUN, trained in this process."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    config = _config(_RUN)
    train.train_and_evaluate(config, workdir)
    state, step = _final_state(workdir, config)
    assert step == _RUN["num_train_steps"]
    return workdir, state


def test_cluster_environment_and_bad_arguments(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_")) or name == "JAX_COORDINATOR_ADDRESS":
            monkeypatch.delenv(name)
    assert distributed.cluster_environment() is None
    assert not distributed.initialize()  # Alone: nothing to start.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.cluster_environment() is None  # A batch script, not an srun step.
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    assert distributed.cluster_environment() is None  # One task.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.cluster_environment() == "slurm"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1;tcp://10.0.0.1:1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.cluster_environment() == "openmpi"
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri")
    with pytest.raises(ValueError, match="needs all of coordinator_address"):
        distributed.initialize(coordinator_address="localhost:1234")
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        distributed.initialize(coordinator_address="localhost:1234", num_processes=2,
                               process_id=2)
    with pytest.raises(ValueError, match="contradicts"):
        distributed.initialize("off", num_processes=2)
    with pytest.raises(ValueError, match="not one of"):
        distributed.initialize("slurm")


@pytest.fixture
def python_ctrl_c_handler():
    """Python's own Ctrl-C handler while the test runs, as in a launcher run from a
    terminal: some pytest-xdist workers start with SIGINT ignored, and a stop request
    gives a second signal back to whatever was there before it."""
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, outside)


def test_stop_request_is_seen_at_the_next_poll_and_a_second_signal_is_not_caught(
        python_ctrl_c_handler):
    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P("data"))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with distributed.StopRequest() as stop:
        assert not stop.poll(sharding) and not stop.now(sharding)
        assert not stop.poll(sharding)
        # raise_signal delivers to this (the main) thread and runs the handler before it
        # returns.
        signal.raise_signal(signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        # The handler gave the signal back to the one before it.
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        # Every process reads the combined request one poll later, at the same step.
        assert not stop.poll(sharding)
        assert stop.poll(sharding)
        assert stop.now(sharding)
        with pytest.raises(KeyboardInterrupt):  # A second Ctrl-C interrupts at once.
            signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def test_process_shards_cover_an_epoch_once_and_resume_mid_epoch():
    config = tiny.get_config().data
    num_examples = data.dataset_info(config).num_train
    batch, processes = 200, 2
    steps = num_examples // batch
    assert steps * batch == num_examples

    def indices(iterator, n):
        return [next(iterator)["index"] for _ in range(n)]

    shards = [indices(data.train_iterator(config, batch, seed=3, process_index=p,
                                          process_count=processes), steps)
              for p in range(processes)]
    whole = indices(data.train_iterator(config, batch, seed=3), steps)
    epoch = np.concatenate([np.concatenate(s) for s in shards])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_examples))  # Once each.
    for step in range(steps):  # In process order, the shards are the global batch.
        assert len(shards[0][step]) == len(shards[1][step]) == batch // processes
        np.testing.assert_array_equal(np.concatenate([s[step] for s in shards]), whole[step])

    for p in range(processes):  # Stop mid-epoch, restore into a fresh iterator.
        first = data.train_iterator(config, batch, seed=3, process_index=p,
                                    process_count=processes)
        head = indices(first, 7)
        resumed = data.train_iterator(config, batch, seed=3, process_index=p,
                                      process_count=processes)
        resumed.set_state(first.get_state())
        tail = [next(resumed) for _ in range(steps - 7 + 3)]  # Into the next epoch too.
        reference = data.train_iterator(config, batch, seed=3, process_index=p,
                                        process_count=processes)
        expected = [next(reference) for _ in range(steps + 3)]
        for got, want in zip(head + [b["index"] for b in tail],
                             [b["index"] for b in expected], strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(tail, expected[7:], strict=True):
            np.testing.assert_array_equal(got["image"], want["image"])


def test_two_processes_train_like_one_process_and_stop_together(tmp_path):
    overrides = {"num_train_steps": 40, "log_every_steps": 1, "eval_every_steps": 2,
                 "checkpoint_every_steps": 1000, "num_image_samples": 0,
                 "eval_batch_size": 500}
    workdir, reference = str(tmp_path / "two"), str(tmp_path / "one")
    port = _free_port()
    flags = [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    with open(tmp_path / "process_0.log", "w+") as log_0:
        procs = [_main(workdir, overrides, *flags, "--process_id=0", cpu_devices=1,
                       stdout=subprocess.DEVNULL, stderr=log_0),
                 _main(workdir, overrides, *flags, "--process_id=1", cpu_devices=1,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
        try:
            seen = _wait_for_line(procs[1], "step 2/")
            procs[1].send_signal(signal.SIGTERM)  # Only one process is told to stop.
            errs = [None, seen + procs[1].communicate(timeout=_TIMEOUT_S)[1]]
            procs[0].wait(timeout=_TIMEOUT_S)
        finally:
            for p in procs:
                p.kill()
        log_0.seek(0)
        errs[0] = log_0.read()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "process 1 of 2: 1 local and 2 global devices" in errs[1]
    # Both stopped after the same step, with one checkpoint of it.
    stopped = int(errs[1].split("stopped on SIGTERM at step ")[1].split(";")[0])
    assert f"stopped on another process's stop request at step {stopped};" in errs[0]
    assert 2 < stopped < overrides["num_train_steps"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(stopped)]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", str(stopped), "data"))) \
        == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    # The same steps in one process on two devices: the same state and numbers, each
    # record logged once (by process 0 only).
    config = _config({**overrides, "num_train_steps": stopped})
    train.train_and_evaluate(config, reference)
    (two, two_step), (one, one_step) = _final_state(workdir, config), \
        _final_state(reference, config)
    assert two_step == one_step == stopped
    _assert_same_state(two, one)
    assert _train_records(workdir) == _train_records(reference)
    evals = [[r for r in read_metrics(d) if r["split"] == "eval" and r["step"] < stopped]
             for d in (workdir, reference)]
    assert evals[0] == evals[1] and evals[0][0]["step"] == 2

    # Both continue in this one process: the two-process checkpoint resumes here (state
    # resharded, data position of the shared stream) and stays equal to the other.
    longer = _config({**overrides, "num_train_steps": stopped + 2})
    train.train_and_evaluate(longer, workdir)
    train.train_and_evaluate(longer, reference)
    (two, two_step), (one, one_step) = _final_state(workdir, longer), \
        _final_state(reference, longer)
    assert two_step == one_step == stopped + 2
    _assert_same_state(two, one)
    assert _train_records(workdir) == _train_records(reference)


def test_sigterm_saves_the_step_reached_and_the_resumed_run_is_identical(tmp_path,
                                                                         uninterrupted):
    workdir = str(tmp_path)
    proc = _main(workdir, _RUN, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = _wait_for_line(proc, "step 5/")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=_TIMEOUT_S)
    finally:
        proc.kill()
    err = seen + err
    assert proc.returncode == 0, err[-3000:]
    stopped = int(err.split("stopped on SIGTERM at step ")[1].split(";")[0])
    assert 5 < stopped < _RUN["num_train_steps"]
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 5)
    assert ckpt.latest_step() == stopped  # Complete: committed and listed.
    ckpt.close()
    assert _train_records(workdir)[-1]["step"] == stopped

    returncode, err = _run_main(workdir, _RUN)
    assert returncode == 0, err[-3000:]
    assert f"resumed from step {stopped}" in err
    reference_dir, reference = uninterrupted
    state, _ = _final_state(workdir, _config(_RUN))
    _assert_same_state(state, reference)
    assert _train_records(workdir) == _train_records(reference_dir)


def test_kill_9_at_random_points_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    workdir = str(tmp_path)
    rng = np.random.default_rng(2017)
    total = _RUN["num_train_steps"]
    # Increasing steps, so each restart (from the checkpoint before the last kill)
    # reaches the next one; a fraction of a step later anything may be running: the
    # next step, an async save (every 4 steps), its commit, the deletion of an old one.
    kill_steps = np.sort(rng.choice(np.arange(2, total), size=3, replace=False))
    history = []  # What each start did, to tell a failure's story.
    for step, delay_s in zip(kill_steps, rng.uniform(0.0, 0.05, size=3), strict=True):
        proc = _main(workdir, _RUN, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            seen = _wait_for_line(proc, f"step {step}/{total}")
            time.sleep(delay_s)
            proc.send_signal(signal.SIGKILL)
            seen += proc.communicate(timeout=_TIMEOUT_S)[1]
        finally:
            proc.kill()
        history.append(f"killed at step {step} + {delay_s:.3f} s; rc {proc.returncode}; "
                       f"then on disk: {sorted(os.listdir(os.path.join(workdir, 'checkpoints')))}")
        assert proc.returncode == -signal.SIGKILL, seen[-3000:]  # Killed while running.
    returncode, err = _run_main(workdir, _RUN)
    assert returncode == 0, err[-3000:]
    history.append(next((line for line in err.splitlines() if "resumed from" in line), ""))
    reference_dir, reference = uninterrupted
    state, _ = _final_state(workdir, _config(_RUN))
    try:
        _assert_same_state(state, reference)
        assert _train_records(workdir) == _train_records(reference_dir)
    except AssertionError as e:
        raise AssertionError("\n".join(history)) from e


# Fills the "disk" from the second checkpoint on: files may grow to 20 kB, less than a
# checkpoint needs (a real full disk fails the same write with ENOSPC instead of EFBIG).
_DISK_FULL_DRIVER = """
import resource, signal, sys
from pvae_jax import checkpointing, runtime, train
from configs import tiny

save = checkpointing.Checkpointer.save

def save_on_a_full_disk(self, step, *args):
    if step > 3:
        self.wait()  # Step 3 is complete; the disk fills after it.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    return save(self, step, *args)

checkpointing.Checkpointer.save = save_on_a_full_disk
config = tiny.get_config()
# Keep one checkpoint: step 3 must outlive the failed save that would replace it.
config.update_from_flattened_dict({"num_train_steps": 12, "log_every_steps": 1,
                                   "checkpoint_every_steps": 3, "keep_checkpoints": 1,
                                   "num_image_samples": 0})
runtime.use_cpu_cores_as_devices(2)
try:
    train.train_and_evaluate(config, sys.argv[1])
except checkpointing.CheckpointError as e:
    # On stdout, in one write: orbax's failing threads interleave their tracebacks on
    # stderr.
    sys.stdout.write(f"{type(e).__name__}: {e}\\n")
    sys.stdout.flush()
    sys.exit(1)
"""


def test_a_failing_save_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL_DRIVER, workdir], cwd=_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.startswith("CheckpointError: saving the checkpoint of step 6 in")
    assert "File too large" in proc.stdout, proc.stdout
    assert "The last complete checkpoint, step 3, is kept" in proc.stdout
    # It stopped by the next save (step 9) at the latest instead of training on unsaved.
    assert _train_records(workdir)[-1]["step"] <= 9
    config = _config({"num_train_steps": 12})
    _, step = _final_state(workdir, config)
    assert step == 3
