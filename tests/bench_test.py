"""Tests of the benchmark's JSON schema, in process and through launch/bench.py.

Only the schema and the relations between numbers are checked: speed itself is never
asserted by a test.
"""

import json
import math
import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from pvae_jax import bench, models, native, runtime, train
from pvae_jax.nn import cpu_kernels

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_POSITIVE = ("setup_seconds", "first_batch_seconds", "train_seconds", "train_steps_per_sec",
             "train_cpu_seconds_per_step",
             "train_images_per_sec", "eval_seconds", "eval_images_per_sec", "peak_rss_bytes",
             "num_params")
_CONTEXT = ("config_name", "config", "model_name", "dataset_name", "batch_size",
            "eval_batch_size", "image_shape", "num_levels", "worker_count", "device_platform",
            "device_kind", "device_count", "local_device_count", "process_count",
            "jax_version", "cpu_kernels", "block_cache", "python_version", "cpu_count",
            "cpu_affinity_count", "machine",
            "timestamp", "num_steps", "warmup_steps", "num_eval_batches",
            "device_memory_stats", "model_flops_per_image", "train_gflops_per_sec",
            "input_wait_fraction", "compile_seconds", "train_loss_last")


def _config():
    config = tiny.get_config()
    config.eval_batch_size = 100
    return config


def _check_schema(result, config, num_steps, num_eval_batches, device_count):
    assert set(_POSITIVE + _CONTEXT) <= set(result), set(_POSITIVE + _CONTEXT) - set(result)
    for key in _POSITIVE:
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    for key in ("train_step", "eval_step"):
        value = result["compile_seconds"][key]
        assert math.isfinite(value) and value > 0, (key, value)
    assert 0.0 <= result["input_wait_fraction"] <= 1.0
    assert result["cpu_kernels"] is True  # the tests run on the CPU, with a compiler
    assert isinstance(result["block_cache"], bool)  # pytest does not preload it
    assert result["train_page_faults_per_step"] >= 0
    steal = result["train_steal_seconds_per_step"]
    assert steal is None or (math.isfinite(steal) and steal >= 0)
    assert math.isfinite(result["train_loss_last"])
    assert math.isclose(result["train_images_per_sec"],
                        result["train_steps_per_sec"] * config.batch_size, rel_tol=1e-9)
    assert math.isclose(result["train_steps_per_sec"],
                        num_steps / result["train_seconds"], rel_tol=1e-9)
    steps = result["train_step_seconds"]
    assert len(steps) == num_steps and all(t > 0 for t in steps)
    assert math.isclose(math.fsum(steps), result["train_seconds"], rel_tol=1e-9)
    per_step = result["train_images_per_sec_per_step"]
    assert 0 < per_step["min"] <= per_step["median"] <= per_step["max"]
    # The mean rate lies between the slowest and the fastest step's.
    assert per_step["min"] * (1 - 1e-9) <= result["train_images_per_sec"]
    assert result["train_images_per_sec"] <= per_step["max"] * (1 + 1e-9)
    assert math.isclose(result["eval_images_per_sec"],
                        num_eval_batches * config.eval_batch_size / result["eval_seconds"],
                        rel_tol=1e-9)
    flops = result["model_flops_per_image"]
    if flops is None:
        assert result["train_gflops_per_sec"] is None
    else:
        assert math.isfinite(flops) and flops > 0
        assert math.isclose(result["train_gflops_per_sec"],
                            flops * result["train_images_per_sec"] / 1e9, rel_tol=1e-9)
    stats = result["device_memory_stats"]
    assert stats is None or all(isinstance(v, int) for v in stats.values())
    assert result["batch_size"] == config.batch_size
    assert result["model_name"] == config.model.name
    assert result["config"]["batch_size"] == config.batch_size
    assert result["image_shape"] == [28, 28, 1]
    assert result["num_levels"] == 2
    assert result["device_count"] == device_count
    assert result["num_steps"] == num_steps
    assert result["num_eval_batches"] == num_eval_batches
    assert isinstance(result["num_params"], int)
    assert isinstance(result["machine"]["processor"], str)
    # What the launcher writes must survive a JSON round trip unchanged.
    assert json.loads(json.dumps(result)) == result


def test_processor_names_the_first_cores_model(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {}\n" \
            "model name\t: AMD EPYC Processor\n\n"
    cpuinfo.write_text(block.format(0, 1) + block.format(1, 17))
    assert bench._processor(str(cpuinfo)) == "AMD EPYC Processor, family 25, model 1"
    # Without a model name (or without the file) it falls back to platform.processor().
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert bench._processor(str(cpuinfo)) == platform.processor()
    assert bench._processor(str(tmp_path / "missing")) == platform.processor()


def test_steal_seconds_read_the_steal_column(tmp_path):
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  3880128 0 417349 4414907 2538 0 869 {7 * hz} 0 0\ncpu0 1 2 3\n")
    assert bench._steal_seconds(str(stat)) == 7.0
    # A kernel without the column (before 2.6.11), and no file at all: unknown.
    stat.write_text("cpu  3880128 0 417349 4414907 2538 0 869\n")
    assert bench._steal_seconds(str(stat)) is None
    assert bench._steal_seconds(str(tmp_path / "missing")) is None


def test_run_benchmark_schema():
    config = _config()
    result = bench.run_benchmark(config, num_steps=3, warmup_steps=1, num_eval_batches=2,
                                 config_name="configs/tiny.py")
    _check_schema(result, config, num_steps=3, num_eval_batches=2,
                  device_count=jax.device_count())
    assert result["config_name"] == "configs/tiny.py"


def test_train_flops_count_the_compiled_kernels(monkeypatch):
    # XLA counts nothing for the kernel gradients' custom calls: the count must be that
    # of the same step on XLA's own gradients, as a process without the kernels has it.
    config = _config()
    trainer = train.Trainer(config)
    state = trainer.init_state(jax.random.key(0))
    image = jnp.zeros((config.batch_size, 28, 28, 1), jnp.uint8)
    compiled = trainer.train_step.lower(state, image).compile()
    assert "pvae_kernel_gradient" in compiled.as_text()
    as_run = bench._cost_flops(compiled) * trainer.mesh.size
    counted = bench._train_flops(trainer, state, image)
    monkeypatch.setattr(cpu_kernels, "registered", lambda: False)
    without = train.Trainer(config)
    want = bench._cost_flops(without.train_step.lower(state, image).compile())
    assert counted == want * without.mesh.size > as_run


@pytest.mark.parametrize("kwargs", [{"num_steps": 0}, {"warmup_steps": -1},
                                    {"num_eval_batches": 0}])
def test_run_benchmark_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError, match="num_steps >= 1"):
        bench.run_benchmark(_config(), **kwargs)


def test_launcher_writes_json(tmp_path):
    output = tmp_path / "out" / "bench.json"
    # XLA:CPU spends most of this test compiling (the init's threefry draws alone take
    # ~15 s at the default level); only the schema is checked, so compile cheaply.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "launch", "bench.py"),
         "--config=" + os.path.join(_ROOT, "configs", "tiny.py"), f"--output={output}",
         "--num_steps=2", "--warmup_steps=0", "--num_eval_batches=1", "--cpu_devices=2",
         "--config.batch_size=4", "--config.eval_batch_size=100"],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(output.read_text())
    assert json.loads(proc.stdout) == result
    assert sorted(os.listdir(output.parent)) == ["bench.json"]  # No temporary file left.
    config = _config()
    config.batch_size = 4
    # --cpu_devices splits only a CPU backend; an accelerator host keeps its devices.
    devices = 2 if result["device_platform"] == "cpu" else result["local_device_count"]
    _check_schema(result, config, num_steps=2, num_eval_batches=1, device_count=devices)
    assert result["config_name"].endswith("configs/tiny.py")
    # The launcher restarted with the block cache, where it applies.
    script = os.path.join(_ROOT, "launch", "bench.py")
    assert result["block_cache"] is (runtime.malloc_tuning_env(env, script) is not None
                                     and native.compiler() is not None
                                     and not env.get("LD_PRELOAD"))


def test_launcher_reports_bad_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "launch", "bench.py"),
         "--config=" + os.path.join(_ROOT, "configs", "tiny.py"),
         f"--output={tmp_path / 'bench.json'}", "--cpu_devices=2",
         "--config.data.name=no_such_dataset"],
        cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "'no_such_dataset' is not a known dataset" in proc.stderr
    assert not os.listdir(tmp_path)


def test_sampling_benchmark_times_all_three_and_compares_the_images():
    config = _config()
    config.data.image_size = 6  # 36 sub-pixels keep the reference sampler quick.
    result = bench.run_sampling_benchmark(config, num_samples=4, reference_samples=2)
    for key in ("forward_seconds", "fast_seconds", "reference_seconds",
                "forward_first_call_seconds", "fast_first_call_seconds"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["reference_scaled"] and result["reference_samples"] == 2
    assert math.isclose(result["fast_over_forward"],
                        result["fast_seconds"] / result["forward_seconds"], rel_tol=1e-9)
    assert math.isclose(result["reference_over_fast"],
                        result["reference_seconds"] / result["fast_seconds"], rel_tol=1e-9)
    assert result["fast_equals_reference"] is True
    assert result["image_shape"] == [6, 6, 1]
    with pytest.raises(ValueError, match="num_samples"):
        bench.run_sampling_benchmark(config, num_samples=0)


class _Pointwise(nn.Module):
    """One bias-free 1x1 convolution (a dense layer over channels), the loss a slice."""

    features: int

    @nn.compact
    def __call__(self, x_BxHxWxC, train=False):
        del train
        y = nn.Conv(self.features, (1, 1), use_bias=False)(x_BxHxWxC.astype(jnp.float32))
        return {"loss": y[:, 0, 0, 0]}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_forward_flops_match_the_closed_form_at_any_batch(batch_size):
    H, W, C, F = 6, 5, 3, 8
    flops = bench.forward_flops(_Pointwise(F), (H, W, C), batch_size)
    # A multiply-add per input channel and output feature at every pixel, plus the
    # uint8 -> float32 conversion of every sub-pixel; nothing is done per batch.
    assert flops == {"per_image": 2 * H * W * C * F + H * W * C, "per_batch_fixed": 0}


def test_run_flops_needs_no_data_and_scales_with_the_model():
    config = _config()
    config.data.name = "binarized_mnist"  # A TFDS dataset nobody has prepared here.
    small = bench.run_flops(config, batch_size=2, config_name="tiny")
    config.model.num_pixel_layers += 2
    big = bench.run_flops(config, batch_size=2)
    assert small["config_name"] == "tiny" and small["image_shape"] == [28, 28, 1]
    assert 0 < small["forward_flops_per_image"] < big["forward_flops_per_image"]
    model = models.build(config.model, (28, 28, 1), 2)
    # Neither part depends on the batch it was compiled for.
    flops = bench.forward_flops(model, (28, 28, 1), 3)
    assert flops["per_image"] == big["forward_flops_per_image"]
    # Weight normalisation is work on the parameters alone, paid once per batch.
    assert flops["per_batch_fixed"] == big["forward_flops_per_batch_fixed"] > 0
    assert json.loads(json.dumps(big)) == big
    with pytest.raises(ValueError, match="batch_size"):
        bench.forward_flops(model, (28, 28, 1), 0)


def test_launcher_flops_mode(tmp_path):
    output = tmp_path / "flops.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "launch", "bench.py"),
         "--config=" + os.path.join(_ROOT, "configs", "tiny.py"), f"--output={output}",
         "--flops", "--flops_batch_size=2", "--cpu_devices=2"],
        cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["forward_flops_per_image"] > 0 and result["batch_size"] == 2
    proc = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "launch", "bench.py"),
         "--config=" + os.path.join(_ROOT, "configs", "tiny.py"),
         f"--output={tmp_path / 'x.json'}", "--flops", "--sampling"],
        cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "pick one of" in proc.stderr


def test_launcher_modes_iwae_and_pyramid_need_what_they_need(tmp_path):
    base = [sys.executable, os.path.join(_ROOT, "launch", "bench.py")]
    # Both modes at once, and a config-less mode other than --pyramid_vs_single, are
    # refused before anything runs.
    for args in (["--iwae", "--pyramid_vs_single"], ["--iwae"]):
        proc = subprocess.run(base + args + [f"--output={tmp_path / 'x.json'}"], cwd=_ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode != 0 and not os.listdir(tmp_path), proc.stderr[-2000:]
    output = tmp_path / "iwae.json"
    proc = subprocess.run(
        base + ["--config=" + os.path.join(_ROOT, "configs", "tiny.py"), "--iwae",
                "--iwae_samples=50", "--chunk_size=25", f"--output={output}"],
        cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["num_samples"] == 50 and result["chunk_size"] == 25
    assert result["iwae_samples_per_sec"] > 0 and result["forward_images_per_sec"] > 0
