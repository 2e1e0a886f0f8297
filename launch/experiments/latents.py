"""Paper Fig. 5 and section 4.1.3: a VAE and a PixelVAE with 2-D latents, their test
latents coloured by class, and k-nearest-neighbour test errors on the latents.
Trains (or reuses) both runs under --workdir_root, then writes fig5.png, fig5.json,
fig5.md.

  python launch/experiments/latents.py --config=configs/mnist.py:pixelvae \
      --workdir_root=runs/fig5 --results_dir=results/fig5

Every field of --config is used as given, except model.name (the baseline, then the
config's model) and model.latent_dim.
"""

from absl import app, flags
from ml_collections import config_flags

from pvae_jax import experiments, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file[:variant].",
                                          lock_config=True)
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "One workdir per run under here.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where the plot and tables go.")
_LATENT_DIM = flags.DEFINE_integer("latent_dim", 2, "Size of z (the scatter needs 2).")
_KNN_K = flags.DEFINE_list("knn_k", ["1", "5", "10"], "Neighbour counts of the classifier.")
_BASELINE = flags.DEFINE_string("baseline", "vae", "Model compared with the config's.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Virtual CPU devices on a CPU-only host (default: one per core).")
flags.mark_flags_as_required(["config", "workdir_root", "results_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.run_launcher(lambda: experiments.latent_space(
        _CONFIG.value, _WORKDIR_ROOT.value, _RESULTS_DIR.value, latent_dim=_LATENT_DIM.value,
        knn_k=[int(k) for k in _KNN_K.value], baseline=_BASELINE.value), _CPU_DEVICES.value)


if __name__ == "__main__":
    runtime.reexec_with_malloc_tuning()
    app.run(main)
