"""Tests of the launcher body: user errors become one line, bugs keep their traceback."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pvae_jax import runtime

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(pathname, level):
    return logging.LogRecord("absl", level, pathname, 1, "msg", None, None)


def test_user_errors_exit_with_one_line():
    def bad_config():
        raise ValueError("config.batch_size=7 does not divide by the 2 devices")

    with pytest.raises(SystemExit) as exit_info:
        runtime.run_launcher(bad_config, cpu_devices=2)
    assert str(exit_info.value.code) == (
        "error: config.batch_size=7 does not divide by the 2 devices")
    assert runtime.run_launcher(lambda: 42, cpu_devices=2) == 42


def test_bugs_are_not_swallowed():
    def bug():
        raise KeyError("params")

    with pytest.raises(KeyError):
        runtime.run_launcher(bug, cpu_devices=2)


def test_library_info_logs_are_dropped_but_warnings_kept():
    quiet = runtime._QuietLibraries()
    assert not quiet.filter(_record("/site-packages/orbax/checkpoint/x.py", logging.INFO))
    assert quiet.filter(_record("/site-packages/orbax/checkpoint/x.py", logging.WARNING))
    assert quiet.filter(_record("/work/pvae_jax/train.py", logging.INFO))


_GLIBC = runtime.on_glibc()


@pytest.mark.skipif(not _GLIBC, reason="the malloc settings are for glibc on Linux")
def test_malloc_tuning_applies_once_and_respects_the_user(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text("")
    env = runtime.malloc_tuning_env({"HOME": "/h"}, str(script))
    assert env is not None and env["HOME"] == "/h"
    assert {k: env[k] for k in runtime.MALLOC_ENV} == runtime.MALLOC_ENV
    # The re-executed process must not restart again.
    assert runtime.malloc_tuning_env(env, str(script)) is None
    assert runtime.malloc_tuning_env({runtime.MALLOC_TUNING_VAR: "0"}, str(script)) is None
    assert runtime.malloc_tuning_env({"MALLOC_ARENA_MAX": "4"}, str(script)) is None
    assert runtime.malloc_tuning_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                     str(script)) is None
    for not_a_script in ("", "-c", "-", str(tmp_path / "missing.py")):
        assert runtime.malloc_tuning_env({}, not_a_script) is None


_PROBE = """
import os, sys
from pvae_jax import runtime
print("start", flush=True)
runtime.reexec_with_malloc_tuning()
print(sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
"""


def _run_probe(tmp_path, **env_vars):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
           and k not in ("GLIBC_TUNABLES", runtime.MALLOC_TUNING_VAR)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), "--flag=1", "arg"],
                          env={**env, **env_vars}, capture_output=True, text=True,
                          timeout=120, check=True)
    return proc.stdout.splitlines()


@pytest.mark.skipif(not _GLIBC, reason="the malloc settings are for glibc on Linux")
def test_reexec_restarts_the_script_with_its_arguments_and_the_settings(tmp_path):
    lines = _run_probe(tmp_path)
    # Started twice (before and after the re-exec), with the same arguments.
    assert lines[:2] == ["start", "start"]
    assert lines[2] == f"['--flag=1', 'arg'] {runtime.MALLOC_TUNABLES}"


def test_reexec_opt_out_keeps_the_process(tmp_path):
    lines = _run_probe(tmp_path, **{runtime.MALLOC_TUNING_VAR: "0"})
    assert lines == ["start", "['--flag=1', 'arg'] None"]


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is glibc's")
def test_compiler_memory_is_released_after_each_compile_only(monkeypatch):
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(runtime, "_trim_listener", None)
    try:
        assert runtime.release_compiler_memory()
        listener = runtime._trim_listener
        assert runtime.release_compiler_memory() and runtime._trim_listener is listener
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25).lower(jnp.ones(7)).compile()
        assert calls and set(calls) == {0}  # A real compile reports the event we listen to.
        before = len(calls)
        jax.monitoring.record_event_duration_secs("/jax/some/other/event", 1.0)
        assert len(calls) == before
    finally:
        if runtime._trim_listener is not None:
            jax.monitoring.unregister_event_duration_listener(runtime._trim_listener)
