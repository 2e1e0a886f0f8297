import subprocess

import pytest

from pvae_jax import native
from pvae_jax.nn import cpu_kernels


def test_a_fresh_cache_builds_the_library_once(tmp_path):
    library = native.build(cpu_kernels._SOURCE, native.compiler(), tmp_path)
    assert library.parent == tmp_path and library.stat().st_size > 0
    assert library.name.startswith("cpu_kernels-")
    # Built once: a second call finds it, and no temporary file is left behind.
    assert native.build(cpu_kernels._SOURCE, native.compiler(), tmp_path) == library
    assert [p.name for p in tmp_path.iterdir()] == [library.name]
    # Other flags are another library.
    other = native.build(cpu_kernels._SOURCE, native.compiler(), tmp_path, ("-DPVAE_X=1",))
    assert other != library and other.exists()


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    source = tmp_path / "broken.cc"
    source.write_text("this is not C++\n")
    cache = tmp_path / "cache"
    with pytest.raises(subprocess.CalledProcessError) as e:
        native.build(source, native.compiler(), cache)
    assert "broken.cc" in e.value.stderr
    assert list(cache.iterdir()) == []


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_VAR, str(tmp_path))
    assert native.cache_dir() == tmp_path
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert native.compiler() is None


def test_cpu_cores_are_the_affinity_else_the_count_and_at_least_one(monkeypatch):
    monkeypatch.setattr(native.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert native.cpu_cores() == 3

    def unsupported(pid):
        raise OSError("no affinity here")

    monkeypatch.setattr(native.os, "sched_getaffinity", unsupported, raising=False)
    monkeypatch.setattr(native.os, "cpu_count", lambda: 6)
    assert native.cpu_cores() == 6
    monkeypatch.setattr(native.os, "cpu_count", lambda: None)
    assert native.cpu_cores() == 1
