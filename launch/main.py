"""Trains and evaluates one configuration, resuming whatever the workdir holds.

  python launch/main.py --config=configs/quickstart.py --workdir=runs/quickstart
  python launch/main.py --config=configs/mnist.py:gated_noup --workdir=runs/mnist

Writes metrics.jsonl, TensorBoard events, checkpoints and PNG grids to --workdir.
Under srun or mpirun with several tasks every process runs this same command; see
docs/cluster.md. SIGTERM or Ctrl-C stops after the current step with a checkpoint
(exit status 0); running the command again resumes.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from pvae_jax import distributed, runtime, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES,
    "Start JAX's distributed runtime: 'auto' under srun/mpirun with several tasks, with "
    "JAX_COORDINATOR_ADDRESS set, or when the three flags below are given; 'on' always "
    "(JAX detects TPU pods, Kubernetes); 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


def _run():
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
    try:
        return train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except distributed.Preempted as e:
        logging.warning("%s", e)  # Not an error: exit status 0, and a rerun resumes.
        return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.run_launcher(_run, _CPU_DEVICES.value)


if __name__ == "__main__":
    runtime.reexec_with_malloc_tuning()
    app.run(main)
