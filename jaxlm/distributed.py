"""Multi-process setup: `jax.distributed.initialize` when jaxlm runs under a launcher.

A run is multi-process when the command line says so (`--coordinator`, `--num_processes`,
`--process_id`, as `tools/launch_local.sh` passes them) or when a cluster launcher's environment
does: SLURM (`srun`, SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1) or a multi-host Cloud
TPU slice (TPU_WORKER_HOSTNAMES lists several hosts); jax reads those environments itself.

On CPU the cross-process collectives go through gloo. Every process waits at most `timeout`
seconds for the others; a process that never joins makes jax abort the rest after that time (jax
ends them with a fatal log, not an exception), so a missing peer never hangs a job.
"""

from __future__ import annotations

import os

import jax


def launcher_environment() -> str | None:
    """The cluster launcher whose environment describes several processes, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300) -> bool:
    """Join the other processes of this run; False (and nothing done) for a single process."""
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit and None in (coordinator, num_processes, process_id):
        raise ValueError("multi-process runs need all of --coordinator, --num_processes and "
                         "--process_id")
    source = "flags" if explicit else launcher_environment()
    if source is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; harmless elsewhere
    where = f" at {coordinator}" if coordinator else ""
    print(f"jaxlm: joining {num_processes or 'the'} processes{where} ({source}); waiting up to "
          f"{timeout} s for all of them", flush=True)
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
        initialization_timeout=timeout,
    )
    return True
