"""Tests of the training loop: resume == uninterrupted, skipped non-finite steps,
metrics, images, and the bad-input messages."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from pvae_jax import train
from pvae_jax.metrics import read_metrics


def _config(**overrides):
    config = tiny.get_config()
    config.num_image_samples = 0
    config.eval_batch_size = 500
    config.num_eval_batches = 1
    config.update_from_flattened_dict(overrides)
    return config


def _final_params(workdir):
    path = os.path.join(workdir, "checkpoints")
    with ocp.CheckpointManager(path, item_names=("state", "data")) as manager:
        restored = manager.restore(manager.latest_step(),
                                   args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state


def _train_records(workdir):
    return [r for r in read_metrics(workdir) if r["split"] == "train"]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "train/steps_per_sec"} for r in records]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = _config()
    whole = str(tmp_path / "whole")
    train.train_and_evaluate(config, whole)
    split = str(tmp_path / "split")
    first = _config(num_train_steps=3)
    train.train_and_evaluate(first, split)
    assert os.listdir(os.path.join(split, "checkpoints")) == ["3"]
    final = train.train_and_evaluate(config, split)

    a, b = _final_params(whole), _final_params(split)
    assert int(a["step"]) == int(b["step"]) == config.num_train_steps
    for key in ("params", "opt_state", "ema_params", "rng"):
        jax.tree.map(np.testing.assert_array_equal, a[key], b[key])
    # The interrupted run also logged its last step (3); every step both logged agrees.
    whole_records = _without_timing(_train_records(whole))
    split_records = [r for r in _without_timing(_train_records(split)) if r["step"] != 3]
    assert [r["step"] for r in whole_records] == [2, 4, 6]
    assert whole_records == split_records
    evals = [r for r in read_metrics(split) if r["split"] == "eval"]
    # The first run's final eval at step 3 stays; the resumed run adds its own.
    assert [r["step"] for r in evals] == [3, 6]
    assert final["eval/nll_bound"] == evals[-1]["eval/nll_bound"]


def test_run_writes_metrics_images_and_a_sane_evaluation(tmp_path):
    config = _config(num_image_samples=4)
    workdir = str(tmp_path)
    final = train.train_and_evaluate(config, workdir)
    records = read_metrics(workdir)
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [2, 4, 6]
    for name in ("train/loss", "train/grad_norm", "train/steps_per_sec", "train/kl_weight"):
        assert all(name in r for r in records if r["split"] == "train")
    assert final["eval/num_examples"] == 1000  # The final eval covers the whole split.
    assert final["eval/nll_bound"] == pytest.approx(final["eval/recon"] + final["eval/kl"],
                                                    rel=1e-5)
    assert final["eval/kl_level_0"] == pytest.approx(final["eval/kl"], rel=1e-6)
    assert final["eval/bits_per_dim"] == pytest.approx(
        final["eval/nll_bound"] / (28 * 28 * np.log(2)), rel=1e-6)
    assert 0 < final["eval/nll_bound"] < 28 * 28 * np.log(2) * 1.5
    pngs = sorted(f for f in os.listdir(workdir) if f.endswith(".png"))
    assert pngs == ["reconstructions_00000006.png", "samples_00000006.png"]
    # Running a finished workdir again reports its final eval and writes nothing.
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    assert train.train_and_evaluate(config, workdir) == final
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_non_finite_step_is_skipped_and_counted():
    config = _config()
    trainer = train.Trainer(config)
    state = trainer.init_state(jax.random.key(0))
    good = jnp.asarray(np.random.default_rng(0).integers(0, 2, (8, 28, 28, 1)), jnp.float32)
    bad = good.at[3, 5, 5, 0].set(jnp.nan)
    before = jax.device_get(state)
    state, metrics = trainer.train_step(state, bad)
    assert not np.isfinite(metrics["train/loss"])
    after = jax.device_get(state)
    assert int(after.step) == 1 and int(after.nonfinite_total) == 1
    assert int(after.nonfinite_run) == 1
    for key in ("params", "opt_state", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, getattr(before, key), getattr(after, key))
    state, metrics = trainer.train_step(state, good)
    assert np.isfinite(metrics["train/loss"])
    assert int(state.nonfinite_run) == 0 and int(state.nonfinite_total) == 1
    changed = jax.tree.map(lambda x, y: bool(np.any(x != y)), before.params,
                           jax.device_get(state.params))
    assert any(jax.tree.leaves(changed))


def test_a_run_of_non_finite_steps_stops_training(tmp_path, monkeypatch):
    config = _config(max_consecutive_nonfinite_steps=2, log_every_steps=1)
    real_iterator = train.data.train_iterator

    def poisoned(*args, **kwargs):
        for batch in real_iterator(*args, **kwargs):
            yield {**batch, "image": np.full(batch["image"].shape, np.nan, np.float32)}

    monkeypatch.setattr(train.data, "train_iterator", poisoned)
    with pytest.raises(FloatingPointError, match="2 consecutive steps"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def test_kl_warmup_and_ema_schedule():
    assert float(train.kl_weight(0, 0)) == 1.0
    # One warm-up per level: each level ramps on its own, 0 meaning none.
    np.testing.assert_allclose(train.kl_weight(1, (4, 0, 2)), [0.5, 1.0, 1.0])
    assert train.kl_weight(1, (4, 0, 2)).shape == (3,)
    np.testing.assert_allclose([float(train.kl_weight(s, 4)) for s in range(6)],
                               [0.25, 0.5, 0.75, 1, 1, 1])
    assert float(train.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(train.ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)


def test_bad_input_stops_before_training(tmp_path):
    with pytest.raises(ValueError, match="model.name must be one of"):
        train.train_and_evaluate(_config(**{"model.name": "pixelgan"}), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="name"):
        train.train_and_evaluate(_config(**{"data.name": "imagenet1k"}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="batch_size=7 does not divide by the 2 devices"):
        train.train_and_evaluate(_config(batch_size=7), str(tmp_path / "c"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is not writable"):
        train.train_and_evaluate(_config(), str(blocker / "run"))


def test_workdir_of_another_model_is_left_untouched(tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(_config(num_train_steps=3), workdir)
    snapshot = {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)}
    metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
    other = _config(**{"model.name": "gated_pixelvae"})
    with pytest.raises(ValueError, match="another configuration.*model"):
        train.train_and_evaluate(other, workdir)
    assert {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)} == \
        snapshot
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
    assert json.load(open(os.path.join(workdir, "run.json")))["model"]["name"] == "gated_noup"


def test_unreadable_latest_checkpoint_resumes_from_the_one_before(tmp_path, caplog):
    config = _config()
    workdir = str(tmp_path)
    train.train_and_evaluate(config, workdir)
    uninterrupted = _final_params(workdir)
    # A checkpoint cut short (a disk filling up under it, a copy interrupted).
    state_dir = os.path.join(workdir, "checkpoints", "6", "state")
    files = [os.path.join(r, n) for r, _, names in os.walk(state_dir) for n in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    with open(largest, "rb") as f:
        evidence = f.read()

    final = train.train_and_evaluate(config, workdir)
    assert "checkpoint of step 6" in caplog.text and "cannot be restored" in caplog.text
    # The bad checkpoint is kept for inspection, out of the way of the new step 6.
    kept = os.path.join(workdir, "checkpoints_unreadable", "6", "state",
                        os.path.relpath(largest, state_dir))
    with open(kept, "rb") as f:
        assert f.read() == evidence
    resumed = _final_params(workdir)
    for key in ("params", "opt_state", "ema_params", "rng", "step"):
        jax.tree.map(np.testing.assert_array_equal, uninterrupted[key], resumed[key])
    evals = [r for r in read_metrics(workdir) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [6]  # The lost run's final eval was redone once.
    assert final["eval/nll_bound"] == evals[0]["eval/nll_bound"]


def test_eval_reports_each_factor_of_a_factorised_model():
    from configs import photo_auxiliary

    config = photo_auxiliary.get_config("tiny_grayscale")
    trainer = train.Trainer(config)
    state = trainer.init_state(jax.random.key(0))
    out = trainer.evaluate(state, jax.random.key(1), num_batches=1)
    assert out["eval/nll_grayscale"] > 0 and out["eval/nll_color"] > 0
    assert out["eval/nll_bound"] == pytest.approx(
        out["eval/nll_grayscale"] + out["eval/nll_color"], rel=1e-5)


def _sgd_step(config, trainer):
    # Plain SGD at rate 1, so params_before - params_after is the step's gradient.
    return jax.jit(functools.partial(train.train_step, model=trainer.model,
                                     tx=optax.sgd(1.0), config=config))


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_microbatches_give_the_gradient_of_the_whole_batch(num_microbatches):
    # gated_pixelcnn draws no noise, so the microbatched and whole-batch steps compute
    # the same sums in another order.
    image = jnp.asarray(np.random.default_rng(0).integers(0, 2, (8, 28, 28, 1)), jnp.uint8)
    results = []
    for num in (1, num_microbatches):
        config = _config(**{"model.name": "gated_pixelcnn", "num_microbatches": num,
                            "eval_batch_size": 8})
        trainer = train.Trainer(config)
        state = trainer.init_state(jax.random.key(0))
        step = _sgd_step(config, trainer)
        new_state, metrics = step(state, trainer.put({"image": image})["image"])
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                             jax.device_get(state.params), jax.device_get(new_state.params))
        batch = trainer.put({"image": image, "mask": np.array([1.0] * 6 + [0.0] * 2)})
        sums = trainer.eval_step(state.params, state.model_state, batch, jax.random.key(1))
        results.append((jax.device_get(metrics), grads, jax.device_get(sums)))
    (whole, whole_grads, whole_sums), (micro, micro_grads, micro_sums) = results
    assert micro_sums["count"] == whole_sums["count"] == 6
    np.testing.assert_allclose(micro_sums["nll_bound"], whole_sums["nll_bound"], rtol=1e-5)
    for key in ("train/loss", "train/recon", "train/grad_norm"):
        np.testing.assert_allclose(micro[key], whole[key], rtol=1e-5)
    assert whole["train/grad_norm"] > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 micro_grads, whole_grads)


def test_microbatches_cut_the_step_memory():
    # Each microbatch's backward pass must end before the next forward pass starts,
    # or XLA keeps every microbatch's activations alive at once.
    temps = {}
    for num in (1, 4):
        config = _config(batch_size=64, eval_batch_size=64, num_microbatches=num)
        trainer = train.Trainer(config)
        state = trainer.init_state(jax.random.key(0))
        image = trainer.put({"image": np.zeros((64, 28, 28, 1), np.uint8)})["image"]
        batch = {"image": image, "mask": trainer.put({"mask": np.ones(64)})["mask"]}
        compiled = [trainer.train_step.lower(state, image).compile(),
                    trainer.eval_step.lower(state.params, {}, batch, jax.random.key(1)).compile()]
        temps[num] = [c.memory_analysis().temp_size_in_bytes for c in compiled]
    assert temps[4][0] < 0.5 * temps[1][0], temps  # train step
    assert temps[4][1] < 0.5 * temps[1][1], temps  # eval step


def test_microbatches_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="num_microbatches=3 must be an int >= 1 that divides"):
        train.Trainer(_config(num_microbatches=3))
    with pytest.raises(ValueError, match="num_microbatches=0"):
        train.Trainer(_config(num_microbatches=0))
    config = _config(num_microbatches=2)
    trainer = train.Trainer(config)
    state = trainer.init_state(jax.random.key(0))
    state = state.replace(model_state={"batch_stats": {"mean": jnp.zeros(3)}})
    image = trainer.put({"image": np.zeros((8, 28, 28, 1), np.uint8)})["image"]
    with pytest.raises(ValueError, match="batch statistics"):
        trainer.train_step(state, image)
