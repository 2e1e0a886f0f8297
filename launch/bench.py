"""Measures one configuration's compile time, train/eval throughput and memory as JSON.

  python launch/bench.py --config=configs/mnist.py:gated_noup --output=bench.json
  python launch/bench.py --config=configs/mnist.py:gated_noup,offline \
      --output=/tmp/bench.json --num_steps=20 --config.batch_size=50

  python launch/bench.py --config=configs/mnist.py:gated_noup,offline --sampling \
      --output=/tmp/sampling.json --num_samples=64

Writes --output atomically and prints the same JSON. Keys: see bench.run_benchmark,
or with --sampling bench.run_sampling_benchmark (fast vs reference sampler vs one
forward pass).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from pvae_jax import bench, fileio, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Path of the JSON file to write.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 50, "Timed train steps.")
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", 5, "Untimed train steps after the compiling one.")
_NUM_EVAL_BATCHES = flags.DEFINE_integer(
    "num_eval_batches", 5, "Timed eval batches after the compiling one.")
_SAMPLING = flags.DEFINE_bool(
    "sampling", False, "Time the samplers instead of training and evaluation.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Images per sampler call.")
_REFERENCE_SAMPLES = flags.DEFINE_integer(
    "reference_samples", None, "Time the reference sampler on fewer images and scale.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    name = config_flags.get_config_filename(flags.FLAGS["config"])

    def run():
        if _SAMPLING.value:
            return bench.run_sampling_benchmark(
                _CONFIG.value, num_samples=_NUM_SAMPLES.value,
                reference_samples=_REFERENCE_SAMPLES.value, config_name=name)
        return bench.run_benchmark(
            _CONFIG.value, num_steps=_NUM_STEPS.value, warmup_steps=_WARMUP_STEPS.value,
            num_eval_batches=_NUM_EVAL_BATCHES.value, config_name=name)

    result = runtime.run_launcher(run, _CPU_DEVICES.value)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    with fileio.atomic_write(_OUTPUT.value) as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    app.run(main)
