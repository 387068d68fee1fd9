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
        self.requested = False  # changes only in check(): the loop's decisions of one step agree
        self._signalled = False  # set by the handler, at any moment
        self._coordinated = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self._previous = None
        if not self._coordinated:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._signalled = True

    def check(self, step: int) -> bool:
        if self._coordinated and not self.requested:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        elif not self._coordinated:
            # Latched here, not in the handler: a signal landing between the loop's "save now?"
            # and "stop now?" would otherwise end the run without saving the step it stops at.
            self.requested = self._signalled
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Best:
    """`checkpoint.best_metric` and `train.early_stop_patience`: after each evaluation, whether
    it is the best so far (then the loop saves its checkpoint into WORKDIR/best, a workdir of its
    own that `jaxlm.load` reads) and whether `patience` evaluations in a row have not improved
    on the best (then the loop stops, saving as at a normal end).

    The record is rebuilt from metrics.jsonl when a run resumes, so a resumed run keeps, and
    stops, exactly as the uninterrupted one would."""

    def __init__(self, metric: str, mode: str, patience: int, records=()):
        self.metric, self.mode, self.patience = metric, mode, patience
        self.enabled = bool(metric)
        self.best, self.best_step, self.since = None, None, 0
        for record in records:
            if metric in record and record["step"] > 0:  # step 0: a source model, never saved
                self._update(record["step"], record[metric])

    def _update(self, step: int, value: float) -> bool:
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_step, self.since = value, step, 0
        else:
            self.since += 1
        return better

    def update(self, step: int, evaluation: dict) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if not self.enabled:
            return False
        if self.metric not in evaluation:
            raise KeyError(f"config key 'checkpoint.best_metric' ({self.metric!r}) is not a metric "
                           f"of the evaluation; it has {', '.join(sorted(evaluation))}")
        return self._update(step, float(evaluation[self.metric]))

    @property
    def stop(self) -> bool:
        return self.enabled and self.patience > 0 and self.since >= self.patience
