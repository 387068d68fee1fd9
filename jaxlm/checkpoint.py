"""Checkpoints with orbax: `DIR/checkpoints/<step>/` holds params, opt_state, data, config.

- `params`, `opt_state`: the train state's arrays (orbax StandardSave), written asynchronously
  and by every process for its own shards. Restored into whatever shardings the caller gives,
  so a checkpoint moves between meshes and device counts.
- `data`: every process's grain iterator state (grain's orbax handler, one JSON per process).
- `config`: the resolved config, JSON.

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an
interrupted save is never listed by `latest_step` and never restored. The step number of a
checkpoint is the number of optimizer steps taken.
"""

from __future__ import annotations

import json
import os

import grain
import orbax.checkpoint as ocp

from jaxlm import config as config_lib

ITEMS = ("params", "opt_state", "data", "config")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class _IteratorSnapshot:
    """The iterator's state at save time. Orbax may run grain's handler after the loop has moved
    on; handing it this frozen copy (grain's non-DatasetIterator path: bytes) keeps it exact."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                             item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, iterator, cfg: config_lib.Config) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
            config=ocp.args.JsonSave(cfg.to_dict()),
        ))

    def restore(self, step: int, abstract_params, abstract_opt_state, iterator):
        """(params, opt_state) placed as the abstract targets' shardings say; `iterator` is set
        to the saved data position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=grain.checkpoint.CheckpointRestore(iterator),
        ))
        return restored["params"], restored["opt_state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
        restored = manager.restore(step, args=ocp.args.Composite(params=item))
        return step, restored["params"]
    finally:
        manager.close()


def steps(workdir: str) -> list[int]:
    """The finished checkpoints' steps, ascending ([] without a checkpoints/ folder)."""
    if not os.path.isdir(checkpoint_dir(workdir)):
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
