"""Draws a grid of samples from the newest checkpoint of a training run (EMA parameters).

  python launch/sample.py --config=configs/mnist.py:gated_noup --workdir=runs/mnist \
      --num_samples=64 --temperature=1.0 --vary=none --output=samples.png

--vary picks what changes across the grid (PixelVAE paper, Fig. 6):
  none    independent samples: every level and the pixel noise vary;
  top     only the top level's latents vary; the noise of the levels below and of
          the pixels is the same for every image;
  middle  the top level is held and the level below it varies, with the same pixel
          noise (hierarchical models);
  pixel   one draw of every latent level for the whole grid, only the pixel noise varies.
'top' and 'pixel' need a model with latents, 'middle' a hierarchical one.
"""

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pvae_jax import runtime, sampling, train, viz

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant] of the run.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run (holds checkpoints/).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Images in the grid.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
_METHOD = flags.DEFINE_enum("method", "fast", sampling.METHODS, "Sampler.")
_VARY = flags.DEFINE_string("vary", "none",
                            f"What varies across the grid: one of {sampling.GRID_VARY}.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling key.")
_OUTPUT = flags.DEFINE_string("output", "samples.png", "Path of the PNG grid to write.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def run():
        sampling.check_vary(_VARY.value)  # Before the slow restore.
        trainer, variables = train.load_for_sampling(_CONFIG.value, _WORKDIR.value)
        images = sampling.sample_grid(
            trainer.model, variables, jax.random.key(_SEED.value), _NUM_SAMPLES.value,
            temperature=_TEMPERATURE.value, method=_METHOD.value, vary=_VARY.value)
        viz.save_png(_OUTPUT.value, viz.image_grid(np.asarray(images), trainer.info.num_levels))
        print(_OUTPUT.value)

    runtime.run_launcher(run, _CPU_DEVICES.value)


if __name__ == "__main__":
    runtime.reexec_with_malloc_tuning()
    app.run(main)
