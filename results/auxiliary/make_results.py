"""Evaluates a trained auxiliary-variable PixelCNN factor by factor and draws samples.

  python results/auxiliary/make_results.py --config=configs/photo_auxiliary.py:grayscale \
      --workdir=runs/aux_grayscale --out=results/auxiliary/grayscale

Writes to --out: metrics.json (bits/dim of the bound and of every factor on the test
split and on as many training images, with the EMA parameters of the newest
checkpoint) and PNG grids: for the Grayscale PixelCNN, x^ ~ p(x^) beside x ~ p(x | x^),
and test images beside their 4-bit grayscale and a colouring of it; for the Pyramid
PixelCNN, every scale of each sample, plain and MAP-sampled.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pvae_jax import data, fileio, sampling_auxiliary, train, viz
from pvae_jax.models import auxiliary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the finished training run.")
_OUT = flags.DEFINE_string("out", None, "Directory for metrics.json and the PNGs.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Images per sample grid.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def _evaluate(model, variables, batches, max_examples):
    apply = jax.jit(model.apply)
    sums, count = {}, 0.0
    for batch in batches:
        out = apply(variables, batch["image"])
        mask = batch["mask"]
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(jnp.sum(value * mask))
        count += float(mask.sum())
        if count >= max_examples:
            break
    means = {key: np.asarray([value / count]) for key, value in sums.items()}
    return {"num_examples": int(count), **auxiliary.bits_per_dim(means, model_shape(model))}


def model_shape(model):
    return (*model.image_hw, model.channels)


def main(argv):
    del argv
    config, out_dir = _CONFIG.value, _OUT.value
    os.makedirs(out_dir, exist_ok=True)
    trainer, variables = train.load_for_sampling(config, _WORKDIR.value)
    model, n = trainer.model, _NUM_SAMPLES.value
    test = data.eval_batches(config.data, 500)
    metrics = {"test": _evaluate(model, variables, test, test.num_examples)}
    train_split = data.eval_batches(config.data, 500, split=config.data.train_split)
    metrics["train"] = _evaluate(model, variables, train_split, test.num_examples)
    key = jax.random.key(config.seed)
    start = time.perf_counter()
    if isinstance(model, auxiliary.GrayscalePixelCNN):
        x_hat, x = sampling_auxiliary.sample_grayscale(model, variables, key, n,
                                                       return_grayscale=True)
        gray = sampling_auxiliary.grayscale_to_levels(x_hat)
        viz.save_png(os.path.join(out_dir, "samples.png"),
                     sampling_auxiliary.scales_grid([gray, x], samples_per_row=4))
        originals = next(iter(test))["image"][:n]
        x_hat = auxiliary.grayscale_4bit(originals)
        colored = sampling_auxiliary.sample_grayscale(model, variables, key, n,
                                                      grayscale=x_hat)
        viz.save_png(os.path.join(out_dir, "colorized_test.png"), sampling_auxiliary.scales_grid(
            [originals, sampling_auxiliary.grayscale_to_levels(x_hat), colored],
            samples_per_row=4))
    else:
        for name, map_sampling in (("samples", False), ("samples_map", True)):
            scales = sampling_auxiliary.sample_pyramid_scales(model, variables, key, n,
                                                              map_sampling=map_sampling)
            viz.save_png(os.path.join(out_dir, f"{name}.png"),
                         sampling_auxiliary.scales_grid(scales, samples_per_row=4))
    metrics["sampling_seconds_incl_compile"] = time.perf_counter() - start
    with fileio.atomic_write(os.path.join(out_dir, "metrics.json")) as f:
        f.write(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(main)
