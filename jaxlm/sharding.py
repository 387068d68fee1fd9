"""Mesh axes, and the mapping from the model's logical axis names to them.

The model names every parameter and activation dimension with a logical name (batch, length,
embed, heads, kv_heads, head_dim, mlp, vocab, layers). Rules map logical names to mesh axes
(data, stage, fsdp, tensor); this is the only module that names mesh axes. Moving between data,
FSDP and tensor parallelism is a change of rules or mesh sizes, never of model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxlm.config import ConfigError

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


def rules_for(mesh_cfg) -> Rules:
    """The default rules, plus `length` over `tensor` when mesh.sequence_parallel is set: the
    residual stream between blocks (norms, residual adds) is then split along the sequence
    instead of replicated over the tensor axis."""
    if mesh_cfg.sequence_parallel:
        return DEFAULT_RULES + (("length", ("tensor",)),)
    return DEFAULT_RULES


def active_axes(mesh) -> tuple[str, ...]:
    """Mesh axes of size > 1: a spec never names an axis that splits nothing."""
    return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Ask XLA to place activation `x` by its logical `names`; a no-op without a mesh and rules."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, active_axes(mesh)))


def current_specs(names_list: Sequence[Sequence[str | None]]) -> list[PartitionSpec] | None:
    """PartitionSpecs of several logical name tuples under the current mesh and rules; None when
    there is no mesh or rules (for code, such as a Pallas kernel, that places data itself)."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return None
    return [logical_to_spec(names, rules, active_axes(mesh)) for names in names_list]


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
    """Mesh (data, stage, fsdp, tensor) from `config.mesh`; one axis of -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(
                f"config keys mesh.* = {dict(zip(MESH_AXES, sizes, strict=True))} cannot fill "
                f"{len(devices)} devices: {len(devices)} is not divisible by {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"config keys mesh.data x stage x fsdp x tensor = {' x '.join(map(str, sizes))} = "
            f"{math.prod(sizes)} does not match the {len(devices)} devices present"
        )
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    except AssertionError:
        # jax orders TPU devices by their physical topology only with one device per chip; a
        # TPU v4 topology compiled for without a TPU lists both cores of each chip. Their order
        # changes which links collectives use, not what fits, so take them as listed.
        return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def without_stages(mesh_cfg) -> dict[str, int]:
    """Mesh sizes for inference from a training mesh config: no pipeline stages, their devices
    going to data (which fills what is left, unless another axis already does)."""
    sizes = {axis: getattr(mesh_cfg, axis) for axis in ("data", "fsdp", "tensor")}
    if -1 not in sizes.values():
        sizes["data"] = -1
    return {**sizes, "stage": 1, "sequence_parallel": False}


def named_sharding(mesh, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, active_axes(mesh)))


def tree_shardings(mesh, logical_specs, rules: Rules = DEFAULT_RULES):
    """Map a tree of logical PartitionSpecs (from `nnx.get_partition_spec`) to NamedShardings."""
    return jax.tree.map(
        lambda spec: named_sharding(mesh, tuple(spec), rules),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return named_sharding(mesh, ("batch", "length"), rules)


def batch_shards(mesh, rules: Rules = DEFAULT_RULES) -> int:
    """Into how many pieces the batch dimension is split (what global batches must divide by)."""
    axes = logical_to_spec(("batch",), rules, active_axes(mesh))[0] or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def fetch(x: jax.Array) -> np.ndarray:
    """The whole value of `x` on this host: a plain copy, or with several processes (when `x`
    spans devices of other hosts) an all-gather, which every process must call alike."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(mesh, model_cfg, rules: Rules = DEFAULT_RULES) -> None:
    """Every sharded model dimension divides evenly over its mesh axes; otherwise one
    ConfigError line naming the config key and the mesh axes (before anything compiles)."""
    head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads
    dimensions = (  # (logical name, config key, size), checked in this order
        ("heads", "model.num_heads", model_cfg.num_heads),
        ("kv_heads", "model.num_kv_heads", model_cfg.num_kv_heads),
        ("mlp", "model.mlp_dim", model_cfg.mlp_dim),
        ("vocab", "model.vocab_size", model_cfg.vocab_size),
        ("embed", "model.d_model", model_cfg.d_model),
        ("head_dim", "model.head_dim", head_dim),
        ("layers", "model.num_layers", model_cfg.num_layers),
    )
    for name, key, size in dimensions:
        axes = logical_to_spec((name,), rules, active_axes(mesh))[0] or ()
        axes = (axes,) if isinstance(axes, str) else axes
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            mesh_keys = " x ".join(f"mesh.{a}" for a in axes)
            raise ConfigError(f"config key '{key}' ({size}) is not divisible by {mesh_keys} "
                              f"({ways}), over which its '{name}' dimension is sharded")
