"""What the training loop needs from its surroundings: pre-emption signals and profiling.

`Stop` turns SIGTERM (a pre-emption notice) into a step at which every process saves and exits;
`Profile` traces a window of steps with jax.profiler. Neither touches the train state.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Profile:
    """A jax.profiler trace of `count` steps after step `first` (0 = no trace), written to
    `logdir` for TensorBoard's profile plugin or Perfetto (the .xplane.pb / .trace.json.gz files
    under logdir/plugins/profile/<run>/)."""

    def __init__(self, logdir: str, first: int, count: int):
        self.logdir, self.first, self.last = logdir, first, first + count
        self.active = False
        self.enabled = count > 0 and jax.process_index() == 0

    def before(self, step: int) -> None:
        if self.enabled and step == self.first and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)  # the traced steps' device work lands in the trace
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile of steps {self.first + 1}-{self.last} written to {self.logdir}", flush=True)


class Stop:
    """SIGTERM (a pre-emption notice) stops the loop at a step where it saves and exits.

    One process: a Python handler sets `requested`; the loop finishes its step, saves and exits.
    Several processes: the signal may reach only some of them, and all must save the same step.
    jax's pre-emption service (started by `jax.distributed.initialize`, with its own SIGTERM
    handler) tells every process of the notice and agrees on the first step all of them can still
    reach; `check(step)`, called after every step, turns true on that step in every process.
    """

    def __init__(self):
        self.requested = False
        self._coordinated = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self._previous = None
        if not self._coordinated:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        if self._coordinated and not self.requested:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
