"""Checkpoints with orbax: `DIR/checkpoints/<step>/` holds params, opt_state, data, config.

- `params`, `opt_state`: the train state's arrays (orbax StandardSave), written asynchronously
  and by every process for its own shards. Restored into whatever shardings the caller gives,
  so a checkpoint moves between meshes and device counts.
- `data`: every process's grain iterator state (grain's orbax handler, one JSON per process),
  read back by `data_position`, which also resumes it on another number of processes.
- `config`: the resolved config, JSON.

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an
interrupted save is never listed by `latest_step` and never restored. The step number of a
checkpoint is the number of optimizer steps taken.

A finished step can still be damaged later (a failing disk, a copy cut short, a file deleted by
hand). Restoring one raises `Damaged`, one line naming the step, the file and what is wrong,
never orbax's or TensorStore's traceback: `check_files` reads every item folder and JSON
metadata file before orbax does, and an error from the array data is reduced to its innermost
cause (which names the array and the file). `jaxlm train` then moves the step aside into
`DIR/checkpoints.damaged/` (never deletes it) and falls back to the newest step that restores
(`Checkpointer.restore_newest`). A readable step that does not fit the run raises `Mismatch`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import sys
import time

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import paths

ITEMS = ("params", "opt_state", "data", "config")


def checkpoint_dir(workdir: str) -> str:
    return paths.join(paths.resolve(workdir), "checkpoints")


class Damaged(Exception):
    """A finished checkpoint step that cannot be restored: `path` is the file or folder at fault."""

    def __init__(self, step: int, path: str, reason: str):
        self.step, self.path, self.reason = step, path, reason
        super().__init__(f"checkpoint step {step} is damaged: {path}: {reason}")


def check_files(step_dir: str, items=ITEMS) -> tuple[str, str] | None:
    """(path, what is wrong) of the first missing item folder or unreadable JSON metadata file
    of a finished step, or None when they all read. Array data is checked by restoring it."""
    for item in items:
        folder = paths.join(step_dir, item)
        if not paths.isdir(folder):
            return folder, "missing"
    names = [paths.join(step_dir, "_CHECKPOINT_METADATA")]
    for item in items:
        names += [paths.join(step_dir, item, n) for n in ("_METADATA", "_sharding", "metadata")]
        names += paths.glob(step_dir, f"{item}/array_metadatas/*")
    names += paths.glob(step_dir, "data/*.json")
    for name in names:
        if not paths.isfile(name):
            continue
        try:
            json.loads(paths.read_bytes(name))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return name, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def _innermost(exc: BaseException) -> str:
    """The deepest cause's first line, without TensorStore's multi-line spec dump."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"See full TensorStore details.*", "", text).strip()
    return text[:400]


class SaveFailed(Exception):
    """Writing a checkpoint failed (disk full, no permission): the step's temporary folder is
    left unfinished, so it is never listed, and the steps saved before stay as they were."""

    def __init__(self, step: int, directory: str, reason: str):
        self.step, self.directory, self.reason = step, directory, reason
        super().__init__(f"saving checkpoint step {step} into '{directory}' failed: {reason}")


class Mismatch(Exception):
    """A readable checkpoint that does not fit what restores it (another model or optimizer)."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint step {step} does not match this config: {reason}")


# What reading damaged files looks like, from TensorStore, orbax and grain (a structure or shape
# mismatch is not damage: the files are fine, the config that reads them is not).
_DAMAGE = re.compile(r"Error reading|OUT_OF_RANGE|NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|"
                     r"does not exist|was not found in the checkpoint|[Cc]orrupt|checksum|"
                     r"No such file")


def damaged(step: int, step_dir: str, exc: BaseException) -> Exception:
    """A `Damaged` (files at fault) or `Mismatch` for a restore of `step_dir` that raised `exc`,
    after `check_files` found its folders and metadata readable."""
    reason = _innermost(exc)
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    if not (isinstance(inner, (OSError, json.JSONDecodeError)) or _DAMAGE.search(reason)):
        return Mismatch(step, reason)
    match = re.search(r'(?:local file|File) "?([^"\s]+)"?', reason)
    return Damaged(step, match.group(1) if match else step_dir, reason)


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """When one array of a restore fails, orbax abandons the reads of the others; each abandoned
    read prints "Exception ignored in <coroutine ...>" and a TensorStore dump to stderr when it is
    freed. Within this context (which frees them before it ends) those are not printed: the
    failure is reported once, as `Damaged`."""
    hook, excepthook = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda unraisable: None
    sys.excepthook = lambda *exc_info: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook, sys.excepthook = hook, excepthook


def move_aside(workdir: str, step: int) -> str:
    """Moves a damaged step out of the checkpoints folder (so nothing lists it) into
    `checkpoints.damaged/<step>-<unix time>`; returns the new path. Never deletes."""
    target_dir = checkpoint_dir(workdir) + ".damaged"
    paths.makedirs(target_dir)
    target = paths.join(target_dir, f"{step}-{int(time.time())}")
    paths.rename(paths.join(checkpoint_dir(workdir), str(step)), target)
    return target


def data_position(step: int, step_dir: str, streams: int) -> dict:
    """This process's data iterator state from a step's `data/process_<i>-of-<P>.json` files
    (grain's format: one stream's state, or {"parents": [...]} for a process reading several),
    for a run of `streams` input streams on any number of processes.

    Process i of P read the streams i * S/P, ..., (i + 1) * S/P - 1 of the S = `data.streams`
    (jaxlm/data.py, `streams`). With the same streams, the data order does not depend on the
    process count, so a step written by P processes resumes on P' (any count dividing the
    streams): each stream's state is taken from the file that holds it and this process's
    streams are put back together."""
    found = _data_files(step_dir)
    writers = {count for _, count in found}
    index, count = jax.process_index(), jax.process_count()
    if len(writers) != 1:
        raise Damaged(step, paths.join(step_dir, "data"), "no single set of process_<i>-of-<P>.json files")
    old = writers.pop()
    if (index, old) in found and old == count:
        return json.loads(paths.read_text(found[index, old]))
    states = {}
    for i in range(old):
        if (i, old) not in found:
            raise Damaged(step, paths.join(step_dir, "data", f"process_{i}-of-{old}.json"), "missing")
        state = json.loads(paths.read_text(found[i, old]))
        parts = state["parents"] if "parents" in state else [state]
        states.update({i * len(parts) + k: part for k, part in enumerate(parts)})
    if len(states) != streams:
        raise Mismatch(step, f"it holds the data positions of {len(states)} input streams, read by "
                             f"{old} processes; this run has {streams} on {count} processes. Set "
                             f"data.streams={len(states)} to resume it on a number of processes that "
                             f"divides {len(states)}")
    per = streams // count
    mine = [states[s] for s in range(index * per, (index + 1) * per)]
    return mine[0] if len(mine) == 1 else {"parents": mine}


def _data_files(step_dir: str) -> dict[tuple[int, int], str]:
    """A step's data-iterator files, `data/process_<i>-of-<P>.json`, by (i, P)."""
    names = paths.glob(step_dir, "data/process_*-of-*.json")
    return {tuple(map(int, m.groups())): name for name in names
            if (m := re.search(r"process_(\d+)-of-(\d+)\.json$", name))}


def elastic_note(workdir: str, step: int, joined: bool) -> str | None:
    """A line for a resume on another number of processes that cannot be bit for bit: on CPU,
    processes that joined through jax.distributed sum across devices with gloo, a process that
    did not (`joined` False) in XLA's own order (jaxlm/distributed.py)."""
    old = {count for _, count in _data_files(paths.join(checkpoint_dir(workdir), str(step)))}
    if joined or jax.default_backend() != "cpu" or old in ({jax.process_count()}, set()):
        return None
    return (f"jaxlm: note: step {step} was written by {max(old)} processes, which sum through "
            "gloo; this process did not join through jax.distributed and sums in XLA's own "
            "order, so from here the parameters agree with an uninterrupted run to about 1e-6, "
            "not bit for bit (start it with --num_processes=1 for the same bits)")


class _IteratorSnapshot:
    """The iterator's state at save time. Orbax may run grain's handler after the loop has moved
    on; handing it this frozen copy (grain's non-DatasetIterator path: bytes) keeps it exact."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


def _one_writer_per_array() -> None:
    """In one process, orbax's replica-parallel saving (its default off GPUs: each replica of a
    replicated array writes a slice of it) has nobody to share the writes with, and costs one
    small compiled slicing program per array and device at the first save (2.5 s of a short run
    on 8 CPU devices). Off there, by re-registering orbax's default jax.Array handler with it
    off; a handler someone else registered is left alone. The files written are the same."""
    from orbax.checkpoint._src.serialization import type_handler_registry as registry

    current = registry.get_type_handler(jax.Array)
    if (jax.process_count() == 1 and type(current) is ocp.type_handlers.ArrayHandler
            and current._use_replica_parallel):  # orbax 0.12's registry, quietly (no warning)
        registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=current._array_metadata_store, use_replica_parallel=False),
            override=True, ignore_warnings=True)


class Checkpointer:
    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        _one_writer_per_array()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                             item_names=ITEMS)
        self._saving = None  # the step of the last save started
        self.workdir = workdir

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, iterator, cfg: config_lib.Config) -> None:
        """Starts writing `step` (asynchronously); a failure, of this save or of the previous one
        still being written, raises SaveFailed."""
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
                config=ocp.args.JsonSave(cfg.to_dict()),
            ))
        except Exception as e:  # noqa: BLE001 - one line for whatever the filesystem says
            raise SaveFailed(self._saving or step, str(self.manager.directory), _innermost(e)) from None
        self._saving = step

    def restore(self, step: int, abstract_params, abstract_opt_state, iterator, streams: int):
        """(params, opt_state) placed as the abstract targets' shardings say; `iterator` is set
        to the saved data position (`set_data_position`; `streams` is this run's number of input
        streams). A damaged step raises `Damaged`, one that does not fit `Mismatch`."""
        step_dir = paths.join(str(self.manager.directory), str(step))
        if (found := check_files(step_dir)) is not None:
            raise Damaged(step, *found)
        state = data_position(step, step_dir, streams)  # before the arrays: the cheap refusal
        with _quiet_abandoned_reads():
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                ))
            except Exception as e:  # noqa: BLE001 - every failure of a finished step is damage
                error = damaged(step, step_dir, e)
            else:
                iterator.set_state(state)
                if hasattr(iterator, "start_prefetch"):  # as grain's own handler does
                    iterator.start_prefetch()
                return restored["params"], restored["opt_state"]
        raise error

    def restore_newest(self, step: int, abstract_params, abstract_opt_state, iterator,
                       streams: int):
        """(step, params, opt_state) of the newest checkpoint, from `step` down, that restores
        (see `restore`). A damaged one is named in one line, moved aside (`move_aside`) and the
        next older one tried; with none left, `Damaged` for the last one tried."""
        while True:
            try:
                return (step, *self.restore(step, abstract_params, abstract_opt_state, iterator,
                                            streams))
            except Damaged as e:
                multihost_utils.sync_global_devices(f"jaxlm: damaged checkpoint {step}")
                moved = move_aside(self.workdir, step) if jax.process_index() == 0 else None
                multihost_utils.sync_global_devices(f"jaxlm: moved checkpoint {step} aside")
                self.manager.reload()
                older = self.latest_step()
                where = moved or "checkpoints.damaged/"
                if older is None:
                    raise Damaged(e.step, e.path, f"{e.reason}; no other checkpoint in "
                                  f"'{self.workdir}' to resume from (the damaged step was moved "
                                  f"to {where})") from None
                if jax.process_index() == 0:
                    print(f"{e}; moved it to {where}; resuming from step {older} instead",
                          flush=True)
                step = older

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise SaveFailed(self._saving, str(self.manager.directory), _innermost(e)) from None

    def close(self) -> None:
        try:
            self.manager.close()  # may re-raise a failure of the save still being written
        except Exception as e:  # noqa: BLE001
            raise SaveFailed(self._saving, str(self.manager.directory), _innermost(e)) from None


def restore_params(workdir: str, abstract_params, step: int | None = None, partial: bool = False):
    """(step, params) of a workdir's checkpoint, params only (no optimizer state), placed as
    `abstract_params` (ShapeDtypeStructs with shardings) say. `partial`: `abstract_params` may
    leave out saved arrays (e.g. the output layer, for a classifier started from an LM)."""
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in '{checkpoint_dir(workdir)}'")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in '{checkpoint_dir(workdir)}'"
                                    f"; it has steps {sorted(steps)}")
        if partial:
            item = ocp.args.PyTreeRestore(
                abstract_params, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params))
        else:
            item = ocp.args.StandardRestore(abstract_params)
        step_dir = paths.join(checkpoint_dir(workdir), str(step))
        if (found := check_files(step_dir, ("params",))) is not None:
            raise Damaged(step, *found)
        with _quiet_abandoned_reads():
            try:
                restored = manager.restore(step, args=ocp.args.Composite(params=item))
            except Exception as e:  # noqa: BLE001 - every failure of a finished step is damage
                error = damaged(step, step_dir, e)
            else:
                return step, restored["params"]
        raise error
    finally:
        manager.close()


def steps(workdir: str) -> list[int]:
    """The finished checkpoints' steps, ascending ([] without a checkpoints/ folder)."""
    if not paths.isdir(checkpoint_dir(workdir)):
        return []
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def saved_config(workdir: str, step: int | None = None) -> dict:
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS)
    try:
        step = manager.latest_step() if step is None else step
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    finally:
        manager.close()
