"""Measures one configuration's compile time, speed, memory or FLOPs as JSON.

  python launch/bench.py --config=configs/mnist.py:gated_noup,offline --train \
      --output=/tmp/bench.json --num_steps=50
  python launch/bench.py --config=configs/mnist.py:gated_noup,offline --sampling \
      --output=/tmp/sampling.json --num_samples=64
  python launch/bench.py --config=configs/imagenet64.py --flops --output=/tmp/flops.json
  python launch/bench.py --config=configs/mnist.py:gated_noup,offline --iwae \
      --output=/tmp/iwae.json
  python launch/bench.py --pyramid_vs_single --image_size=32 --num_samples=4 \
      --output=/tmp/pyramid.json

--train (the default mode) times train and eval steps on real data: see
bench.run_benchmark for the keys. --sampling times the fast and reference samplers and
one forward pass (bench.run_sampling_benchmark). --flops reports the forward FLOPs per
image from XLA's cost analysis of the compiled forward, without data or training
(bench.run_flops). --iwae times the importance-weighted NLL against a forward pass on
the same decoder batch and measures its memory at 5,000 samples
(evaluation.benchmark_iwae). --pyramid_vs_single times sampling a Pyramid PixelCNN
against a single-scale PixelCNN++ of as many parameters at the same output size
(sampling_auxiliary.sampling_speed; it needs no --config). Writes --output atomically
and prints the same JSON.

On Linux with glibc the script restarts itself once with tuned malloc settings
(runtime.MALLOC_ENV: transparent huge pages for XLA:CPU's per-step buffers, one
arena) and, where a C++ compiler builds it, the block cache of pvae_jax/big_blocks.cc
preloaded, which keeps those buffers mapped from step to step; PVAE_JAX_MALLOC_TUNING=0,
or GLIBC_TUNABLES or any MALLOC_* variable of your own, keeps the allocator's defaults
(an LD_PRELOAD of your own keeps the settings but not the block cache).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from pvae_jax import bench, evaluation, fileio, runtime, sampling_auxiliary

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
_IWAE = flags.DEFINE_bool(
    "iwae", False, "Time the importance-weighted NLL against a plain forward pass.")
_IWAE_SAMPLES = flags.DEFINE_integer("iwae_samples", 100, "Importance samples per image.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 25, "Importance samples per chunk.")
_PYRAMID = flags.DEFINE_bool(
    "pyramid_vs_single", False, "Time a Pyramid PixelCNN's sampling against a PixelCNN++.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Output side for --pyramid_vs_single.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Images per sampler call.")
_REFERENCE_SAMPLES = flags.DEFINE_integer(
    "reference_samples", None, "Time the reference sampler on fewer images and scale.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    modes = [m for m, on in (("--train", _TRAIN.value), ("--sampling", _SAMPLING.value),
                             ("--flops", _FLOPS.value), ("--iwae", _IWAE.value),
                             ("--pyramid_vs_single", _PYRAMID.value)) if on]
    if len(modes) > 1:
        raise app.UsageError(f"pick one of --train, --sampling, --flops, --iwae, "
                             f"--pyramid_vs_single; got {modes}")
    if _CONFIG.value is None and not _PYRAMID.value:
        raise app.UsageError("--config is required (except with --pyramid_vs_single)")
    name = None if _PYRAMID.value else config_flags.get_config_filename(flags.FLAGS["config"])

    def run():
        if _PYRAMID.value:
            return sampling_auxiliary.sampling_speed(image_size=_IMAGE_SIZE.value,
                                                     num_samples=_NUM_SAMPLES.value)
        if _IWAE.value:
            return evaluation.benchmark_iwae(_CONFIG.value, num_samples=_IWAE_SAMPLES.value,
                                             chunk_size=_CHUNK_SIZE.value)
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
