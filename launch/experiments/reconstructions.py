"""Paper Figs. 8 and 10: eval images, each followed by decodings of a z ~ q(z|x).

  python launch/experiments/reconstructions.py --config=configs/mnist.py:gated_noup \
      --workdir=runs/mnist --output=results/reconstructions.png --num_per_image=5

Row i: eval image i, then --num_per_image reconstructions, each with its own z and
pixel noise (the newest checkpoint's EMA parameters).
"""

from absl import app, flags
from ml_collections import config_flags

from pvae_jax import experiments, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant] of the run.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run (holds checkpoints/).")
_OUTPUT = flags.DEFINE_string("output", "reconstructions.png", "PNG path.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 16, "Eval images (rows).")
_NUM_PER_IMAGE = flags.DEFINE_integer("num_per_image", 5, "Reconstructions per image.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Pixel sampling temperature.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the latent and pixel draws.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.run_launcher(lambda: print(experiments.reconstructions(
        _CONFIG.value, _WORKDIR.value, _OUTPUT.value, num_images=_NUM_IMAGES.value,
        num_per_image=_NUM_PER_IMAGE.value, seed=_SEED.value,
        temperature=_TEMPERATURE.value)), _CPU_DEVICES.value)


if __name__ == "__main__":
    runtime.reexec_with_malloc_tuning()
    app.run(main)
