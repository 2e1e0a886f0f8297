"""Several processes as one run, and stopping cleanly when the cluster asks.

``initialize`` starts JAX's distributed runtime when this process is one of several:
under ``srun`` with more than one task, under ``mpirun``, when
``JAX_COORDINATOR_ADDRESS`` is set, or when the coordinator, process count and process
id are given explicitly. After it, ``jax.devices()`` lists every process's devices and
the train step's mesh spans them all; on CPU-only hosts the processes talk over gloo
(TCP), which is how the two-process tests run on one machine.

``StopRequest`` turns SIGTERM and SIGINT into a request to stop after the current
step. With several processes only some may receive the signal, and every process must
save the same step, so the request is combined over processes with a one-element
max-reduce that is dispatched behind each step and read one step later: every process
sees it at the same step, and the device always has the next step queued.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MODES = ("auto", "on", "off")


class Preempted(Exception):  # noqa: N818 - it is an outcome, not a failure
    """Training stopped on a signal after saving a durable checkpoint at ``step``."""

    def __init__(self, signal_name: str, step: int, workdir: str):
        self.signal_name, self.step, self.workdir = signal_name, step, workdir
        super().__init__(
            f"stopped on {signal_name} at step {step}; the checkpoint of step {step} in "
            f"{workdir} is complete. Run the same command again to resume.")


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def cluster_environment() -> str | None:
    """Names the multi-process launch this process is part of, or None when alone.

    A SLURM batch script or an ``mpirun -n 1`` is one process and needs no
    distributed runtime; only launches of two or more processes count.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # The variables JAX's own SLURM detection reads; SLURM_STEP_NODELIST is set by
    # srun only, so a batch script that runs python directly is not mistaken for a step.
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(v in os.environ for v in slurm) and _int_env("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               initialization_timeout_s: int = 300) -> bool:
    """Starts JAX's distributed runtime if this process is one of several.

    Must run before the first JAX computation (after ``jax.config`` updates).

    Args:
      mode: 'auto' starts it when a cluster launch is detected
        (`cluster_environment`) or any explicit argument is given; 'on' always
        starts it and lets JAX detect what is not given (TPU pods, Kubernetes,
        mpi4py); 'off' never does.
      coordinator_address: 'host:port' of process 0, reachable from every process.
      num_processes: processes in the run.
      process_id: this process, in [0, num_processes).
      initialization_timeout_s: how long to wait for every process to connect.

    Returns:
      Whether the distributed runtime was started.

    Raises:
      ValueError: an unknown mode, or explicit arguments that do not fit together.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r} is not one of {list(MODES)}.")
    explicit = (coordinator_address, num_processes, process_id)
    if mode == "off":
        if any(v is not None for v in explicit):
            raise ValueError("--distributed=off contradicts the coordinator_address/"
                             "num_processes/process_id given; drop one or the other.")
        return False
    environment = cluster_environment()
    if mode == "auto" and environment is None and all(v is None for v in explicit):
        return False
    if environment is None and mode == "auto" and None in explicit:
        raise ValueError(
            "a multi-process run outside SLURM/Open MPI needs all of coordinator_address, "
            f"num_processes and process_id; got {explicit}. Give all three (the same "
            "coordinator and count on every process, process ids 0..num_processes-1).")
    if num_processes is not None and process_id is not None and \
            not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes="
                         f"{num_processes}).")
    # Stop requests are ours (StopRequest); JAX's preemption service would install its
    # own SIGTERM handler and could replace ours.
    jax.config.update("jax_enable_preemption_service", False)
    logging.info("starting the distributed runtime (%s, coordinator %s, process %s of %s)",
                 environment or "explicit", coordinator_address or "auto",
                 process_id if process_id is not None else "auto",
                 num_processes or "auto")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout_s)
    logging.info("process %d of %d: %d local and %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


class StopRequest:
    """Catches SIGTERM and SIGINT while training; ``poll()`` once per step says when to stop.

    Enter it before the slow setup (building the model, compiling, restoring), so a
    signal that arrives then also ends in a checkpoint after the first step instead of
    killing one process of several. A second signal of the same kind is not caught: a
    second Ctrl-C raises KeyboardInterrupt and a second SIGTERM terminates as usual.
    Handlers are only installed from the main thread (Python's rule); elsewhere no
    signal is caught.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._pending = None
        self._max = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
        logging.warning("received %s: stopping after the current step with a checkpoint "
                        "(send it again to stop at once, without one)", self.signal_name)

    def _any_process(self, sharding: NamedSharding):
        if self._max is None:
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(sharding.mesh, P()))
        local = len(sharding.addressable_devices)
        flag = np.full((local,), self.signal_name is not None, np.int32)
        return self._max(jax.make_array_from_process_local_data(sharding, flag))

    def poll(self, sharding: NamedSharding) -> bool:
        """True, on every process at the same call, once any process was signalled.

        Call it on every process after dispatching each step, with the same
        ``sharding`` (a 1-D sharding over all devices, e.g. the batch's). It reports
        the requests made up to the previous call, so a stop comes one step after the
        signal, and the host stays a step ahead of the device.
        """
        previous, self._pending = self._pending, self._any_process(sharding)
        return previous is not None and bool(previous)

    def now(self, sharding: NamedSharding) -> bool:
        """Like ``poll`` but reports requests up to this call (waits for the device)."""
        previous, self._pending = self._pending, None
        return bool(self._any_process(sharding)) or (previous is not None and bool(previous))
