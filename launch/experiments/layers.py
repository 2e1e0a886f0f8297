"""Paper Fig. 4: NLL against the number of PixelCNN layers, with the PixelVAE's
recon/KL split and an IWAE-vs-bound table. Trains (or reuses) one run per model and
layer count under --workdir_root, then writes fig4.png, fig4.json, fig4.md.

  python launch/experiments/layers.py --config=configs/mnist.py:pixelvae \
      --workdir_root=runs/fig4 --results_dir=results/fig4 --layers=0,1,2,4,8

Every field of --config is used as given (override with --config.<field>=...), except
model.name (the config's latent model, then its PixelCNN) and model.num_pixel_layers.
"""

from absl import app, flags
from ml_collections import config_flags

from pvae_jax import evaluation, experiments, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file[:variant].",
                                          lock_config=True)
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "One workdir per run under here.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where the plot and tables go.")
_LAYERS = flags.DEFINE_list("layers", ["0", "1", "2", "4", "8"], "PixelCNN layer counts.")
_IWAE_SAMPLES = flags.DEFINE_list("iwae_samples", ["1", "10", "100", "1000"],
                                  "Importance sample counts per image (one IWAE NLL each).")
_IWAE_IMAGES = flags.DEFINE_integer("iwae_images", 100, "Eval images for the IWAE table.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", evaluation.DEFAULT_CHUNK_SIZE,
                                   "Importance samples per jitted call.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "workdir_root", "results_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.run_launcher(lambda: experiments.layers_sweep(
        _CONFIG.value, _WORKDIR_ROOT.value, _RESULTS_DIR.value,
        layers=[int(n) for n in _LAYERS.value], iwae_samples=[int(s) for s in _IWAE_SAMPLES.value],
        iwae_images=_IWAE_IMAGES.value, chunk_size=_CHUNK_SIZE.value), _CPU_DEVICES.value)


if __name__ == "__main__":
    runtime.reexec_with_malloc_tuning()
    app.run(main)
