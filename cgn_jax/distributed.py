"""Multi-process (multi-host) start-up, kept to one call at the top of every entry point.

A pod slice or a multi-node GPU job runs one Python process per host (or per GPU), and
every process must call `jax.distributed.initialize()` before touching a device. JAX
finds the coordinator itself on Cloud TPU VMs and under SLURM, but errors when called
without arguments anywhere else, and errors when called twice. `initialize()` here is
safe everywhere: it does nothing on a single machine, reads explicit settings from its
arguments or `CGN_JAX_*` environment variables, defers to JAX's own cluster detection
otherwise, and may be called any number of times.

The helpers encode the two rules multi-host code gets wrong most often: only one
process writes shared files, and the global batch (what a config states) must split
evenly over the devices of all processes, not just the local ones.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "CGN_JAX_COORDINATOR"        # host:port of process 0
ENV_NUM_PROCESSES = "CGN_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CGN_JAX_PROCESS_ID"


class DistributedError(ValueError):
    """A multi-process setting that cannot work (incomplete or inconsistent arguments)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"${name}={value!r} is not an integer") from None


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX would auto-detect (SLURM, Cloud TPU, ...), or None."""
    try:
        from jax._src.clusters import ClusterEnv  # private, so guarded: detection only, never required
    except ImportError:  # pragma: no cover - a future JAX may move it
        ClusterEnv = None
    if ClusterEnv is not None:
        for env in ClusterEnv._cluster_types:
            try:
                if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                    return env.__name__
            except Exception:  # a detector that cannot run here (no metadata server, ...) is "absent"
                continue
        return None
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return "SlurmCluster" if all(v in os.environ for v in slurm) else None


def _cluster_size() -> int | None:
    """The process count a detected cluster announces without a network query, if it does."""
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        n = _env_int(var)
        if n is not None:
            return n
    return None


def is_initialized() -> bool:
    return bool(jax.distributed.is_initialized())


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids=None, timeout_s: int = 300) -> bool:
    """Join the multi-process job this process belongs to; True if it is one (more than one process).

    Explicit settings come from the arguments, else from $CGN_JAX_COORDINATOR,
    $CGN_JAX_NUM_PROCESSES and $CGN_JAX_PROCESS_ID; all three are then needed (host
    and port of process 0, the total count, this process's index). With none of them,
    JAX's own detection is used where it applies (Cloud TPU VM pod slices, SLURM with
    more than one task, Open MPI); elsewhere this is a single-process run and nothing
    happens. Calling it again, or after `jax.distributed.initialize`, does nothing.
    Must run before anything queries the devices.
    """
    if is_initialized():
        return jax.process_count() > 1
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)

    if num_processes == 1:
        return False
    explicit = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(explicit):
        if not all(explicit):
            given = [n for n, e in zip(("coordinator", "num_processes", "process_id"), explicit) if e]
            raise DistributedError(
                f"multi-process settings are incomplete (got only {', '.join(given)}); give all of "
                f"coordinator (host:port of process 0), num_processes and process_id, as arguments or as "
                f"${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"process_id must be in [0, num_processes); got process_id={process_id}, "
                                   f"num_processes={num_processes}")
        if ":" not in coordinator:
            raise DistributedError(f"coordinator must be host:port, got {coordinator!r}")
        log.info("joining %d-process job as process %d (coordinator %s)", num_processes, process_id, coordinator)
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
        return jax.process_count() > 1

    cluster = detected_cluster()
    if cluster is None or _cluster_size() == 1:
        return False  # a plain single-machine run (or a one-task SLURM job)
    log.info("auto-detected %s; initialising jax.distributed", cluster)
    _cpu_collectives()
    jax.distributed.initialize(local_device_ids=local_device_ids, initialization_timeout=timeout_s)
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on the one process that writes logs, samples and exports (process 0)."""
    return jax.process_index() == 0


def host_shard(n_examples: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The contiguous slice of `n_examples` this host loads when each host reads its own part.

    Hosts get equal shares; the `n_examples % process_count` examples left over are
    dropped, so every host runs the same number of steps. (The MNIST step samples from
    the whole dataset on every device and needs no sharding; this is for input
    pipelines too large to replicate, such as ImageNet.)
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise DistributedError(f"process index {index} is not in [0, {count})")
    per_host = n_examples // count
    if per_host == 0:
        raise DistributedError(f"{n_examples} examples cannot be shared over {count} hosts")
    return slice(index * per_host, (index + 1) * per_host)


def global_to_local_batch(global_batch: int, what: str = "train.batch_size") -> int:
    """Examples each local device computes per step: global_batch / jax.device_count().

    The global batch is what a config states and what the run's results depend on; it
    must split evenly over all devices of all processes.
    """
    from cgn_jax.parallel import per_device_batch

    return per_device_batch(global_batch, jax.device_count(), what=what)


def global_to_host_batch(global_batch: int, what: str = "train.batch_size") -> int:
    """Examples this process feeds per step (its devices' share of the global batch)."""
    return global_to_local_batch(global_batch, what) * jax.local_device_count()


def _cpu_collectives() -> None:
    """Cross-process collectives for CPU devices (gloo); accelerators bring their own (NCCL, ICI)."""
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # pragma: no cover - a JAX without the option
        pass


def main(argv: list[str] | None = None) -> int:
    """`python -m cgn_jax.distributed COMMAND ARGS...`: join the job, then run `cgn-jax COMMAND ARGS...`.

    Lets the launch scripts start any `cgn-jax` command on every host of a multi-process
    job, whether or not that command initialises the distributed runtime itself.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        initialize()
    except DistributedError as e:
        print(f"cgn_jax.distributed: error: {e}", file=sys.stderr)
        return 2
    if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
              f"{jax.device_count()} global devices", flush=True)
    from cgn_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
