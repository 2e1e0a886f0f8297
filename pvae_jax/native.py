"""C and C++ sources of this package compiled on first use, cached per machine.

``build(source, flags)`` compiles one source with the machine's C++ compiler
(``$CXX``, else ``c++``) into a shared library in ``$PVAE_JAX_CACHE`` (default
``~/.cache/pvae_jax``), once per source text, flags, compiler, jaxlib version (whose
XLA FFI headers it is compiled against) and CPU model (what ``-march=native`` depends
on). Users: the convolution kernels of ``nn/cpu_kernels.py`` and the allocator of
``runtime.py``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

CACHE_VAR = "PVAE_JAX_CACHE"


def cpu_cores() -> int:
    """The CPUs this process may run on (its affinity where the OS reports one), at least
    1: what ``runtime.use_cpu_cores_as_devices`` splits into devices and the compiled
    kernels divide among them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compiler() -> str | None:
    """The C++ compiler to build with, or None where there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VAR, Path.home() / ".cache" / "pvae_jax"))


def _cpu_model() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


def build(source: Path, compiler: str, cache_dir: Path, flags: tuple[str, ...] = ()
          ) -> Path:
    """The shared library of ``source``, compiled with ``-O3`` and ``flags`` unless
    ``cache_dir`` already has it.

    Raises:
      subprocess.CalledProcessError: the compiler failed (its output in ``stderr``).
      OSError: ``cache_dir`` cannot be written.
    """
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([
        text, jaxlib.__version__.encode(), compiler.encode(), _cpu_model().encode(),
        platform.machine().encode(), *(f.encode() for f in flags)])).hexdigest()[:16]
    library = cache_dir / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Compiled under a temporary name and renamed: processes building at once (test
    # workers, hosts sharing a home directory) each see a whole file or none.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, "-O3", *flags, "-std=c++17", "-shared", "-fPIC",
             f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp],
            check=True, capture_output=True, text=True)
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library
