"""Mesh axes, and the mapping from the model's logical axis names to them.

The model names every parameter and activation dimension with a logical name (batch, length,
embed, heads, kv_heads, head_dim, mlp, vocab, layers). Rules map logical names to mesh axes
(data, stage, fsdp, tensor); this is the only module that names mesh axes. Moving between data,
FSDP and tensor parallelism is a change of rules or mesh sizes, never of model code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "stage", "fsdp", "tensor")

# Logical name -> mesh axes it is split over, in order. A name missing here is replicated.
Rules = tuple[tuple[str, tuple[str, ...]], ...]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("layers", ("stage",)),
)

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    "jaxlm_logical_rules", default=None
)


@contextlib.contextmanager
def logical_rules(rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (and a `jax.set_mesh`), `constrain` places activations by `rules`."""
    token = _ACTIVE_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def logical_to_spec(
    names: Sequence[str | None], rules: Rules, mesh_axes: Sequence[str] = MESH_AXES
) -> PartitionSpec:
    """PartitionSpec for logical `names`; a mesh axis is used at most once per spec.

    When two dimensions map to the same mesh axis, the first (leftmost) one gets it and later
    ones drop it, so a spec is always valid. Mesh axes absent from `mesh_axes` are skipped.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        axes = [a for a in table.get(name, ()) if a in mesh_axes and a not in used]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Ask XLA to place activation `x` by its logical `names`; a no-op without a mesh and rules."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.axis_names))
