"""Tests of the launcher body: user errors become one line, bugs keep their traceback."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pvae_jax import native, runtime

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
    # The block cache is preloaded, unless the user preloads something already, and is
    # built only when it is preloaded.
    cache = tmp_path / "big_blocks.so"
    builds = []
    build = lambda: builds.append(1) or cache  # noqa: E731
    env = runtime.malloc_tuning_env({}, str(script), block_cache=build)
    assert env["LD_PRELOAD"] == str(cache) and builds == [1]
    env = runtime.malloc_tuning_env({"LD_PRELOAD": "/x/libtcmalloc.so"}, str(script),
                                    block_cache=build)
    assert env["LD_PRELOAD"] == "/x/libtcmalloc.so" and builds == [1]
    assert env["GLIBC_TUNABLES"] == runtime.MALLOC_TUNABLES
    assert runtime.malloc_tuning_env({"GLIBC_TUNABLES": ""}, str(script),
                                     block_cache=build) is None and builds == [1]
    # No library (no compiler, a failed build): the settings alone.
    assert "LD_PRELOAD" not in runtime.malloc_tuning_env({}, str(script),
                                                         block_cache=lambda: None)


_PROBE = """
import os, sys
from pvae_jax import runtime
print("start", flush=True)
runtime.reexec_with_malloc_tuning()
print(sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
print(runtime.block_cache_loaded(), os.environ.get("LD_PRELOAD"))
"""


def _run_probe(tmp_path, **env_vars):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
           and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", runtime.MALLOC_TUNING_VAR)}
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
    # With the block cache loaded, and LD_PRELOAD cleared for the processes it starts.
    assert lines[3] == f"{native.compiler() is not None} None"


def test_reexec_opt_out_keeps_the_process(tmp_path):
    lines = _run_probe(tmp_path, **{runtime.MALLOC_TUNING_VAR: "0"})
    assert lines == ["start", "['--flag=1', 'arg'] None", "False None"]


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is glibc's")
@pytest.mark.parametrize("block_cache", [False, True])
def test_compiler_memory_is_released_after_each_compile_only(monkeypatch, block_cache):
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    if block_cache:  # the block cache's idle blocks go first
        FakeLibc.pvae_release_idle_blocks = lambda self: calls.append(("idle",))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(runtime, "_trim_listener", None)
    try:
        assert runtime.release_compiler_memory()
        listener = runtime._trim_listener
        assert runtime.release_compiler_memory() and runtime._trim_listener is listener
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25).lower(jnp.ones(7)).compile()
        # A real compile reports the event we listen to.
        expected = [("idle",), ("trim", 0)] if block_cache else [("trim", 0)]
        assert calls and calls == expected * (len(calls) // len(expected))
        before = len(calls)
        jax.monitoring.record_event_duration_secs("/jax/some/other/event", 1.0)
        assert len(calls) == before
    finally:
        if runtime._trim_listener is not None:
            jax.monitoring.unregister_event_duration_listener(runtime._trim_listener)


_BLOCKS_PROBE = """
import ctypes, os, resource
import numpy as np
libc = ctypes.CDLL(None)
for name in ("malloc", "calloc", "realloc", "aligned_alloc"):
    getattr(libc, name).restype = ctypes.c_void_p
libc.malloc_usable_size.restype = ctypes.c_size_t
libc.malloc.argtypes = libc.malloc_usable_size.argtypes = [ctypes.c_size_t]
libc.calloc.argtypes = libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.pvae_release_idle_blocks.restype = ctypes.c_size_t
M = 100 << 20
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10

a = libc.malloc(M)
assert a % (2 << 20) == 0 and libc.malloc_usable_size(a) >= M
ctypes.memset(a, 7, M)
libc.free(a)
# Freed and asked for again: the same memory, touched with no page fault.
before = faults()
assert libc.malloc(M - 12345) == a
ctypes.memset(a, 1, M - 12345)
assert faults() - before < 16, faults() - before
libc.free(a)
# calloc of a used block clears it.
c = libc.calloc(M // 4, 4)
assert c == a and ctypes.string_at(c + M - 64, 64) == bytes(64)
ctypes.memset(c, 3, M)
# realloc keeps the contents, into a larger block, into glibc's memory and back.
d = libc.realloc(c, 3 * M)
assert ctypes.string_at(d + M - 4, 4) == b"\\3" * 4
e = libc.realloc(d, 1000)
assert ctypes.string_at(e, 1000) == b"\\3" * 1000
f = libc.realloc(e, 2 * M)
assert ctypes.string_at(f, 1000) == b"\\3" * 1000
libc.free(f)
# A request no idle block fits gives the idle ones back before mapping its own, and
# so does pvae_release_idle_blocks: what stays resident is what is in use.
h = libc.malloc(M)
ctypes.memset(h, 1, M)
libc.free(h)
resident = rss()
g = libc.aligned_alloc(64, 5 * M)
assert g % 64 == 0 and rss() < resident - M // 2
ctypes.memset(g, 1, M)
libc.free(g)
resident = rss()
assert libc.pvae_release_idle_blocks() >= 5 * M and rss() < resident - M // 2
# glibc's small and large allocations are untouched: numpy, and a child process.
x = np.ones(M // 8)
assert float((x * 2).sum()) == 2 * (M // 8)
pid = os.fork()
if pid == 0:
    p = libc.malloc(M); ctypes.memset(p, 5, M); libc.free(p)
    os._exit(0 if libc.malloc(M) == p else 1)
assert os.waitpid(pid, 0)[1] == 0
# Threads taking and freeing blocks at once never share one.
import threading, time
errors = []
def churn(tag):
    rng = np.random.default_rng(tag)
    for _ in range(30):
        n = int(rng.integers(32 << 20, 48 << 20))
        p = libc.malloc(n)
        ctypes.memset(p, tag, 4096)
        ctypes.memset(p + n - 4096, tag, 4096)
        time.sleep(0.002)  # for the other threads to take blocks meanwhile
        if ctypes.string_at(p, 4096) + ctypes.string_at(p + n - 4096, 4096) != bytes([tag]) * 8192:
            errors.append(tag)
        libc.free(p)
threads = [threading.Thread(target=churn, args=(t,)) for t in range(1, 5)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
import jax, jax.numpy as jnp
y = jax.jit(lambda v: jnp.cumsum(jnp.sin(v)) * 2.0)
v = jnp.arange(1 << 25, dtype=jnp.float32) / (1 << 20)
assert bool(jnp.array_equal(y(v), y(v)))
print("ok")
"""


@pytest.mark.skipif(not _GLIBC or native.compiler() is None,
                    reason="the block cache is built with a C++ compiler for glibc")
def test_the_block_cache_reuses_large_blocks_and_keeps_malloc_semantics(tmp_path):
    library = native.build(runtime._BLOCK_CACHE_SOURCE, native.compiler(), tmp_path)
    script = tmp_path / "blocks.py"
    script.write_text(_BLOCKS_PROBE)
    env = {**os.environ, "LD_PRELOAD": str(library), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["ok"], proc.stderr[-3000:]
