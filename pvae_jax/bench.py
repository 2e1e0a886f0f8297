"""Throughput of one configuration's train and eval steps: ``run_benchmark(config)``.

Numbers come from the code paths a training run uses: ``train.Trainer``'s jitted
steps on the ``'data'`` mesh, fed by the real grain input pipeline
(``data.train_iterator``), with dispatch left asynchronous as in
``train.train_and_evaluate`` (one host sync at the end of the timed steps, none per
step). ``launch/bench.py`` writes the result as JSON; tests check its schema, never
its values.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pvae_jax import data, models, runtime, sampling, train
from pvae_jax.data import pipeline
from pvae_jax.nn import cpu_kernels


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _processor(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's model as the kernel names it (platform.processor() is empty on Linux).

    Family and model numbers are kept because virtual machines often report a generic
    name ("AMD EPYC Processor") for CPUs of different generations.
    """
    fields = {}
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if not line.strip():  # one block per core; the first is enough
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor()
    if "model name" not in fields:
        return platform.processor()
    return "{}, family {}, model {}".format(
        fields["model name"], fields.get("cpu family", "?"), fields.get("model", "?"))


def _steal_seconds(stat_path: str = "/proc/stat") -> float | None:
    """CPU time the hypervisor gave to others while this machine's vCPUs were ready to
    run, all vCPUs together, since boot (the ``steal`` column of ``/proc/stat``); None
    where the file or the column is missing (not Linux, or a kernel before 2.6.11)."""
    try:
        with open(stat_path) as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def _device_memory_stats(device) -> dict[str, int] | None:
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats:
        return None
    return {k: int(v) for k, v in stats.items() if isinstance(v, (int, np.integer))}


def _train_flops(trainer: train.Trainer, state, image) -> float | None:
    """FLOPs of one global train step from XLA's cost analysis, or None.

    The executable is the one the timed steps ran (jit's compilation cache makes this
    cheap), except where they ran the compiled CPU kernels: XLA counts nothing for a
    custom call, so the count is then of the same step traced and compiled afresh with
    XLA's own gradients (the same arithmetic). Under SPMD the cost analysis describes
    one device's partition, so it is scaled by the mesh size to cover the global batch.
    """
    if jax.default_backend() == "cpu" and cpu_kernels.enabled():
        with cpu_kernels.suspended():
            lowered = trainer.jit_train_step().lower(state, image)
    else:
        lowered = trainer.train_step.lower(state, image)
    flops = _cost_flops(lowered.compile())
    return None if flops is None else flops * trainer.mesh.size


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is optional on every backend.
        return None
    if isinstance(cost, (list, tuple)):  # Older JAX: one dict per partition.
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    if flops is None or not math.isfinite(flops) or flops <= 0:
        return None
    return float(flops)


def forward_flops(model, image_shape, batch_size: int = 8) -> dict[str, float] | None:
    """FLOPs of the forward pass from XLA's cost analysis, split into a per-image part
    and a part paid once per batch; None where the backend gives no count.

    The forward is ``model.apply(variables, x, train=False, rngs={'sample': key})`` on
    ``uint8 [B, *image_shape]``, lowered on abstract values from ``jax.eval_shape`` and
    compiled for one device at B = ``batch_size`` and ``2 * batch_size``: no parameters
    are drawn, no data read, nothing run. The difference of the two counts is the
    per-image cost times ``batch_size``; what is left is work on the parameters alone
    (e.g. weight normalisation), which a larger batch amortises. XLA counts a
    multiply-add as 2 FLOPs and an elementwise op as 1 per element, and counts what it
    compiles (masked kernels cropped to their taps), not textbook arithmetic.

    Args:
      model: any model of ``models.build`` (the contract's ``__call__``).
      image_shape: (H, W, C).
      batch_size: the smaller of the two compiled batches.

    Returns:
      ``{'per_image': ..., 'per_batch_fixed': ...}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    key = jax.random.key(0)
    example = jnp.zeros((1, *image_shape), jnp.uint8)
    variables = jax.eval_shape(
        lambda: model.init({"params": key, "sample": key}, example))
    key_spec = jax.ShapeDtypeStruct(key.shape, key.dtype)
    forward = jax.jit(lambda v, x, k: model.apply(v, x, train=False, rngs={"sample": k}))
    counts = []
    for b in (batch_size, 2 * batch_size):
        x = jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8)
        counts.append(_cost_flops(forward.lower(variables, x, key_spec).compile()))
    if None in counts:
        return None
    per_image = (counts[1] - counts[0]) / batch_size
    return {"per_image": per_image, "per_batch_fixed": counts[0] - batch_size * per_image}


def run_flops(config: ml_collections.ConfigDict, *, batch_size: int = 8,
              config_name: str | None = None) -> dict[str, Any]:
    """Forward FLOPs per image of ``config``'s model (see ``forward_flops``), with its
    parameter count, from the config alone: no data files, no training.

    Returns:
      A JSON-serialisable dict: ``forward_flops_per_image``,
      ``forward_flops_per_batch_fixed`` (None, None without a cost analysis),
      ``num_params``,
      ``image_shape``, ``num_levels``, ``batch_size`` (of the compiled forward) and
      context (config, model name, JAX version, device, timestamp).
    """
    image_shape, num_levels = pipeline.image_format(config.data)
    model = models.build(config.model, image_shape, num_levels)
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: model.init(
        {"params": key, "sample": key}, jnp.zeros((1, *image_shape), jnp.uint8)))["params"]
    flops = forward_flops(model, image_shape, batch_size) or {}
    device = jax.devices()[0]
    return {
        "config_name": config_name,
        "config": json.loads(config.to_json()),
        "model_name": config.model.name,
        "image_shape": list(image_shape),
        "num_levels": int(num_levels),
        "num_params": _num_params(params),
        "batch_size": int(batch_size),
        "forward_flops_per_image": flops.get("per_image"),
        "forward_flops_per_batch_fixed": flops.get("per_batch_fixed"),
        "device_platform": device.platform,
        "device_kind": device.device_kind,
        "jax_version": jax.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }


def _num_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def _context(config: ml_collections.ConfigDict, config_name: str | None,
             trainer: train.Trainer, num_params: int) -> dict[str, Any]:
    device = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "config_name": config_name,
        "config": json.loads(config.to_json()),
        "model_name": config.model.name,
        "dataset_name": trainer.info.name,
        "batch_size": int(config.batch_size),
        "eval_batch_size": int(config.eval_batch_size),
        "image_shape": list(trainer.info.image_shape),
        "num_levels": int(trainer.info.num_levels),
        "num_params": num_params,
        "worker_count": int(config.data.worker_count),
        "device_platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
        # Whether conv2d's kernel gradients ran on the compiled CPU kernel.
        "cpu_kernels": device.platform == "cpu" and cpu_kernels.enabled(),
        # Whether XLA's step buffers stayed mapped between steps (runtime.py).
        "block_cache": runtime.block_cache_loaded(),
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": affinity,
        "machine": {"system": platform.system(), "machine": platform.machine(),
                    "processor": _processor()},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    num_steps: int = 50,
    warmup_steps: int = 5,
    num_eval_batches: int = 5,
    config_name: str | None = None,
) -> dict[str, Any]:
    """Measures compile time, train and eval throughput and memory of ``config``.

    Runs one compiling train step, ``warmup_steps`` untimed steps, then ``num_steps``
    timed ones; then one compiling eval batch (the eval warm-up) and
    ``num_eval_batches`` timed ones (the eval split is cycled if it has fewer).
    Train batches come from ``data.train_iterator`` with ``config.seed`` and
    ``config.data.worker_count``; eval batches from ``Trainer.eval_data``.

    ``train_images_per_sec`` is the mean over the timed steps;
    ``train_images_per_sec_per_step`` gives the min, median and max of the per-step
    rates, each step timed from the previous step's completion to its own (the loop
    waits for step i - 1 after dispatching step i, so one step stays queued as in
    training); ``train_step_seconds`` lists those times in order, to tell warm-up or
    a stall from steady noise. ``train_cpu_seconds_per_step`` is the CPU time of the
    whole process (all threads, input pipeline included) per timed step: on a CPU host
    shared with other work it varies far less than the wall-clock rates, so compare
    variants by it there. ``train_page_faults_per_step`` counts the process's minor
    page faults (memory mapped afresh and touched; see ``runtime.MALLOC_ENV``).
    ``train_steal_seconds_per_step`` is the machine's steal time per timed step (see
    ``_steal_seconds``; None where the kernel does not report it): on a virtual machine,
    the share of the step the hypervisor ran other guests instead.
    ``input_wait_fraction`` is the share of the timed steps' wall time the
    host spent in ``next(data_iterator)`` and ``Trainer.put``. Dispatch is
    asynchronous, so that time may overlap the device's work on the running step: it
    bounds from above how much the input pipeline slows training.
    ``eval_images_per_sec`` counts every row of a batch, padding included (what the
    device computes). ``model_flops_per_image`` is XLA's count for the whole train
    step (forward, backward, optimiser, EMA), the compiled CPU kernels' share included
    (see ``_train_flops``). ``peak_rss_bytes`` is the process's peak up to the end of
    eval.

    Args:
      config: a full experiment config (as ``train.train_and_evaluate`` takes).
      num_steps: timed train steps (>= 1).
      warmup_steps: untimed train steps after the compiling one (>= 0).
      num_eval_batches: timed eval batches (>= 1).
      config_name: the config string it came from (e.g. 'configs/mnist.py:gated_noup'),
        recorded as context.

    Returns:
      A JSON-serialisable dict: the measurements (``compile_seconds``,
      ``train_images_per_sec``, ``train_images_per_sec_per_step``,
      ``train_step_seconds``,
      ``train_steps_per_sec``, ``train_cpu_seconds_per_step``,
      ``train_page_faults_per_step``, ``input_wait_fraction``,
      ``eval_images_per_sec``, ``model_flops_per_image``, ``train_gflops_per_sec``,
      ``peak_rss_bytes``, ``device_memory_stats``, ...) and the context (config,
      model, shapes, parameter count, devices, versions, timestamp).

    Raises:
      ValueError: a count out of range, or a bad config (as ``train.Trainer`` raises).
    """
    if num_steps < 1 or warmup_steps < 0 or num_eval_batches < 1:
        raise ValueError(
            f"need num_steps >= 1, warmup_steps >= 0 and num_eval_batches >= 1; got "
            f"{num_steps}, {warmup_steps} and {num_eval_batches}.")
    start = time.perf_counter()
    trainer = train.Trainer(config)
    train_key, eval_key, _ = jax.random.split(jax.random.key(config.seed), 3)
    state = trainer.init_state(train_key)
    num_params = _num_params(state.params)
    data_iter = data.train_iterator(
        config.data, config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count)
    setup_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    image = trainer.put(next(data_iter))["image"]
    first_batch_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, image)
    jax.block_until_ready((state, metrics))
    train_compile_seconds = time.perf_counter() - t0

    for _ in range(warmup_steps):
        state, metrics = trainer.train_step(state, trainer.put(next(data_iter))["image"])

    # Step i is timed from step i - 1's completion to its own. The loop waits for step
    # i - 1 only after dispatching step i, so one step stays queued behind the running
    # one, as in training, and the input of the next step is read while a step runs.
    # The clock starts when the last warm-up step completes.
    input_seconds = 0.0
    step_seconds = []
    last_done = None
    cpu_start, faults_start, steal_start = 0.0, 0, None
    for i in range(num_steps):
        t0 = time.perf_counter()
        image = trainer.put(next(data_iter))["image"]
        if i:
            input_seconds += time.perf_counter() - t0
        previous = metrics
        state, metrics = trainer.train_step(state, image)
        jax.block_until_ready(previous)
        done = time.perf_counter()
        if last_done is None:
            cpu_start = time.process_time()
            faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            steal_start = _steal_seconds()
        else:
            step_seconds.append(done - last_done)
        last_done = done
    jax.block_until_ready((state, metrics))
    step_seconds.append(time.perf_counter() - last_done)
    train_seconds = math.fsum(step_seconds)
    train_cpu_seconds = time.process_time() - cpu_start
    page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start
    steal_end = _steal_seconds()
    steal_seconds = (None if steal_start is None or steal_end is None
                     else steal_end - steal_start)
    last_loss = float(jax.device_get(metrics["train/loss"]))
    del data_iter  # Lets grain stop its worker processes, if any, before eval is timed.

    # Eval as Trainer.evaluate does it: batches placed on the mesh, sums added on device.
    eval_batches = itertools.cycle(trainer.eval_data)
    keys = [jax.random.fold_in(eval_key, i) for i in range(num_eval_batches + 1)]
    t0 = time.perf_counter()
    totals = trainer.eval_step(state.ema_params, state.model_state,
                               trainer.put(next(eval_batches)), keys[0])
    jax.block_until_ready(totals)
    eval_compile_seconds = time.perf_counter() - t0
    # Compiles the small adds of the sums too, so that no compile falls in the timing.
    jax.block_until_ready(jax.tree.map(jnp.add, totals, totals))
    t_start = time.perf_counter()
    for key in keys[1:]:
        sums = trainer.eval_step(state.ema_params, state.model_state,
                                 trainer.put(next(eval_batches)), key)
        totals = jax.tree.map(jnp.add, totals, sums)
    jax.block_until_ready(totals)
    eval_seconds = time.perf_counter() - t_start
    # Read before the FLOP count, whose compile (see _train_flops) is no part of
    # training.
    peak_rss_bytes = _peak_rss_bytes()
    device_memory_stats = _device_memory_stats(jax.devices()[0])
    flops_per_step = _train_flops(trainer, state, image)

    train_steps_per_sec = num_steps / train_seconds
    train_images_per_sec = train_steps_per_sec * config.batch_size
    per_step = config.batch_size / np.asarray(step_seconds)
    flops_per_image = None if flops_per_step is None else flops_per_step / config.batch_size
    return {
        **_context(config, config_name, trainer, num_params),
        "num_steps": num_steps,
        "warmup_steps": warmup_steps,
        "num_eval_batches": num_eval_batches,
        "setup_seconds": setup_seconds,
        "first_batch_seconds": first_batch_seconds,
        "compile_seconds": {"train_step": train_compile_seconds,
                            "eval_step": eval_compile_seconds},
        "train_seconds": train_seconds,
        "train_step_seconds": [float(t) for t in step_seconds],
        "train_steps_per_sec": train_steps_per_sec,
        "train_images_per_sec": train_images_per_sec,
        "train_images_per_sec_per_step": {"min": float(per_step.min()),
                                          "median": float(np.median(per_step)),
                                          "max": float(per_step.max())},
        "input_wait_fraction": min(1.0, input_seconds / train_seconds),
        "train_cpu_seconds_per_step": train_cpu_seconds / num_steps,
        "train_page_faults_per_step": page_faults / num_steps,
        "train_steal_seconds_per_step": (None if steal_seconds is None
                                         else steal_seconds / num_steps),
        "train_loss_last": last_loss,
        "eval_seconds": eval_seconds,
        "eval_images_per_sec": num_eval_batches * config.eval_batch_size / eval_seconds,
        "model_flops_per_image": flops_per_image,
        "train_gflops_per_sec": (None if flops_per_image is None
                                 else flops_per_image * train_images_per_sec / 1e9),
        "peak_rss_bytes": peak_rss_bytes,
        "device_memory_stats": device_memory_stats,
    }


def _timed(fn) -> tuple[Any, float, float]:
    """(result, seconds of the first call with compilation, seconds of a second call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return result, first, time.perf_counter() - start


def run_sampling_benchmark(
    config: ml_collections.ConfigDict,
    *,
    num_samples: int = 64,
    reference_samples: int | None = None,
    config_name: str | None = None,
) -> dict[str, Any]:
    """Seconds to draw ``num_samples`` images with the fast and the reference samplers,
    and for one teacher-forced forward pass of the same batch (fresh parameters: the
    cost does not depend on their values).

    The reference sampler runs one full pass per sub-pixel; ``reference_samples``
    (default ``num_samples``) can time it on fewer images, and its seconds are then
    scaled to ``num_samples`` linearly (reported as such). Both samplers are run on
    the same key and their images compared.
    """
    if num_samples < 1 or (reference_samples is not None and reference_samples < 1):
        raise ValueError("num_samples and reference_samples must be >= 1")
    reference_samples = reference_samples or num_samples
    trainer = train.Trainer(config)
    model = trainer.model
    state = trainer.init_state(jax.random.key(config.seed))
    variables = jax.device_get({"params": state.params, **state.model_state})
    key = jax.random.key(config.seed + 1)
    latents = model.apply(variables, num_samples, method="prior_sample", rngs={"sample": key})
    x = jnp.zeros((num_samples, *trainer.info.image_shape), jnp.uint8)
    forward = jax.jit(lambda v, x, z: model.apply(v, x, z, method="logits"))
    _, forward_first, forward_seconds = _timed(lambda: forward(variables, x, latents))
    fast_images, fast_first, fast_seconds = _timed(
        lambda: sampling.sample(model, variables, key, reference_samples, method="fast"))
    if reference_samples != num_samples:
        _, fast_first, fast_seconds = _timed(
            lambda: sampling.sample(model, variables, key, num_samples, method="fast"))
    # The reference is slow: it runs once, its few seconds of compilation included.
    start = time.perf_counter()
    reference_images = jax.block_until_ready(sampling.sample(
        model, variables, key, reference_samples, method="reference"))
    reference_seconds = (time.perf_counter() - start) * num_samples / reference_samples
    return {
        **_context(config, config_name, trainer, _num_params(state.params)),
        "num_samples": num_samples,
        "reference_samples": reference_samples,
        "forward_seconds": forward_seconds,
        "forward_first_call_seconds": forward_first,
        "fast_seconds": fast_seconds,
        "fast_first_call_seconds": fast_first,
        "reference_seconds": reference_seconds,
        "reference_scaled": reference_samples != num_samples,
        "fast_over_forward": fast_seconds / forward_seconds,
        "reference_over_fast": reference_seconds / fast_seconds,
        "fast_equals_reference": bool(np.array_equal(np.asarray(fast_images),
                                                      np.asarray(reference_images))),
        "peak_rss_bytes": _peak_rss_bytes(),
    }
