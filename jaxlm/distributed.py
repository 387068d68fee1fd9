"""Multi-process setup: `jax.distributed.initialize` when jaxlm runs under a launcher.

A run is multi-process when the command line says so (`--coordinator`, `--num_processes`,
`--process_id`, as `tools/launch_local.sh` passes them) or when a cluster launcher's environment
does: SLURM (`srun`, SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1) or a multi-host Cloud
TPU slice (TPU_WORKER_HOSTNAMES lists several hosts); jax reads those environments itself.

On CPU every cross-device sum then goes through gloo, between the devices of one process too.
gloo's order of addition depends only on the number of devices, not on how they are spread over
processes, so 2 processes x 4 devices and 1 x 8 give the same bits; XLA's own in-process sum (a
one-process run that does not join) adds in another order. `--num_processes=1` alone joins a
one-process run through gloo (on a free local port), so that it can hand over to, or take over
from, a multi-process run bit for bit (elastic resume, docs/checkpoints.md).

Every process waits at most `timeout` seconds for the others. A process that never joins would
make jax abort the rest with a fatal log and a C++ stack trace; jaxlm's own watchdog ends each
waiting process first, with one line that names the missing processes, and exit status 1. It knows
which ones are missing from join marks: each process writes `WORKDIR/joining/process_<i>.json`
before it waits (the workdir is shared by all processes, as checkpoints need) and removes it once
all have joined. A process that gives up leaves its mark, for the others and for a post-mortem;
marks older than the timeout are from an earlier attempt and are ignored.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import jax
from etils import epath

GRACE = 30  # jax's own deadline is this much later than jaxlm's, so jaxlm's line comes first
joined = False  # whether this process joined through jax.distributed (set by `initialize`)


def launcher_environment() -> str | None:
    """The cluster launcher whose environment describes several processes, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def _size_and_rank(source: str, num_processes: int | None,
                   process_id: int | None) -> tuple[int | None, int | None]:
    """(processes, this one's index) as the flags or the launcher's environment give them."""
    env = os.environ
    match source:
        case "slurm":
            return int(env["SLURM_NTASKS"]), int(env.get("SLURM_PROCID", -1))
        case "openmpi":
            return int(env["OMPI_COMM_WORLD_SIZE"]), int(env.get("OMPI_COMM_WORLD_RANK", -1))
        case "tpu":
            hosts = [h for h in env["TPU_WORKER_HOSTNAMES"].split(",") if h]
            return len(hosts), int(env.get("TPU_WORKER_ID", -1))
        case _:
            return num_processes, process_id


class _JoinMarks:
    """One small file per waiting process under WORKDIR/joining (local or gs://)."""

    def __init__(self, workdir: str, timeout: int):
        self.folder = epath.Path(workdir) / "joining"
        self.since = time.time() - timeout  # a mark older than this is from an earlier attempt

    def write(self, index: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        mark = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        (self.folder / f"process_{index}.json").write_text(json.dumps(mark))

    def present(self) -> set[int]:
        found = set()
        for path in self.folder.glob("process_*.json"):
            try:
                if json.loads(path.read_text())["time"] > self.since:
                    found.add(int(path.stem.removeprefix("process_")))
            except (OSError, ValueError, KeyError):
                continue  # a mark being written or removed right now
        return found

    def remove(self, index: int) -> None:
        try:
            (self.folder / f"process_{index}.json").unlink(missing_ok=True)
            self.folder.rmdir()  # the last one out removes the folder
        except (OSError, ValueError):  # epath says "not empty" with a ValueError
            pass  # others' marks are still there


def missing_line(n: int | None, me: int | None, present: set[int] | None, timeout: int,
                 coordinator: str | None) -> str:
    """The one line a process prints when the others did not all join in time."""
    where = f"the coordinator {coordinator}" if coordinator else "the coordinator"
    if n is None or present is None:
        return (f"jaxlm: error: not all {n or 'the'} processes joined {where} within {timeout} s "
                f"(this is process {me}); without a workdir jaxlm cannot tell which are missing")
    missing = sorted(set(range(n)) - present - {me})
    started = sorted(present - {me})
    if not missing:
        return (f"jaxlm: error: processes {', '.join(map(str, started))} of {n} started but did "
                f"not reach {where} within {timeout} s (this is process {me}); check the "
                "address and that its port is open between hosts")
    names = ", ".join(map(str, missing))
    plural = "es" if len(missing) > 1 else ""
    return (f"jaxlm: error: process{plural} {names} of {n} did not join {where} within {timeout} s "
            f"(this is process {me}); it never started, or cannot write to the shared workdir")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300,
               workdir: str | None = None) -> bool:
    """Join the other processes of this run; False (and nothing done) for a single process."""
    global joined
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if num_processes == 1 and coordinator is None and process_id in (None, 0):
        coordinator, process_id = f"127.0.0.1:{_free_port()}", 0  # a one-process run, via gloo
    if explicit and None in (coordinator, num_processes, process_id):
        raise ValueError("multi-process runs need all of --coordinator, --num_processes and "
                         "--process_id (a one-process run only --num_processes=1)")
    source = "flags" if explicit else launcher_environment()
    if source is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; harmless elsewhere
    n, me = _size_and_rank(source, num_processes, process_id)
    where = f" at {coordinator}" if coordinator else ""
    print(f"jaxlm: joining {n or 'the'} processes{where} ({source}); waiting up to "
          f"{timeout} s for all of them", flush=True)
    marks = _JoinMarks(workdir, timeout) if workdir and me is not None and me >= 0 else None
    if marks:
        marks.write(me)
    done = threading.Lock()

    def give_up():
        if not done.acquire(blocking=False):
            return  # joined just now
        try:  # this process's mark stays: the others, giving up a moment later, still see it
            line = missing_line(n, me, marks.present() if marks else None, timeout, coordinator)
            print(line, file=sys.stderr, flush=True)
        finally:
            os._exit(1)  # jax's connect is blocked in C++; nothing else can end it cleanly

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
        initialization_timeout=timeout + GRACE,
    )
    if not done.acquire(blocking=False):  # the watchdog is ending this process
        time.sleep(GRACE)
    watchdog.cancel()
    if marks:
        marks.remove(me)
    joined = True
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
