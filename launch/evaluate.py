"""Evaluates the newest checkpoint of a run (EMA parameters) on its eval split.

  python launch/evaluate.py --config=configs/mnist.py:gated_noup --workdir=runs/mnist \
      --iwae_samples=5000 --output=runs/mnist/eval.json

Reports the NLL bound (the true ELBO: KL weight 1, whatever warm-up the run used),
its reconstruction/KL split per latent level, and the importance-weighted NLL of
Burda et al. with --iwae_samples samples per image (the PixelVAE paper uses 5000;
0 skips it), in nats and bits/dim. Prints a table and writes the JSON to --output
(default <workdir>/evaluation.json). The IWAE NLL costs --iwae_samples decoder
passes per image: --num_images evaluates the first images of the split only.
"""

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from pvae_jax import evaluation, fileio, runtime, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant] of the run.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run (holds checkpoints/).")
_IWAE_SAMPLES = flags.DEFINE_list(
    "iwae_samples", [str(evaluation.PAPER_NUM_SAMPLES)],
    "Importance samples per image; several give one IWAE NLL each (0: none).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", evaluation.DEFAULT_CHUNK_SIZE,
                                   "Importance samples per jitted call.")
_IWAE_BATCH_SIZE = flags.DEFINE_integer(
    "iwae_batch_size", 10, "Images per IWAE call; the decoder sees this times --chunk_size.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", -1, "First images of the split (-1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluation key.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default <workdir>/evaluation.json).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def run():
        trainer, variables = train.load_for_sampling(_CONFIG.value, _WORKDIR.value)
        result = evaluation.evaluate(
            trainer, variables, jax.random.key(_SEED.value),
            iwae_samples=[int(s) for s in _IWAE_SAMPLES.value], chunk_size=_CHUNK_SIZE.value,
            iwae_batch_size=_IWAE_BATCH_SIZE.value, num_images=_NUM_IMAGES.value)
        output = _OUTPUT.value or os.path.join(_WORKDIR.value, "evaluation.json")
        with fileio.atomic_write(output) as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(evaluation.format_table(result))
        print(output)

    runtime.run_launcher(run, _CPU_DEVICES.value)


if __name__ == "__main__":
    runtime.reexec_with_malloc_tuning()
    app.run(main)
