"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

The train and eval steps are pure per-batch functions, jitted over a 1-D ``'data'``
mesh of all devices: the global batch is sharded over it and the state replicated,
which is what ``pmap`` did, in the form JAX now recommends (and multi-host ready).
Randomness enters once, as ``jax.random.key(config.seed)``; the step folds its
number into the train key inside the jitted function.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pvae_jax import checkpointing, data, distributed, models, sampling, viz
from pvae_jax.metrics import METRICS_FILE, MetricWriter, read_metrics


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position.

    ``rng`` holds the train key's raw data (checkpoints store plain arrays). A step
    whose loss or gradient is not finite leaves params, optimiser, EMA and model
    state untouched but still counts: the batch is consumed, so the data stream and
    step numbers stay those of an uninterrupted run.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    model_state: Any  # Non-parameter collections, e.g. batch_stats; {} when none.
    rng: jax.Array
    nonfinite_run: jax.Array  # Consecutive skipped steps up to now.
    nonfinite_total: jax.Array


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate, times lr_decay_factor every lr_decay_every_steps (if set)."""
    if not config.lr_decay_every_steps:
        return optax.constant_schedule(config.learning_rate)
    return optax.exponential_decay(config.learning_rate, config.lr_decay_every_steps,
                                   config.lr_decay_factor, staircase=True)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with the config's learning-rate schedule and gradient clipping."""
    chain = []
    if config.grad_clip_value:
        chain.append(optax.clip(config.grad_clip_value))
    if config.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    chain.append(optax.adam(learning_rate_schedule(config)))
    return optax.chain(*chain)


def kl_weight(step, warmup_steps):
    """Linear KL warm-up: 1/warmup_steps at step 0, 1 from step warmup_steps - 1 on.

    ``warmup_steps`` is one int for all levels, or one per level (bottom first), which
    gives a weight vector [L]; 0 means no warm-up.
    """
    steps = np.atleast_1d(np.asarray(warmup_steps, np.float32))
    weights = jnp.where(steps > 0, jnp.minimum(1.0, (step + 1) / np.maximum(steps, 1)), 1.0)
    weights = weights.astype(jnp.float32)
    return weights if np.ndim(warmup_steps) else weights[0]


def ema_decay_at(step, decay: float):
    """The EMA decay, ramped up as (1 + t) / (10 + t) so early evaluations are not
    dominated by the initial parameters (as TensorFlow's ExponentialMovingAverage
    does with num_updates)."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def train_step(state: TrainState, image_BxHxWxC, *, model, tx, config):
    """One update on a global batch; returns the new state and scalar metrics."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    weight = kl_weight(state.step, config.kl_warmup_steps)

    def loss_fn(params, image, key):
        variables = {"params": params, **state.model_state}
        out, new_model_state = model.apply(
            variables, image, train=True, kl_weight=weight, rngs={"sample": key},
            mutable=list(state.model_state))
        return out["loss"].mean(), (out, new_model_state)

    if config.num_microbatches > 1 and state.model_state:
        raise ValueError(
            f"config.num_microbatches={config.num_microbatches} needs a model without "
            f"batch statistics (its collections: {sorted(state.model_state)}): they "
            f"would span a microbatch, not the batch; use num_microbatches=1")

    def slice_fn(image, key):
        (loss, (out, new_model_state)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params, image, key)
        return (loss, grads), (out, new_model_state)

    (loss, grads), aux = _over_microbatches(slice_fn, image_BxHxWxC, key,
                                            config.num_microbatches)
    loss, grads = jax.tree.map(lambda t: t / config.num_microbatches, (loss, grads))
    out = jax.tree.map(lambda *o: jnp.concatenate(o), *(o for o, _ in aux))
    model_state = aux[-1][1]  # Only a single slice may carry batch statistics.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new_state = state.replace(
        step=state.step + 1,
        params=_select(finite, params, state.params),
        opt_state=_select(finite, opt_state, state.opt_state),
        ema_params=_select(finite, ema, state.ema_params),
        model_state=_select(finite, flax.core.unfreeze(model_state), state.model_state),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = {
        "train/loss": loss,
        "train/recon": out["recon"].mean(),
        "train/kl": out["kl"].mean(),
        "train/grad_norm": grad_norm,
        "train/nonfinite_steps": new_state.nonfinite_total,
    }
    if "kl_levels" in out:
        for i, kl in enumerate(out["kl_levels"].mean(axis=0)):
            metrics[f"train/kl_level_{i}"] = kl
    if weight.ndim:
        metrics.update({f"train/kl_weight_level_{i}": w for i, w in enumerate(weight)})
    else:
        metrics["train/kl_weight"] = weight
    return new_state, metrics


def _over_microbatches(fn, image_BxHxWxC, key, num_microbatches: int, *extra_Bx):
    """``fn(image, *extra, key)`` on ``num_microbatches`` equal slices of a batch
    (``_microbatch``), one after another; returns the sum of its first outputs and the
    list of its second ones.

    Slice m reads the noise of ``fold_in(key, m)`` (``key`` itself when there is one
    slice). The loop is unrolled: XLA:CPU runs convolutions inside a while loop as
    generic ones, several times slower (measured 3.4x on gated_noup).
    """
    total, aux = None, []
    for m in range(num_microbatches):
        image = _microbatch(image_BxHxWxC, m, num_microbatches)
        if total is not None:
            image = _after(total, image)
        summed, rest = fn(image, *(_microbatch(x, m, num_microbatches) for x in extra_Bx),
                          key if num_microbatches == 1 else jax.random.fold_in(key, m))
        total = summed if total is None else jax.tree.map(jnp.add, total, summed)
        aux.append(rest)
    return total, aux


def _microbatch(x_Bx, m: int, num_microbatches: int):
    """The m-th of ``num_microbatches`` slices of a batch sharded over all devices: the
    m-th slice of every device's part, so that no data moves between devices."""
    if num_microbatches == 1:
        return x_Bx
    n = jax.device_count()  # The batch is sharded over all devices (Trainer's mesh).
    B = x_Bx.shape[0]
    x_NxMxbx = x_Bx.reshape(n, num_microbatches, B // (n * num_microbatches), *x_Bx.shape[1:])
    return x_NxMxbx[:, m].reshape(B // num_microbatches, *x_Bx.shape[1:])


def _after(tree, x):
    """``x``, made to depend on every leaf of ``tree``, so that XLA finishes ``tree``
    before it starts on anything that reads ``x``.

    Without it XLA schedules all microbatches' forward passes first and keeps every
    activation alive (no memory saved). It is a select on a NaN test of the leaves'
    first elements, which XLA cannot fold (``optimization_barrier`` does not order
    work on XLA:CPU): ``x`` unless one is NaN, and then the result is NaN anyway (a
    train step with a NaN gradient is rejected). Applied to the image, not the
    parameters: one consumer, so XLA's fusion does not copy the test into every use of
    every parameter (which made a 2-microbatch gated_noup step compile 7x slower).
    """
    probe = sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in jax.tree.leaves(tree))
    return jnp.where(jnp.isnan(probe), jnp.zeros_like(x), x)


def eval_step(params, model_state, batch, key, *, model, num_microbatches: int = 1):
    """Sums over the real (mask 1) examples of a batch, with the KL weight at 1.

    With ``num_microbatches`` > 1 the batch is evaluated in that many slices, one
    after another, as the train step does, for a fraction of the memory."""
    variables = {"params": params, **model_state}
    sums, _ = _over_microbatches(
        lambda image, mask, key: (_eval_sums(model, variables, image, mask, key), None),
        batch["image"], key, num_microbatches, batch["mask"])
    return sums


def _eval_sums(model, variables, image_BxHxWxC, mask_B, key):
    out = model.apply(variables, image_BxHxWxC, train=False, rngs={"sample": key})
    sums = {"nll_bound": out["loss"], "recon": out["recon"], "kl": out["kl"]}
    # Models made of several factors (the auxiliary-variable PixelCNNs) report each
    # factor's NLL as 'nll_<factor>'; it is averaged like the bound.
    sums.update({k: v for k, v in out.items() if k.startswith("nll_")})
    sums = {k: jnp.sum(v * mask_B) for k, v in sums.items()}
    if "kl_levels" in out:
        sums["kl_levels"] = jnp.sum(out["kl_levels"] * mask_B[:, None], axis=0)
    sums["count"] = jnp.sum(mask_B)
    return sums


class Trainer:
    """Holds the model, mesh and jitted steps of one configuration."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.info = data.dataset_info(config.data)
        self.model = models.build(config.model, self.info.image_shape, self.info.num_levels)
        n = jax.device_count()
        for field in ("batch_size", "eval_batch_size"):
            if config[field] % n:
                raise ValueError(
                    f"config.{field}={config[field]} does not divide by the {n} devices; "
                    f"use a multiple of {n}.")
        num = config.num_microbatches
        if (not isinstance(num, int) or num < 1 or config.batch_size % (n * num)
                or config.eval_batch_size % (n * num)):
            raise ValueError(
                f"config.num_microbatches={num!r} must be an int >= 1 that divides each "
                f"device's part of the batch and of the eval batch ({config.batch_size} "
                f"and {config.eval_batch_size} over {n} devices)")
        # Auto axes: XLA propagates the batch sharding through any reshape a model
        # makes (explicit axes would need an out_sharding on each).
        self.mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.eval_data = data.eval_batches(
            config.data, config.eval_batch_size, process_index=jax.process_index(),
            process_count=jax.process_count())
        self.tx = make_optimizer(config)
        self.train_step = self.jit_train_step()
        self.eval_step = jax.jit(
            functools.partial(eval_step, model=self.model, num_microbatches=num),
            in_shardings=(self.replicated, self.replicated, self.batch_sharding, None),
            out_shardings=self.replicated)

    def jit_train_step(self):
        """A new jitted train step (``self.train_step`` is one), traced afresh on its
        first call: ``(state, image) -> (state, metrics)``, ``state`` donated."""
        return jax.jit(
            functools.partial(train_step, model=self.model, tx=self.tx, config=self.config),
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated), donate_argnums=0)

    def init_state(self, key) -> TrainState:
        """A fresh train state (params from ``key``'s 'params' fold), replicated."""
        init_key, sample_key, train_key = jax.random.split(key, 3)
        image = jnp.zeros((1, *self.info.image_shape), jnp.uint8)

        def init():
            variables = self.model.init({"params": init_key, "sample": sample_key}, image)
            variables = flax.core.unfreeze(variables)
            params = variables.pop("params")
            return TrainState(
                step=jnp.int32(0), params=params, opt_state=self.tx.init(params),
                ema_params=params, model_state=variables,
                rng=jax.random.key_data(train_key), nonfinite_run=jnp.int32(0),
                nonfinite_total=jnp.int32(0))

        # Init runs once, so its code need not be fast, but XLA:CPU takes seconds to
        # optimise each of the many random initialisers; unoptimised it compiles ~4x faster.
        return jax.jit(init, out_shardings=self.replicated,
                       compiler_options={"xla_backend_optimization_level": 0})()

    def put(self, batch: dict) -> dict:
        """Places this process's part of a global batch on the mesh."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in batch.items() if k in ("image", "mask")}

    def evaluate(self, state: TrainState, key, num_batches: int = -1) -> dict[str, float]:
        """The true ELBO (KL weight 1) on the eval split, with the EMA parameters."""
        totals = None
        for i, batch in enumerate(self.eval_data):
            if 0 <= num_batches <= i:
                break
            sums = self.eval_step(state.ema_params, state.model_state, self.put(batch),
                                  jax.random.fold_in(key, i))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        count = float(totals.pop("count"))
        dims = math.prod(self.info.image_shape)
        out = {f"eval/{k}": v / count for k, v in totals.items() if k != "kl_levels"}
        for i, v in enumerate(np.atleast_1d(totals.get("kl_levels", []))):
            out[f"eval/kl_level_{i}"] = v / count
        out["eval/bits_per_dim"] = out["eval/nll_bound"] / (dims * math.log(2))
        out["eval/num_examples"] = count
        return out


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe per process: processes sharing the workdir must not remove each
        # other's.
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a "
                         "--workdir you can write to.") from e


def _write_images(trainer: Trainer, state: TrainState, key, workdir: str, step: int) -> None:
    """Sample and reconstruction grids as PNG (process 0 only)."""
    cfg, model = trainer.config, trainer.model
    variables = {"params": state.ema_params, **state.model_state}
    n = cfg.num_image_samples
    if not n:
        return
    samples = sampling.sample(model, variables, key, n)
    levels = trainer.info.num_levels
    paths = [os.path.join(workdir, f"samples_{step:08d}.png")]
    images = [viz.image_grid(np.asarray(samples), levels)]
    if isinstance(model, models.PixelVAE | models.HierarchicalPixelVAE):
        originals = next(iter(trainer.eval_data))["image"][:n]
        z = model.apply(variables, originals, method="posterior_sample",
                        rngs={"sample": jax.random.fold_in(key, 1)})
        recons = sampling.sample(model, variables, jax.random.fold_in(key, 2),
                                 len(originals), fixed={"latents": z})
        paths.append(os.path.join(workdir, f"reconstructions_{step:08d}.png"))
        images.append(viz.reconstruction_grid(originals, np.asarray(recons), levels))
    if jax.process_index() == 0:
        for path, image in zip(paths, images, strict=True):
            viz.save_png(path, image)


def load_for_sampling(config: ml_collections.ConfigDict, workdir: str):
    """(trainer, variables with the EMA parameters) of the newest readable checkpoint.

    Raises:
      FileNotFoundError: no checkpoint in the workdir.
      ValueError: the workdir holds a run of another model than ``config``'s.
    """
    trainer = Trainer(config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not os.path.exists(
            os.path.join(workdir, checkpointing.RUN_FILE)):
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}; train first with "
                                f"launch/main.py --workdir={workdir}")
    checkpointing.check_run_file(workdir, run_record(config, trainer.info))
    ckpt = checkpointing.Checkpointer(ckpt_dir, config.keep_checkpoints)
    try:
        restored = ckpt.restore(trainer.init_state(jax.random.key(0)), data_iterator=None)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}; train first with "
                                f"launch/main.py --workdir={workdir}")
    state, step = restored
    logging.info("restored step %d from %s", step, ckpt_dir)
    return trainer, {"params": state.ema_params, **state.model_state}


def run_record(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> dict:
    """What a workdir's checkpoints are of; see ``checkpointing.check_run_file``."""
    return {"model": config.model.to_dict(), "data_name": info.name,
            "image_shape": info.image_shape, "num_levels": info.num_levels}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming what is there) and evaluates it.

    Every process of a multi-process run calls it with the same arguments; only
    process 0 writes metrics and images, all take part in checkpoint saves.

    Returns:
      The final evaluation over the whole eval split (names as in metrics.jsonl).

    Raises:
      distributed.Preempted: SIGTERM or SIGINT arrived; a complete checkpoint of the
        step reached was written first, and the next call resumes from it.
      checkpointing.CheckpointError: a save failed (the last good checkpoint is kept),
        or no checkpoint in the workdir could be read.
    """
    with distributed.StopRequest() as stop:
        _check_workdir(workdir)
        trainer = Trainer(config)
        info = trainer.info
        checkpointing.check_run_file(workdir, run_record(config, info))
        keys = jax.random.split(jax.random.key(config.seed), 3)  # train, eval, image

        data_iter = data.train_iterator(
            config.data, config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=config.data.worker_count)
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          config.keep_checkpoints)
        writer = MetricWriter(workdir)
        try:
            return _train_loop(config, workdir, trainer, data_iter, ckpt, writer, stop, keys)
        finally:
            try:
                ckpt.close()  # Waits until the saves in flight are durable.
            finally:
                writer.close()


def _train_loop(config, workdir, trainer, data_iter, ckpt, writer, stop, keys):
    train_key, eval_key, image_key = keys
    state = trainer.init_state(train_key)
    restored = ckpt.restore(state, data_iter, set_aside_unreadable=True)
    start, total = 0, config.num_train_steps
    if restored is not None:
        state, start = restored
        logging.info("resumed from step %d in %s", start, workdir)
    # Records past the checkpoint (all of them, if a run was killed before its first
    # checkpoint) are recomputed exactly by this run.
    writer.truncate_after(start)
    if start >= total:
        finished = _final_eval_record(workdir, start)
        if finished is not None:  # A finished run: report it, write nothing again.
            logging.info("workdir %s already holds the final eval at step %d", workdir, start)
            return finished
    schedule = learning_rate_schedule(config)
    tick, tick_step = time.time(), start
    for step in range(start, total):
        state, metrics = trainer.train_step(state, trainer.put(next(data_iter))["image"])
        done = step + 1
        if done % config.log_every_steps == 0 or done == total:
            metrics = jax.device_get(metrics)
            now = time.time()
            sps = (done - tick_step) / max(now - tick, 1e-9)
            metrics["train/steps_per_sec"] = sps
            metrics["train/learning_rate"] = schedule(step)
            writer.write(done, "train", metrics)
            logging.info("step %d/%d  loss %.3f  (recon %.3f, kl %.3f)  %.2f steps/s  "
                         "ETA %s", done, total, metrics["train/loss"],
                         metrics["train/recon"], metrics["train/kl"], sps,
                         _format_eta((total - done) / max(sps, 1e-9)))
            tick, tick_step = now, done
            if int(state.nonfinite_run) >= config.max_consecutive_nonfinite_steps:
                raise FloatingPointError(
                    f"{int(state.nonfinite_run)} consecutive steps up to step {done} had a "
                    f"non-finite loss or gradient and were skipped; stopping. The last "
                    f"good checkpoint (step {ckpt.complete_step}) is kept in {workdir}. "
                    "Lower learning_rate or set grad_clip_norm.")
        if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total:
            writer.write(done, "eval", trainer.evaluate(
                state, eval_key, config.num_eval_batches))
        if config.image_every_steps and done % config.image_every_steps == 0:
            _write_images(trainer, state, image_key, workdir, done)
        if done % config.checkpoint_every_steps == 0 or done == total:
            ckpt.save(done, state, data_iter)
        ckpt.check()  # A failed save stops the run now, not hours later.
        if stop.poll(trainer.batch_sharding):
            _stop(ckpt, stop, workdir, done, state, data_iter)
    # A stop during the last steps: their checkpoint is written, the final eval can wait.
    if stop.now(trainer.batch_sharding):
        _stop(ckpt, stop, workdir, total, state, data_iter)
    final = writer.write(int(state.step), "eval", trainer.evaluate(state, eval_key))
    logging.info("final eval at step %d: %s", int(state.step), final)
    if not config.image_every_steps or int(state.step) % config.image_every_steps:
        _write_images(trainer, state, image_key, workdir, int(state.step))
    return final


def _stop(ckpt, stop, workdir, step, state, data_iter):
    """Saves ``step`` (unless just saved), waits until it is durable, raises Preempted."""
    if ckpt.saved_step != step:
        ckpt.save(step, state, data_iter)
    ckpt.wait()
    raise distributed.Preempted(stop.signal_name or "another process's stop request",
                                step, workdir)


def _final_eval_record(workdir: str, step: int) -> dict[str, float] | None:
    """The eval metrics logged at ``step`` (the last step) by a run that finished."""
    if not os.path.exists(os.path.join(workdir, METRICS_FILE)):
        return None
    records = [r for r in read_metrics(workdir) if r["split"] == "eval" and r["step"] == step]
    if not records:
        return None
    return {k: v for k, v in records[-1].items() if k not in ("step", "split")}


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
