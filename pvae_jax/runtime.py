"""Process-level setup that must happen before the first JAX computation."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
from absl import logging as absl_logging

from pvae_jax import native
from pvae_jax.checkpointing import CheckpointError

# Libraries whose INFO records (a dozen lines per checkpoint) would drown the progress.
_CHATTY = ("/orbax/", "/grain/", "/jax/", "/tensorflow_datasets/")


# glibc malloc settings for XLA:CPU, read by glibc only when a process starts (hence
# the re-exec below). XLA:CPU allocates each step's temporaries as one block of
# hundreds of MB (341 MB per device for the MNIST gated PixelVAE at batch 100), far
# above glibc's mmap threshold (at most 32 MB), so every step maps fresh memory and
# takes a page fault per 4 KB page on first touch: 167k faults per step there.
# hugetlb=1 has malloc ask for transparent huge pages (madvise), which cut that to 1.1k
# faults per step and the step's CPU time by a sixth. One arena for XLA's worker
# threads, with mmap and trim thresholds raised so that buffers of a few MB stay in
# the heap between steps, lowered peak RSS by about 0.1 GB. The block cache
# (``big_blocks.cc``, preloaded with these settings where it builds) then keeps those
# blocks mapped from one step to the next, so that they take no fault at all.
MALLOC_TUNABLES = ":".join([
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.arena_max=1",
    f"glibc.malloc.mmap_threshold={32 << 20}",
    f"glibc.malloc.trim_threshold={512 << 20}",
])
MALLOC_ENV = {"GLIBC_TUNABLES": MALLOC_TUNABLES}
# Set to 0 to keep the allocator's defaults (no re-exec).
MALLOC_TUNING_VAR = "PVAE_JAX_MALLOC_TUNING"
# Set in the re-executed process, so that it never re-executes again.
_REEXECUTED_VAR = "PVAE_JAX_MALLOC_REEXECUTED"
# The block cache's library, in the re-executed process (which then takes it out of
# LD_PRELOAD, so that the processes it starts do not load it).
_PRELOADED_VAR = "PVAE_JAX_PRELOADED"
_BLOCK_CACHE_SOURCE = Path(__file__).with_name("big_blocks.cc")


def on_glibc() -> bool:
    """Linux with glibc, whose malloc the tunables and ``malloc_trim`` here are for."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def malloc_tuning_env(environ: Mapping[str, str] | None = None,
                      script: str | None = None,
                      block_cache: Callable[[], Path | None] | None = None
                      ) -> dict[str, str] | None:
    """The environment to re-execute this process with for ``MALLOC_ENV``, or None when
    it should run as it is.

    With ``block_cache`` (which builds the library of ``big_blocks.cc``, or gives None)
    that library is preloaded too, unless ``LD_PRELOAD`` is set already (another
    allocator, say: the user's choice wins); it is called only when the library would
    be used, so that nothing is built for nothing.

    None when: not Linux with glibc; ``PVAE_JAX_MALLOC_TUNING=0``; this process is
    already the re-executed one; the user set ``GLIBC_TUNABLES`` or any ``MALLOC_*``
    variable (their choice wins); or the process did not start from a script or module
    (``python -c``, a REPL, stdin), which could not be started again faithfully.

    Args:
      environ: the environment (default ``os.environ``).
      script: what started the process (default ``sys.argv[0]``).
    """
    environ = os.environ if environ is None else environ
    script = (sys.argv[0] if sys.argv else "") if script is None else script
    if not on_glibc():
        return None
    if environ.get(MALLOC_TUNING_VAR, "1") == "0" or environ.get(_REEXECUTED_VAR):
        return None
    if "GLIBC_TUNABLES" in environ or any(key.startswith("MALLOC_") for key in environ):
        return None
    if script in ("", "-", "-c") or not os.path.isfile(script):
        return None
    env = {**environ, **MALLOC_ENV, _REEXECUTED_VAR: "1"}
    library = None if block_cache is None or environ.get("LD_PRELOAD") else block_cache()
    if library is not None:
        env["LD_PRELOAD"] = env[_PRELOADED_VAR] = str(library)
    return env


def _block_cache_library() -> Path | None:
    """``big_blocks.cc`` built (``native.build``), or None without a compiler or where
    the build fails (logged): the process then runs with glibc's malloc alone."""
    compiler = native.compiler()
    if compiler is None:
        return None
    try:
        return native.build(_BLOCK_CACHE_SOURCE, compiler, native.cache_dir())
    except (OSError, subprocess.CalledProcessError) as e:
        logging.warning("pvae_jax: building the block cache failed, so glibc's malloc "
                        "alone is used: %s", getattr(e, "stderr", "") or e)
        return None


def block_cache_loaded() -> bool:
    """Whether this process runs with the block cache of ``big_blocks.cc``."""
    return on_glibc() and hasattr(ctypes.CDLL(None), "pvae_release_idle_blocks")


def reexec_with_malloc_tuning() -> None:
    """Restarts this launcher script with ``MALLOC_ENV`` set and the block cache of
    ``big_blocks.cc`` preloaded, if that is not done yet.

    Call it first thing in a launcher's ``__main__`` block: the process image is
    replaced (same interpreter, options and arguments), so nothing done before it
    survives. Opt out with ``PVAE_JAX_MALLOC_TUNING=0`` or by setting
    ``GLIBC_TUNABLES`` or any ``MALLOC_*`` variable yourself (a ``LD_PRELOAD`` of yours
    keeps the settings but not the block cache). A no-op where it does not apply (see
    ``malloc_tuning_env``).
    """
    preloaded = os.environ.get(_PRELOADED_VAR)
    if preloaded and os.environ.get("LD_PRELOAD") == preloaded:
        del os.environ["LD_PRELOAD"]  # loaded now; processes started from here go without
    env = malloc_tuning_env(block_cache=_block_cache_library)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:  # Not fatal: run on with the allocator's defaults.
        logging.warning("could not restart with tuned malloc settings (%s)", e)


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_trim_listener = None  # Set once release_compiler_memory has registered it.


def release_compiler_memory() -> bool:
    """Returns the heap memory that XLA's compilers have freed to the OS after every
    compile from now on (glibc's ``malloc_trim``); True where it applies (glibc).

    Compiling the MNIST gated PixelVAE's train step leaves about 0.3 GB of freed heap
    that glibc keeps (the trim threshold above is raised to keep step buffers), and the
    step's temporaries then come on top of it: trimming after each compile lowered that
    run's peak RSS from 1.79 to 1.48 GB. It runs once per compile, never inside a
    step. Idempotent.
    """
    global _trim_listener
    if _trim_listener is not None:
        return True
    if not on_glibc():
        return False
    libc = ctypes.CDLL(None)
    release_idle_blocks = getattr(libc, "pvae_release_idle_blocks", None)

    def trim_after_compile(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == _BACKEND_COMPILE_EVENT:
            if release_idle_blocks is not None:  # the block cache's idle blocks too
                release_idle_blocks()
            libc.malloc_trim(0)

    jax.monitoring.register_event_duration_secs_listener(trim_after_compile)
    _trim_listener = trim_after_compile
    return True


def use_cpu_cores_as_devices(num_devices: int | None = None) -> None:
    """Splits the CPU backend into ``num_devices`` virtual devices (default: one per core
    this process may run on, ``native.cpu_cores()``).

    XLA:CPU's weight-gradient convolutions barely use a second core, so a batch sharded
    over one device per core trains faster (2.3x for a conv step on a 2-core machine).
    Only the CPU backend is affected: on a GPU or TPU host the accelerators stay the
    default devices. Must run before JAX initialises its backends.
    """
    jax.config.update("jax_num_cpu_devices", num_devices or native.cpu_cores())


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            part in record.pathname for part in _CHATTY)


def quiet_library_logs() -> None:
    """Keeps absl's INFO output to our own records; libraries still warn and fail loudly."""
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())


# What a user can fix (a config field, a missing file, a diverging run): one line, no
# traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, CheckpointError)


def run_launcher(fn: Callable[[], object], cpu_devices: int | None = None):
    """The common body of ``launch/*.py``: host setup, then ``fn()``, with user errors
    reported as ``error: ...`` and exit status 1."""
    use_cpu_cores_as_devices(cpu_devices)
    release_compiler_memory()
    quiet_library_logs()
    try:
        return fn()
    except USER_ERRORS as e:
        absl_logging.error("%s", e)
        sys.exit(f"error: {e}")
