"""The PixelVAE paper's analyses, each training (or reusing) its runs, then writing a
PNG plot and a JSON + markdown table to a results folder.

  * ``layers_sweep``: Fig. 4a/4b, NLL bound against the number of PixelCNN layers for
    a PixelVAE and its PixelCNN counterpart, the recon/KL split of the PixelVAE, and
    the IWAE NLL of every run beside its bound.
  * ``latent_space``: Fig. 5 and section 4.1.3, a 2-D latent VAE against a 2-D latent
    PixelVAE: test latents coloured by class, and k-nearest-neighbour test errors.
  * ``reconstructions``: Figs. 8 and 10, test images beside decodings of their latents.

Each run lives in ``<workdir_root>/<run name>``; a finished run is reused as it is
(``train.train_and_evaluate`` resumes or reports), so re-running an analysis after a
crash or with other plots costs no training. The base config is used unchanged except
for the fields each analysis varies (model name, PixelCNN layers, latent size), so the
same call serves ``binarized_mnist`` or the offline digits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from pvae_jax import data, evaluation, fileio, models, sampling, train, viz

# The PixelCNN of Fig. 4 that each latent-variable model is compared with.
PIXELCNN_OF = {"vae": "pixelcnn", "pixelvae": "pixelcnn",
               "gated_pixelvae": "gated_pixelcnn", "gated_noup": "gated_pixelcnn"}


def with_model(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``config.model`` fields replaced."""
    out = config.copy_and_resolve_references()
    with out.unlocked():
        for name, value in fields.items():
            out.model[name] = value
    return out


def train_runs(runs: dict[str, ml_collections.ConfigDict], workdir_root: str):
    """Trains (or reuses) every run; returns ``{name: final eval metrics}``."""
    return {name: train.train_and_evaluate(cfg, os.path.join(workdir_root, name))
            for name, cfg in runs.items()}


def _write_text(path: str, text: str) -> None:
    with fileio.atomic_write(path) as f:
        f.write(text)


def _write_json(path: str, value) -> None:
    _write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on servers.
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str) -> None:
    with fileio.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def _load(config, workdir):
    trainer, variables = train.load_for_sampling(config, workdir)
    return trainer, variables


# ----------------------------------------------------------------------------
# Fig. 4: number of PixelCNN layers
# ----------------------------------------------------------------------------


def layers_sweep(config: ml_collections.ConfigDict, workdir_root: str, results_dir: str, *,
                 layers: Sequence[int] = (0, 1, 2, 4, 8),
                 iwae_samples: Sequence[int] = (1, 10, 100, 1000),
                 iwae_images: int = 100, chunk_size: int = evaluation.DEFAULT_CHUNK_SIZE,
                 progress: bool = True) -> dict[str, Any]:
    """Fig. 4a/4b, and an IWAE-vs-bound table, for ``config``'s latent model.

    Trains ``config.model.name`` with each count in ``layers`` and its PixelCNN
    counterpart (``PIXELCNN_OF``) with each count >= 1, then evaluates every run on the
    eval split: the true ELBO (KL weight 1) over the whole split, and the bound and the
    IWAE NLL with each of ``iwae_samples`` samples on its first ``iwae_images`` images
    (latent models only: a PixelCNN's NLL is exact).

    Writes ``fig4.png``, ``fig4.json`` and ``fig4.md`` to ``results_dir``.

    Returns:
      The JSON written: one record per run.
    """
    latent = config.model.name
    if latent not in PIXELCNN_OF:
        raise ValueError(f"the layer sweep needs a one-level latent model, one of "
                         f"{sorted(PIXELCNN_OF)}; got model.name={latent!r}")
    runs = {}
    for n in layers:
        if n > 0 or latent != "gated_noup":
            runs[f"{latent}_{n}"] = (latent, n)
        if n > 0:
            runs[f"{PIXELCNN_OF[latent]}_{n}"] = (PIXELCNN_OF[latent], n)
    configs = {name: with_model(config, name=m, num_pixel_layers=n)
               for name, (m, n) in runs.items()}
    finals = train_runs(configs, workdir_root)
    records = []
    for name, (m, n) in runs.items():
        trainer, variables = _load(configs[name], os.path.join(workdir_root, name))
        subset = evaluation.evaluate(trainer, variables, jax.random.key(1),
                                     iwae_samples=iwae_samples if m in PIXELCNN_OF else 0,
                                     chunk_size=chunk_size,
                                     num_images=iwae_images, progress=progress)
        final = finals[name]
        records.append({
            "run": name, "model": m, "num_pixel_layers": n,
            "has_latents": m in PIXELCNN_OF,
            "nll_bound_nats": final["eval/nll_bound"],
            "recon_nats": final["eval/recon"], "kl_nats": final["eval/kl"],
            "bits_per_dim": final["eval/bits_per_dim"],
            "num_eval_images": int(final["eval/num_examples"]),
            "subset": subset,
        })
    _write_json(os.path.join(results_dir, "fig4.json"), records)
    _write_text(os.path.join(results_dir, "fig4.md"), _layers_markdown(records))
    _plot_layers(records, os.path.join(results_dir, "fig4.png"))
    return {"runs": records}


def _layers_markdown(records) -> str:
    rows = ["| run | PixelCNN layers | NLL bound | recon | KL | subset: bound | "
            "subset: IWAE NLL (S) | bound - IWAE |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        s = r["subset"]
        iwae = f"{s['iwae_nll_nats']:.2f} ({s['iwae_samples']})" if "iwae_nll_nats" in s else "-"
        gap = (f"{s['bound_minus_iwae_nats']:.2f} ± {s['bound_minus_iwae_stderr_nats']:.2f}"
               if "bound_minus_iwae_nats" in s else "-")
        rows.append(f"| {r['run']} | {r['num_pixel_layers']} | {r['nll_bound_nats']:.2f} | "
                    f"{r['recon_nats']:.2f} | {r['kl_nats']:.2f} | "
                    f"{s['nll_bound_nats']:.2f} | {iwae} | {gap} |")
    return ("Nats per image. NLL bound, recon and KL over the whole eval split "
            f"({records[0]['num_eval_images']} images); the subset columns over the first "
            f"{records[0]['subset']['num_images']} images, with the standard error of the "
            "paired difference.\n\n" + "\n".join(rows) + "\n")


def _plot_layers(records, path: str) -> None:
    plt = _pyplot()
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for has_latents, label in ((True, "PixelVAE (NLL bound)"), (False, "PixelCNN (NLL)")):
        rs = sorted((r for r in records if r["has_latents"] == has_latents),
                    key=lambda r: r["num_pixel_layers"])
        if rs:
            ax_a.plot([r["num_pixel_layers"] for r in rs], [r["nll_bound_nats"] for r in rs],
                      "o-", label=f"{label}: {rs[0]['model']}")
    ax_a.set_xticks(sorted({r["num_pixel_layers"] for r in records}))
    ax_a.set_xlabel("PixelCNN layers")
    ax_a.set_ylabel("nats per image")
    ax_a.set_title("(a) NLL against PixelCNN layers")
    ax_a.legend()
    rs = sorted((r for r in records if r["has_latents"]), key=lambda r: r["num_pixel_layers"])
    ticks = np.arange(len(rs))
    recon = [r["recon_nats"] for r in rs]
    ax_b.bar(ticks, recon, label="reconstruction -log p(x|z)")
    ax_b.bar(ticks, [r["kl_nats"] for r in rs], bottom=recon, label="KL(q(z|x) || p(z))")
    for t, r in zip(ticks, rs, strict=True):
        ax_b.text(t, r["nll_bound_nats"], f"KL {r['kl_nats']:.1f}", ha="center",
                  va="bottom", fontsize=8)
    ax_b.set_xticks(ticks, [str(r["num_pixel_layers"]) for r in rs])
    ax_b.set_xlabel("PixelCNN layers")
    ax_b.set_title("(b) PixelVAE NLL bound: reconstruction + KL")
    ax_b.legend(loc="lower left")
    _save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Fig. 5: 2-D latent space
# ----------------------------------------------------------------------------


def latent_space(config: ml_collections.ConfigDict, workdir_root: str, results_dir: str, *,
                 latent_dim: int = 2, knn_k: Sequence[int] = (1, 5, 10),
                 baseline: str = "vae") -> dict[str, Any]:
    """Fig. 5: latents of ``baseline`` and of ``config.model.name``, both with
    ``latent_dim`` dimensions, and the test error of a k-NN classifier on them.

    The classifier is fitted on the train split's posterior means and scored on the
    eval split's. Writes ``fig5.png`` (only for 2-D latents), ``fig5.json``, ``fig5.md``.

    Returns:
      The JSON written.
    """
    if not data.sources.get_spec(config.data.name).has_labels:
        raise ValueError(
            f"the k-NN test error needs class labels, and {config.data.name!r} has none "
            "(TFDS binarized_mnist is unlabelled): use --config.data.name=mnist "
            "--config.data.binarize=stochastic (TFDS MNIST binarised in the pipeline) "
            "or the offline digits (configs/mnist.py:<model>,offline).")
    names = [baseline, config.model.name]
    for name in names:
        if name not in PIXELCNN_OF:
            raise ValueError(f"the latent-space analysis needs one-level latent models "
                             f"({sorted(PIXELCNN_OF)}), got {name!r}")
    configs = {f"{n}_z{latent_dim}": with_model(config, name=n, latent_dim=latent_dim)
               for n in names}
    finals = train_runs(configs, workdir_root)
    result: dict[str, Any] = {"latent_dim": latent_dim, "runs": {}}
    latents = {}
    for run, cfg in configs.items():
        trainer, variables = _load(cfg, os.path.join(workdir_root, run))
        train_batches = _train_split_batches(cfg)
        z_train, y_train = evaluation.posterior_means(trainer.model, variables, train_batches)
        z_test, y_test = evaluation.posterior_means(trainer.model, variables,
                                                    trainer.eval_data)
        latents[run] = (z_test, y_test)
        result["runs"][run] = {
            "model": cfg.model.name,
            "num_pixel_layers": 0 if cfg.model.name == "vae" else cfg.model.num_pixel_layers,
            "nll_bound_nats": finals[run]["eval/nll_bound"],
            "kl_nats": finals[run]["eval/kl"],
            "num_train": len(z_train), "num_test": len(z_test),
            "knn_test_error": {str(k): evaluation.knn_error(z_train, y_train, z_test,
                                                             y_test, k) for k in knn_k},
        }
    _write_json(os.path.join(results_dir, "fig5.json"), result)
    _write_text(os.path.join(results_dir, "fig5.md"), _latent_markdown(result))
    if latent_dim == 2:
        _plot_latents(latents, result, os.path.join(results_dir, "fig5.png"))
    return result


def _train_split_batches(config):
    return data.eval_batches(config.data, config.eval_batch_size,
                             split=config.data.train_split)


def _latent_markdown(result) -> str:
    ks = list(next(iter(result["runs"].values()))["knn_test_error"])
    rows = ["| run | PixelCNN layers | NLL bound | KL | " +
            " | ".join(f"{k}-NN test error" for k in ks) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in ks) + " |"]
    for run, r in result["runs"].items():
        errors = " | ".join(f"{100 * r['knn_test_error'][k]:.1f}%" for k in ks)
        rows.append(f"| {run} | {r['num_pixel_layers']} | {r['nll_bound_nats']:.2f} | "
                    f"{r['kl_nats']:.2f} | {errors} |")
    return (f"{result['latent_dim']}-D latents (posterior means); k-NN fitted on the train "
            "split, scored on the eval split.\n\n" + "\n".join(rows) + "\n")


def _plot_latents(latents, result, path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(latents), figsize=(5.5 * len(latents), 4.6),
                             layout="constrained")
    for ax, (run, (z, y)) in zip(np.atleast_1d(axes), latents.items(), strict=True):
        sc = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
        err = result["runs"][run]["knn_test_error"]
        k = "5" if "5" in err else next(iter(err))
        ax.set_title(f"{run}: {k}-NN test error {100 * err[k]:.1f}%")
        ax.set_xlabel("z[0]")
        ax.set_ylabel("z[1]")
    fig.colorbar(sc, ax=axes, ticks=range(10), label="class")
    _save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Figs. 8 and 10: reconstructions
# ----------------------------------------------------------------------------


def reconstructions(config: ml_collections.ConfigDict, workdir: str, output: str, *,
                    num_images: int = 16, num_per_image: int = 5, seed: int = 0,
                    temperature: float = 1.0) -> str:
    """Test images beside ``num_per_image`` decodings of one z ~ q(z|x) each.

    Row i holds eval image i, then its reconstructions (paper Fig. 8 layout; with
    ``num_per_image=1`` and the pairs side by side it is Fig. 10). The pixels are
    drawn by ``sampling.sample`` with the latents fixed, so a PixelVAE's
    reconstructions show what the latents keep and the decoder re-draws. For a
    hierarchical model only the top level is taken from q(z|x) (paper Fig. 8: the
    levels below and the pixels are drawn from the prior given it), so the grid shows
    what the top latents alone keep.

    Returns:
      ``output``, the PNG written.
    """
    if num_images < 1 or num_per_image < 1:
        raise ValueError(f"num_images and num_per_image must be >= 1, got {num_images} "
                         f"and {num_per_image}")
    trainer, variables = _load(config, workdir)
    model = trainer.model
    hierarchical = isinstance(model, models.HierarchicalPixelVAE)
    if not isinstance(model, models.PixelVAE) and not hierarchical:
        raise ValueError(f"reconstructions need a latent model, one of "
                         f"{sorted(PIXELCNN_OF) + ['hierarchical']}; got "
                         f"model.name={config.model.name!r}")
    originals = np.concatenate([b["image"][b["mask"] > 0] for b in _first_batches(
        trainer.eval_data, num_images)])[:num_images]
    key = jax.random.key(seed)
    x_rep = np.repeat(originals, num_per_image, axis=0)
    z = model.apply(variables, x_rep, method="posterior_sample",
                    rngs={"sample": jax.random.fold_in(key, 0)})
    if hierarchical:
        z = (None,) * (len(z) - 1) + (z[-1],)
    recon = np.asarray(sampling.sample(model, variables, jax.random.fold_in(key, 1),
                                       len(x_rep), temperature=temperature,
                                       fixed={"latents": z}))
    rows = np.concatenate([originals[:, None], recon.reshape(
        num_images, num_per_image, *originals.shape[1:])], axis=1)
    grid = viz.image_grid(rows.reshape(-1, *originals.shape[1:]), trainer.info.num_levels,
                          ncols=num_per_image + 1)
    viz.save_png(output, grid)
    return output


def _first_batches(batches, num_images):
    seen = 0
    for batch in batches:
        yield batch
        seen += int(np.sum(batch["mask"] > 0))
        if seen >= num_images:
            return
