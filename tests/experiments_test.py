"""Tests of the analysis helpers that need no training: config variants, tables, plots."""

import json

import pytest

from configs import mnist
from pvae_jax import experiments


def test_with_model_changes_a_copy_only():
    base = mnist.get_config("pixelvae,offline")
    base.lock()
    variant = experiments.with_model(base, name="pixelcnn", num_pixel_layers=3)
    assert (variant.model.name, variant.model.num_pixel_layers) == ("pixelcnn", 3)
    assert (base.model.name, base.model.num_pixel_layers) == ("pixelvae", 13)
    assert variant.data.name == base.data.name == "mnist5k_local"


@pytest.mark.parametrize("call", [experiments.layers_sweep, experiments.latent_space])
def test_analyses_refuse_models_without_one_level_latents(tmp_path, call):
    config = mnist.get_config("pixelcnn,offline")
    with pytest.raises(ValueError, match="one-level latent"):
        call(config, str(tmp_path / "runs"), str(tmp_path / "results"))
    assert not (tmp_path / "runs").exists()  # Refused before training anything.


def _record(model, layers, bound, kl, iwae=None):
    subset = {"num_images": 10, "iwae_samples": 0, "nll_bound_nats": bound}
    if iwae is not None:
        subset.update(iwae_samples=100, iwae_nll_nats=iwae,
                      bound_minus_iwae_nats=bound - iwae, bound_minus_iwae_stderr_nats=0.1)
    return {"run": f"{model}_{layers}", "model": model, "num_pixel_layers": layers,
            "has_latents": model == "pixelvae", "nll_bound_nats": bound,
            "recon_nats": bound - kl, "kl_nats": kl, "bits_per_dim": 0.1,
            "num_eval_images": 1000, "subset": subset}


def test_layer_table_and_plot(tmp_path):
    records = [_record("pixelvae", 0, 100.0, 25.0, iwae=97.5),
               _record("pixelvae", 1, 90.0, 5.0, iwae=89.0),
               _record("pixelcnn", 1, 140.0, 0.0)]
    table = experiments._layers_markdown(records)
    assert "| pixelvae_0 | 0 | 100.00 | 75.00 | 25.00 | 100.00 | 97.50 (100) | 2.50 ± 0.10 |" \
        in table
    assert "| pixelcnn_1 | 1 | 140.00 | 140.00 | 0.00 | 140.00 | - | - |" in table
    path = tmp_path / "fig4.png"
    experiments._plot_layers(records, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latent_table_and_plot(tmp_path):
    import numpy as np

    result = {"latent_dim": 2, "runs": {
        run: {"model": run[:-3], "num_pixel_layers": layers, "nll_bound_nats": 100.0,
              "kl_nats": 5.0, "num_train": 40, "num_test": 20,
              "knn_test_error": {"1": 0.25, "5": 0.125}}
        for run, layers in (("vae_z2", 0), ("pixelvae_z2", 2))}}
    table = experiments._latent_markdown(result)
    assert "| vae_z2 | 0 | 100.00 | 5.00 | 25.0% | 12.5% |" in table
    rng = np.random.default_rng(0)
    latents = {run: (rng.normal(size=(20, 2)), rng.integers(0, 10, 20)) for run in result["runs"]}
    experiments._plot_latents(latents, result, str(tmp_path / "fig5.png"))
    assert (tmp_path / "fig5.png").stat().st_size > 1000
    experiments._write_json(str(tmp_path / "r.json"), result)
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_latent_space_needs_labelled_data(tmp_path):
    config = mnist.get_config("pixelvae")  # TFDS binarized_mnist: no labels.
    with pytest.raises(ValueError, match="needs class labels"):
        experiments.latent_space(config, str(tmp_path / "runs"), str(tmp_path / "results"))


def test_hierarchical_reconstructions_hold_the_top_level(tmp_path):
    import numpy as np
    from PIL import Image

    from configs import imagenet64
    from pvae_jax import train

    config = imagenet64.get_config("tiny")
    config.data.name = "photo_crops_local"  # Offline colour crops, resized to 16x16.
    config.data.image_size = 16
    config.num_train_steps = 2
    config.checkpoint_every_steps = 2
    config.num_eval_batches = 1
    config.num_image_samples = 0
    train.train_and_evaluate(config, str(tmp_path / "run"))
    path = experiments.reconstructions(config, str(tmp_path / "run"),
                                       str(tmp_path / "r.png"), num_images=2,
                                       num_per_image=2)
    grid = np.asarray(Image.open(path))
    # 2 rows of (original + 2 reconstructions) of 16x16 colour images, 1-pixel borders.
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1, 3)
