"""Draws a grid of samples from the newest checkpoint of a training run (EMA parameters).

  python launch/sample.py --config=configs/mnist.py:gated_noup --workdir=runs/mnist \
      --num_samples=64 --temperature=1.0 --vary=none --output=samples.png

--vary picks what changes across the grid (PixelVAE paper, Fig. 6):
  none   independent samples: latents and pixel noise both vary;
  top    the latents vary, every image gets the same pixel noise;
  pixel  one latent draw for the whole grid, only the pixel noise varies.
'top' and 'pixel' need a model with latents.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pvae_jax import checkpointing, data, runtime, sampling, train, viz

VARY = ("none", "top", "pixel")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant] of the run.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run (holds checkpoints/).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Images in the grid.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
_METHOD = flags.DEFINE_enum("method", "fast", sampling.METHODS, "Sampler.")
_VARY = flags.DEFINE_string("vary", "none", f"What varies across the grid: one of {VARY}.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling key.")
_OUTPUT = flags.DEFINE_string("output", "samples.png", "Path of the PNG grid to write.")
flags.mark_flags_as_required(["config", "workdir"])


def _check_run(workdir, config):
    """Stops if the workdir's run.json records another model than --config's."""
    path = os.path.join(workdir, checkpointing.RUN_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        recorded = json.load(f).get("model")
    wanted = json.loads(json.dumps(config.model.to_dict()))
    if recorded is not None and recorded != wanted:
        raise ValueError(f"{workdir} holds a run of another model ({path}: {recorded}); pass "
                         f"the --config it was trained with")


def restore_variables(config, workdir):
    """(trainer, variables with the EMA parameters) of the newest readable checkpoint."""
    trainer = train.Trainer(config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}; train first with "
                                f"launch/main.py --workdir={workdir}")
    _check_run(workdir, config)
    # The restore fills the data iterator too; sampling ignores it.
    data_iter = data.train_iterator(config.data, config.batch_size, seed=config.seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(), worker_count=0)
    ckpt = checkpointing.Checkpointer(ckpt_dir, config.keep_checkpoints)
    try:
        restored = ckpt.restore(trainer.init_state(jax.random.key(0)), data_iter)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}; train first with "
                                f"launch/main.py --workdir={workdir}")
    state, step = restored
    logging.info("restored step %d from %s", step, ckpt_dir)
    return trainer, {"params": state.ema_params, **state.model_state}


def draw(model, variables, key, num_samples, *, temperature, method, vary):
    """``num_samples`` images, ``vary`` choosing what changes across them (see above)."""
    if vary == "middle":
        raise ValueError("--vary=middle needs a hierarchical model with a middle level of "
                         f"latents, which this version does not have; use one of {VARY}")
    if vary not in VARY:
        raise ValueError(f"--vary must be one of {VARY}, got {vary!r}")
    if vary == "none":
        return sampling.sample(model, variables, key, num_samples, temperature=temperature,
                               method=method)

    def prior(n, k):
        return model.apply(variables, n, temperature, method="prior_sample",
                           rngs={"sample": k})

    if jax.eval_shape(lambda k: prior(1, k), key) is None:
        raise ValueError(f"--vary={vary} needs a model with latents; "
                         f"{type(model).__name__} has none, use --vary=none")
    latent_key, pixel_key = jax.random.split(key)
    if vary == "pixel":
        z = jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), prior(1, latent_key))
        return sampling.sample(model, variables, pixel_key, num_samples,
                               temperature=temperature, fixed={"latents": z}, method=method)
    # 'top': one image per latent draw, each with the same key, hence the same pixel noise.
    z = prior(num_samples, latent_key)

    def one(z_1):
        return sampling.sample(model, variables, pixel_key, 1, temperature=temperature,
                               fixed={"latents": z_1}, method=method)[0]

    return jax.vmap(one)(jax.tree.map(lambda a: a[:, None], z))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.quiet_library_logs()
    try:
        if _VARY.value not in VARY:  # Before the slow restore.
            draw(None, None, None, 1, temperature=1.0, method="fast", vary=_VARY.value)
        trainer, variables = restore_variables(_CONFIG.value, _WORKDIR.value)
        images = draw(trainer.model, variables, jax.random.key(_SEED.value), _NUM_SAMPLES.value,
                      temperature=_TEMPERATURE.value, method=_METHOD.value, vary=_VARY.value)
        viz.save_png(_OUTPUT.value, viz.image_grid(np.asarray(images), trainer.info.num_levels))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    logging.info("wrote %s", _OUTPUT.value)
    print(_OUTPUT.value)


if __name__ == "__main__":
    app.run(main)
