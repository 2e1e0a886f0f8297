"""Measures one configuration's compile time, speed, memory or FLOPs as JSON.

  python launch/bench.py --config=configs/mnist.py:gated_noup,offline --train \
      --output=/tmp/bench.json --num_steps=50
  python launch/bench.py --config=configs/mnist.py:gated_noup,offline --sampling \
      --output=/tmp/sampling.json --num_samples=64
  python launch/bench.py --config=configs/imagenet64.py --flops --output=/tmp/flops.json

--train (the default mode) times train and eval steps on real data: see
bench.run_benchmark for the keys. --sampling times the fast and reference samplers and
one forward pass (bench.run_sampling_benchmark). --flops reports the forward FLOPs per
image from XLA's cost analysis of the compiled forward, without data or training
(bench.run_flops). Writes --output atomically and prints the same JSON.

On Linux with glibc the script restarts itself once with tuned malloc settings
(runtime.MALLOC_ENV: transparent huge pages for XLA:CPU's per-step buffers, one
arena); PVAE_JAX_MALLOC_TUNING=0, or GLIBC_TUNABLES or any MALLOC_* variable of your
own, keeps the allocator's defaults.
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
_TRAIN = flags.DEFINE_bool(
    "train", False, "Time training and evaluation (the default when no mode is given).")
_SAMPLING = flags.DEFINE_bool(
    "sampling", False, "Time the samplers instead of training and evaluation.")
_FLOPS = flags.DEFINE_bool(
    "flops", False, "Report forward FLOPs per image from XLA's cost analysis only.")
_FLOPS_BATCH = flags.DEFINE_integer(
    "flops_batch_size", 8, "Batch of the forward compiled for --flops.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Images per sampler call.")
_REFERENCE_SAMPLES = flags.DEFINE_integer(
    "reference_samples", None, "Time the reference sampler on fewer images and scale.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    modes = [m for m, on in (("--train", _TRAIN.value), ("--sampling", _SAMPLING.value),
                             ("--flops", _FLOPS.value)) if on]
    if len(modes) > 1:
        raise app.UsageError(f"pick one of --train, --sampling, --flops; got {modes}")
    name = config_flags.get_config_filename(flags.FLAGS["config"])

    def run():
        if _FLOPS.value:
            return bench.run_flops(_CONFIG.value, batch_size=_FLOPS_BATCH.value,
                                   config_name=name)
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
    runtime.reexec_with_malloc_tuning()
    app.run(main)
