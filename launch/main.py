"""Trains and evaluates one configuration, resuming whatever the workdir holds.

  python launch/main.py --config=configs/quickstart.py --workdir=runs/quickstart
  python launch/main.py --config=configs/mnist.py:gated_noup --workdir=runs/mnist

Writes metrics.jsonl, TensorBoard events, checkpoints and PNG grids to --workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from pvae_jax import runtime, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.run_launcher(lambda: train.train_and_evaluate(_CONFIG.value, _WORKDIR.value),
                         _CPU_DEVICES.value)


if __name__ == "__main__":
    app.run(main)
