"""Evaluation: the importance-weighted NLL, the true ELBO split per level, and latents.

``iwae_nll`` is the bound of Burda et al. (2016) with q(z|x) as the proposal:

  -log p(x) <= -log (1/S) sum_s p(x, z_s) / q(z_s | x),   z_s ~ q(z|x),

which tightens towards -log p(x) as S grows (S = 1 is the ELBO). The PixelVAE paper
reports it with S = 5000 per image. The S samples are drawn in chunks of
``chunk_size`` with a running log-sum-exp, so memory holds one chunk's B * chunk_size
decoder images whatever S is; S = 5000 with the default chunk of 100 is 50 chunks.

Every model provides ``importance_log_weights(x, S)`` ([B, S] log weights drawn from
the 'sample' rng stream); a PixelCNN returns its exact log p(x) S times.
"""

from __future__ import annotations

import functools
import math
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# The paper's sample count (section 4.1) and the chunk that keeps it in memory.
PAPER_NUM_SAMPLES = 5000
DEFAULT_CHUNK_SIZE = 100


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def _chunk_log_sum_exp(model, variables, x_BxHxWxC, key, chunk_index, total_B, num_samples):
    """``logaddexp(total, logsumexp_s log w_s)`` over chunk ``chunk_index``'s samples.

    The key fold and the running sum live inside the jitted call, so a chunk costs
    one dispatch and the chunk index (traced) never triggers a recompile.
    """
    log_w_BxS = model.apply(variables, x_BxHxWxC, num_samples,
                            method="importance_log_weights",
                            rngs={"sample": jax.random.fold_in(key, chunk_index)})
    return jnp.logaddexp(total_B, jax.nn.logsumexp(log_w_BxS, axis=1))


@functools.partial(jax.jit, static_argnames=("model",))
def _elbo_terms(model, variables, x_BxHxWxC, key):
    # No kl_weight: the true ELBO, whatever warm-up the run trained with.
    return model.apply(variables, x_BxHxWxC, train=False, rngs={"sample": key})


def _check_counts(num_samples, chunk_size) -> None:
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def iwae_nll(model, variables, x_BxHxWxC, key, num_samples: int = PAPER_NUM_SAMPLES,
             chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Importance-weighted upper bound on -log p(x), per image, in nats.

    Chunk i draws its ``chunk_size`` samples with ``fold_in(key, i)``; the last chunk
    may be smaller (one more compile). Each chunk is one jitted call, so peak memory is
    that of ``B * chunk_size`` decoder images, independent of ``num_samples``.

    Args:
      model: a module from ``pvae_jax.models.build`` (any family).
      variables: its variables (EMA params and model state for evaluation).
      x_BxHxWxC: integer images in ``[0, K)``; may be sharded over a batch mesh.
      key: PRNG key.
      num_samples: S, importance samples per image (the paper: 5000).
      chunk_size: samples per jitted call; None means all S in one call.

    Returns:
      float32 ``[B]``: -log (1/S) sum_s w_s, which never lies below -log p(x) in
      expectation and equals the ELBO's negative in expectation for S = 1.

    Raises:
      ValueError: non-positive counts, or a model without ``importance_log_weights``.
    """
    chunk_size = num_samples if chunk_size is None else min(chunk_size, num_samples)
    _check_counts(num_samples, chunk_size)
    if not hasattr(model, "importance_log_weights"):
        raise ValueError(f"{type(model).__name__} has no importance_log_weights method; "
                         "every model family must provide one to be evaluated by IWAE.")
    total_B = jnp.full((x_BxHxWxC.shape[0],), -jnp.inf, jnp.float32)
    for i, start in enumerate(range(0, num_samples, chunk_size)):
        size = min(chunk_size, num_samples - start)
        total_B = _chunk_log_sum_exp(model, variables, x_BxHxWxC, key, jnp.int32(i),
                                     total_B, size)
    return math.log(num_samples) - total_B


class _NoBar:
    def update(self, n):
        del n

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluating", unit="image", file=sys.stderr)


def evaluate(trainer, variables, key, *, iwae_samples: int | Sequence[int] = 0,
             chunk_size: int = DEFAULT_CHUNK_SIZE, iwae_batch_size: int = 10,
             num_images: int = -1, progress: bool = True) -> dict[str, Any]:
    """The true ELBO (KL weight 1) split per level, and the IWAE NLL, on the eval split.

    Both are measured on the same images, so their difference is paired.

    Args:
      trainer: a ``train.Trainer`` of the run's config (holds the model, mesh, data).
      variables: ``{'params': ..., **model_state}`` (e.g. from ``train.load_for_sampling``).
      key: PRNG key; batch i uses ``fold_in(key, i)``.
      iwae_samples: S of the IWAE NLL (0: skip it; the paper: 5000), or several S,
        each estimated with its own draws.
      chunk_size: samples per jitted IWAE call.
      iwae_batch_size: images per IWAE call: the decoder sees
        ``iwae_batch_size * chunk_size`` images at once, which bounds the memory.
      num_images: evaluate the first this many images of the split (-1: all).
      progress: show a tqdm progress bar on stderr.

    Returns:
      A JSON-able dict: ``num_images``, ``iwae_samples`` (the largest S), and for each
      of ``nll_bound``, ``recon``, ``kl``, ``kl_level_<i>``, ``iwae_nll`` (largest S)
      and ``iwae_nll_s<S>`` (every S) its mean in nats (``<name>_nats``) and bits/dim
      (``<name>_bits_per_dim``); ``bound_minus_iwae_nats`` with its standard error
      over images (``bound_minus_iwae_stderr_nats``).
    """
    counts = sorted({int(s) for s in np.atleast_1d(iwae_samples) if s})
    if any(s < 0 for s in counts):
        raise ValueError(f"iwae_samples must be >= 0, got {iwae_samples}")
    _check_counts(max(counts, default=1), chunk_size)
    _check_counts(iwae_batch_size, 1)
    if not num_images or num_images < -1:
        raise ValueError(f"num_images must be positive or -1 (all), got {num_images}")
    batches = trainer.eval_data
    remaining = num_images if num_images > 0 else batches.num_examples
    bar = _progress_bar(min(remaining, batches.num_examples), progress)
    per_image: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        if remaining <= 0:
            break
        # The first `remaining` rows; rows past the split's end are padding (mask 0).
        rows = int(min(len(batch["mask"]), remaining))
        remaining -= rows
        images = batch["image"][:rows]
        real = np.asarray(batch["mask"][:rows]) > 0
        batch_key = jax.random.fold_in(key, i)
        out = _elbo_terms(trainer.model, variables, _place(trainer, images),
                          jax.random.fold_in(batch_key, 0))
        columns = {"nll_bound": out["loss"], "recon": out["recon"], "kl": out["kl"]}
        if "kl_levels" in out:
            for level, kl in enumerate(jnp.moveaxis(out["kl_levels"], 1, 0)):
                columns[f"kl_level_{level}"] = kl
        for num_samples in counts:
            # The bar advances with the pieces of the last (largest) count, the slow part.
            advance = (lambda n, real=real: bar.update(int(real[n].sum()))) if (
                num_samples == counts[-1]) else None
            columns[f"iwae_nll_s{num_samples}"] = _iwae_batched(
                trainer, variables, images,
                jax.random.fold_in(jax.random.fold_in(batch_key, 1), num_samples),
                num_samples, chunk_size, iwae_batch_size, advance)
        if not counts:
            bar.update(int(real.sum()))
        else:
            columns["iwae_nll"] = columns[f"iwae_nll_s{counts[-1]}"]
        for name, value in columns.items():
            per_image.setdefault(name, []).append(np.asarray(value)[real])
    bar.close()
    return summarize(per_image, trainer.info.image_shape, max(counts, default=0))


def _place(trainer, images_BxHxWxC):
    """Shards a host batch over the trainer's mesh where its size divides."""
    if len(images_BxHxWxC) % trainer.batch_sharding.mesh.size:
        return jnp.asarray(images_BxHxWxC)
    return jax.device_put(images_BxHxWxC, trainer.batch_sharding)


def _iwae_batched(trainer, variables, images_BxHxWxC, key, num_samples, chunk_size,
                  batch_size, advance=None):
    """``iwae_nll`` over a host batch in pieces of ``batch_size`` images; calls
    ``advance(slice)`` after each piece."""
    out = []
    for i, start in enumerate(range(0, len(images_BxHxWxC), batch_size)):
        piece = slice(start, start + batch_size)
        x = _place(trainer, images_BxHxWxC[piece])
        out.append(np.asarray(iwae_nll(trainer.model, variables, x,
                                       jax.random.fold_in(key, i), num_samples, chunk_size)))
        if advance is not None:
            advance(piece)
    return np.concatenate(out)


def summarize(per_image: dict[str, list[np.ndarray]], image_shape, iwae_samples: int):
    """Means in nats and bits/dim of per-image columns (see ``evaluate``)."""
    columns = {k: np.concatenate(v).astype(np.float64) for k, v in per_image.items()}
    dims = math.prod(image_shape)
    out: dict[str, Any] = {"num_images": int(len(columns["nll_bound"])),
                           "iwae_samples": int(iwae_samples)}
    for name, values in columns.items():
        out[f"{name}_nats"] = float(values.mean())
        out[f"{name}_bits_per_dim"] = float(values.mean() / (dims * math.log(2)))
    if "iwae_nll" in columns:
        gap = columns["nll_bound"] - columns["iwae_nll"]
        out["bound_minus_iwae_nats"] = float(gap.mean())
        out["bound_minus_iwae_stderr_nats"] = float(gap.std(ddof=1) / math.sqrt(len(gap))
                                                    if len(gap) > 1 else 0.0)
    return out


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of an ``evaluate`` result: one row per quantity."""
    names = [k[:-len("_nats")] for k in result if k.endswith("_nats")
             and f"{k[:-len('_nats')]}_bits_per_dim" in result and k != "iwae_nll_nats"]
    lines = [f"{'quantity':<22}{'nats':>12}{'bits/dim':>12}"]
    for name in names:
        label = f"iwae_nll (S={name[10:]})" if name.startswith("iwae_nll_s") else name
        lines.append(f"{label:<22}{result[name + '_nats']:>12.3f}"
                     f"{result[name + '_bits_per_dim']:>12.5f}")
    lines.append(f"over {result['num_images']} images")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Latents and nearest neighbours (paper section 4.1.3)
# ----------------------------------------------------------------------------


def posterior_means(model, variables, batches, num_batches: int | None = None):
    """(mean of q(z|x) [N, D], labels [N]) over the real examples of eval batches."""
    means, labels = [], []
    apply = jax.jit(lambda v, x: model.apply(v, x, method="posterior")[0])
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        real = np.asarray(batch["mask"]) > 0
        means.append(np.asarray(apply(variables, batch["image"]))[real])
        labels.append(np.asarray(batch["label"])[real])
    return np.concatenate(means), np.concatenate(labels)


def knn_predict(train_NxD, train_labels_N, query_MxD, k: int, chunk_size: int = 1024):
    """Exact k-nearest-neighbour majority vote (Euclidean); ties go to the class whose
    nearest member is closest. Distances are computed ``chunk_size`` queries at a time.

    Returns:
      int array ``[M]`` of predicted labels.
    """
    train = np.asarray(train_NxD, np.float64)
    labels = np.asarray(train_labels_N)
    if not 1 <= k <= len(train):
        raise ValueError(f"k must be in [1, {len(train)}] (the training points), got {k}")
    num_classes = int(labels.max()) + 1
    sq_train = np.square(train).sum(1)
    preds = []
    for start in range(0, len(query_MxD), chunk_size):
        q = np.asarray(query_MxD[start:start + chunk_size], np.float64)
        d = np.square(q).sum(1)[:, None] - 2 * q @ train.T + sq_train[None]
        nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(d, nearest, 1).argsort(1)
        nearest = np.take_along_axis(nearest, order, 1)  # Sorted nearest first.
        rows, classes = np.arange(len(q))[:, None], labels[nearest]
        counts = np.zeros((len(q), num_classes))
        np.add.at(counts, (rows, classes), 1.0)
        first_rank = np.full((len(q), num_classes), k)
        np.minimum.at(first_rank, (rows, classes), np.broadcast_to(np.arange(k), classes.shape))
        # Counts first; among equal counts the class whose nearest member ranks first.
        votes = counts * (k + 1) - first_rank
        preds.append(votes.argmax(1))
    return np.concatenate(preds) if preds else np.zeros((0,), int)


def knn_error(train_NxD, train_labels_N, test_MxD, test_labels_M, k: int) -> float:
    """Test error (fraction) of the k-nearest-neighbour classifier."""
    pred = knn_predict(train_NxD, train_labels_N, test_MxD, k)
    return float(np.mean(pred != np.asarray(test_labels_M)))


# ----------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _best_seconds_interleaved(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best wall times of two functions timed in alternation (after compiling both),
    so that load from other processes affects both alike."""
    jax.block_until_ready((fn_a(), fn_b()))
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
    return min(times_a), min(times_b)


def benchmark_iwae(config: ml_collections.ConfigDict, *, num_images: int = 4,
                   chunk_size: int = 25, num_samples: int = 100,
                   memory_num_samples: int = PAPER_NUM_SAMPLES, repeats: int = 5,
                   seed: int = 0) -> dict[str, Any]:
    """IWAE throughput against a plain forward pass, and memory at the paper's S.

    Throughput is images x samples per second of ``iwae_nll`` (``num_samples`` per
    image in chunks of ``chunk_size``) against ``model.apply`` (the -ELBO, one z each)
    on ``num_images * chunk_size`` images: the same decoder batch as one IWAE chunk.
    The model is freshly initialised (speed does not depend on training). Memory:
    XLA's temporary buffer size of one chunk, and the process's peak RSS before and
    after an ``iwae_nll`` with ``memory_num_samples`` samples per image.

    Returns:
      A JSON-able dict: ``iwae_samples_per_sec``, ``forward_images_per_sec``, their
      ``ratio``, ``chunk_temp_bytes``, ``peak_rss_bytes_before`` / ``_after``,
      ``rss_growth_bytes`` and the settings.
    """
    from pvae_jax import data, models

    info = data.dataset_info(config.data)
    model = models.build(config.model, info.image_shape, info.num_levels)
    key = jax.random.key(seed)
    x = jax.random.randint(key, (num_images, *info.image_shape), 0, info.num_levels,
                           jnp.int32).astype(jnp.uint8)
    init = jax.jit(lambda k: model.init({"params": k, "sample": k}, x[:1]),
                   compiler_options={"xla_backend_optimization_level": 0})
    variables = init(key)
    x_rep = jnp.repeat(x, chunk_size, axis=0)
    forward = jax.jit(lambda v, xs, k: model.apply(v, xs, rngs={"sample": k})["loss"])
    forward_s, iwae_s = _best_seconds_interleaved(
        lambda: forward(variables, x_rep, key),
        lambda: iwae_nll(model, variables, x, key, num_samples, chunk_size), repeats)
    lowered = _chunk_log_sum_exp.lower(model, variables, x, key, jnp.int32(0),
                                       jnp.zeros((num_images,), jnp.float32), chunk_size)
    memory = lowered.compile().memory_analysis()
    rss_before = _peak_rss_bytes()
    jax.block_until_ready(iwae_nll(model, variables, x, key, memory_num_samples, chunk_size))
    rss_after = _peak_rss_bytes()
    forward_rate = len(x_rep) / forward_s
    iwae_rate = num_images * num_samples / iwae_s
    return {
        "model": config.model.name,
        "image_shape": list(info.image_shape),
        "num_images": num_images,
        "chunk_size": chunk_size,
        "num_samples": num_samples,
        "iwae_samples_per_sec": iwae_rate,
        "forward_images_per_sec": forward_rate,
        "ratio": iwae_rate / forward_rate,
        "chunk_temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
        "memory_num_samples": memory_num_samples,
        "peak_rss_bytes_before": rss_before,
        "peak_rss_bytes_after": rss_after,
        # What S = memory_num_samples added to the peak on top of S = num_samples: the
        # chunked loop keeps it near zero, where one unchunked call would need about
        # chunk_temp_bytes * memory_num_samples / chunk_size.
        "rss_growth_bytes": rss_after - rss_before,
        "devices": [str(d) for d in jax.devices()],
    }
