"""Training: the train state, the jitted step, and the loop (evaluation: jaxlm/evaluation.py).

The loop, top to bottom: mesh -> tokenizer and data -> abstract state and its shardings ->
restore the latest checkpoint or init born-sharded -> jit the step (explicit shardings, donated
state) -> for each step: dispatch, then fetch the previous step's metrics (the device never waits
on the host), evaluate and checkpoint on their schedule. SIGTERM finishes the current step, saves
and exits cleanly; a non-finite loss or gradient norm stops with the step named, without saving.

The step is a pure function of (state, batch): no randomness (jaxlm has no dropout), so a resumed
run replays the uninterrupted one bit for bit given the same data, which the checkpointed grain
iterator guarantees.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxlm import (
    attention,
    checkpoint,
    data,
    distributed,
    finetune,
    lora,
    metrics,
    model,
    objectives,
    optim,
    paths,
    pipeline,
    runtime,
    sharding,
    tokenizer,
)
from jaxlm.config import Config, ConfigError
from jaxlm.evaluation import evaluate, make_eval_step


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint). One line."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # pure nested dict: what the optimizer trains (the model's params, or LoRA factors)
    opt_state: optax.OptState
    # With LoRA, the frozen base params; with distill.teacher, the teacher's params under
    # "teacher" (neither is checkpointed: they are rebuilt from train.init_from or the seed, and
    # from distill.teacher); {} otherwise, which leaves the state and step as without the field.
    frozen: dict = dataclasses.field(default_factory=dict)


# --- state ---------------------------------------------------------------------------------------


def base_dtype(cfg: Config) -> str:
    return cfg.lora.base_dtype or cfg.model.param_dtype


def abstract_state(cfg: Config, tx: optax.GradientTransformation):
    """(graphdef, abstract TrainState, (logical PartitionSpecs of params, of frozen)): nothing
    allocated. With `lora.rank`, the params are the factors and the model's params are frozen."""
    graphdef, param_state = nnx.split(model.abstract(cfg.model), nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(param_state))
    params, frozen, frozen_specs = nnx.to_pure_dict(param_state), {}, {}
    if cfg.lora.rank:  # a classifier's score head is trained in full beside the factors
        dtype = jnp.dtype(base_dtype(cfg))
        frozen = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), v)
                  for k, v in params.items() if k not in HEAD}
        frozen_specs = {k: v for k, v in specs.items() if k not in HEAD}
        head, head_specs = _head(params), _head(specs)
        params = {**jax.eval_shape(lambda: _init_factors(cfg, frozen)), **head}
        specs = {**lora.factor_specs(params), **head_specs}
    if (teacher := finetune.teacher(cfg)) is not None:
        teacher_state = _split_abstract(teacher[1])[1]
        frozen = {**frozen, TEACHER: nnx.to_pure_dict(teacher_state)}
        frozen_specs = {**frozen_specs,
                        TEACHER: nnx.to_pure_dict(nnx.get_partition_spec(teacher_state))}
    opt_state = jax.eval_shape(tx.init, params)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    return graphdef, TrainState(step, params, opt_state, frozen), (specs, frozen_specs)


HEAD = ("w_score_CD",)  # a classifier's score head (model.py): trained even under LoRA
TEACHER = "teacher"  # the frozen part's entry holding distill.teacher's params


@functools.lru_cache(maxsize=4)
def _split_abstract(model_cfg):
    """(graphdef, abstract params) of a model config. Cached: built once by abstract_state,
    outside any mesh (NNX applies the logical sharding names under one), then reused."""
    return nnx.split(model.abstract(model_cfg), nnx.Param)


def _head(tree: dict) -> dict:
    return {k: tree[k] for k in HEAD if k in tree}


def _init_factors(cfg: Config, base):
    return lora.init_factors(base, lora.parse_targets(cfg.lora.targets), cfg.lora.rank,
                             cfg.train.seed)


def model_params(cfg: Config, params: dict, frozen: dict) -> dict:
    """The params the model runs on: the trained ones, or the frozen base with its LoRA factors."""
    if not cfg.lora.rank:
        return params
    base = {k: v for k, v in frozen.items() if k != TEACHER}
    return lora.combine(base, params, lora.scale(cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora))


def _seed_params(cfg: Config) -> dict:
    return nnx.to_pure_dict(nnx.split(model.init(cfg.model, cfg.train.seed), nnx.Param)[1])


def state_shardings(mesh, tx, state: TrainState, logical_specs,
                    rules: sharding.Rules = sharding.DEFAULT_RULES) -> TrainState:
    """Params by their logical names; optimizer moments like their params; the rest replicated."""
    specs, frozen_specs = logical_specs
    param_shardings = sharding.tree_shardings(mesh, specs, rules)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, state.opt_state, param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(replicated, param_shardings, opt_shardings,
                      sharding.tree_shardings(mesh, frozen_specs, rules))


def with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def init_state(cfg: Config, tx, shardings: TrainState, params=None, frozen=None) -> TrainState:
    """A fresh state, each array created directly in its shards (never whole on one device):
    from the model params `params` (placed already, e.g. train.init_from's) or the seed's. With
    LoRA, `frozen` is the placed base (`frozen_base`) and the trained params are new factors
    (B = 0: the adapted model starts as its base)."""

    def init(params, frozen):
        if cfg.lora.rank:
            base = {k: v for k, v in frozen.items() if k != TEACHER}
            params = {**_init_factors(cfg, base), **_head(_seed_params(cfg))}
        elif params is None:
            params = _seed_params(cfg)
        elif cfg.model.num_labels and not _head(params):  # a classifier from an LM: a new head
            params = {**params, **_head(_seed_params(cfg))}
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen)

    return jax.jit(init, out_shardings=shardings, donate_argnums=1)(params, frozen or {})


def frozen_base(cfg: Config, source, abstract: TrainState, shardings: TrainState) -> dict:
    """The state's frozen part, placed on the mesh: with LoRA the base in lora.base_dtype
    (train.init_from's params, or the seed's), with distill.teacher the teacher's params; {}
    with neither."""
    frozen = {}
    if (teacher := finetune.teacher(cfg)) is not None:
        frozen[TEACHER] = finetune.initial_params(
            teacher[0], with_shardings(abstract.frozen[TEACHER], shardings.frozen[TEACHER]))
    if not cfg.lora.rank:
        return frozen
    target = {k: v for k, v in abstract.frozen.items() if k != TEACHER}
    target_shardings = {k: v for k, v in shardings.frozen.items() if k != TEACHER}
    if source is not None:
        return {**frozen, **finetune.initial_params(source, with_shardings(target, target_shardings))}

    def seed():
        base = {k: v for k, v in _seed_params(cfg).items() if k not in HEAD}
        return jax.tree.map(lambda x: x.astype(base_dtype(cfg)), base)

    return {**frozen, **jax.jit(seed, out_shardings=target_shardings)()}


# --- steps ---------------------------------------------------------------------------------------


def make_train_step(cfg: Config, graphdef, tx):
    """(state, batch) -> (state, metrics): gradient accumulation over optim.grad_accum_steps
    microbatches inside the step, then one optimizer update."""
    accum = cfg.optim.grad_accum_steps
    lr_at = optim.schedule(cfg.optim, cfg.train.steps)
    teacher = finetune.teacher(cfg) if cfg.distill.alpha > 0 else None
    objective = objectives.for_config(
        cfg, None if teacher is None else _split_abstract(teacher[1])[0])

    def loss(params, frozen, batch):
        extra = () if teacher is None else (frozen[TEACHER],)  # distillation: its forward too
        return objective(graphdef, model_params(cfg, params, frozen), batch, *extra)

    grad_fn = jax.grad(loss, has_aux=True)  # the trained params only: never the frozen base

    def step(state: TrainState, batch: dict):
        if accum == 1:
            grads, aux = grad_fn(state.params, state.frozen, batch)
        else:
            # Microbatch m takes rows m, m + A, m + 2A, ...: every data shard feeds every microbatch.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
            )

            def add(carry, mb):
                grads, aux = grad_fn(state.params, state.frozen, mb)
                return jax.tree.map(jnp.add, carry, (grads, aux)), None

            # aux is (nll sum, weight sum), plus the attention entropy's (sum, count) when on.
            aux_zeros = (jnp.zeros(()), jnp.zeros(())) + (
                ((jnp.zeros(()), jnp.zeros(())),) if cfg.loss.attention_entropy else ())
            zeros = (jax.tree.map(jnp.zeros_like, state.params), aux_zeros)
            (grads, aux), _ = jax.lax.scan(add, zeros, micro)
        nll_sum, weight = aux[:2]
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {"loss": nll_sum / denom, "grad_norm": optax.tree.norm(grads), "lr": lr_at(state.step)}
        if len(aux) > 2:  # loss.attention_entropy: the mean entropy of the batch's attention
            out["attention_entropy"] = aux[2][0] / jnp.maximum(aux[2][1], 1.0)
        return TrainState(state.step + 1, params, opt_state, state.frozen), out

    return step


def jit_train_step(cfg: Config, graphdef, tx, shardings: TrainState, batch_sharding):
    """The train step as `jaxlm train`, `bench` and `aot` run it: explicit shardings, donated state."""
    return jax.jit(make_train_step(cfg, graphdef, tx), in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)


# --- the loop ------------------------------------------------------------------------------------


def _prepare_workdir(cfg: Config, workdir: str, resuming: bool) -> tokenizer.Tokenizer:
    """Write the resolved config; make the workdir self-contained with its tokenizer."""
    paths.makedirs(workdir)
    saved = paths.join(workdir, "config.json")
    if resuming and paths.isfile(saved):
        old_model = json.loads(paths.read_text(saved))["model"]
        changed = [k for k, v in cfg.to_dict()["model"].items() if old_model.get(k) != v]
        if changed:
            raise TrainingError(f"workdir '{workdir}' holds checkpoints of another model: "
                                f"model.{changed[0]} differs from its config.json")
    if jax.process_index() == 0:
        paths.write_text(saved, cfg.to_json())
    local = paths.join(workdir, "tokenizer.model")
    if resuming and paths.isfile(local):
        tok = tokenizer.for_config(cfg.replace(data={"tokenizer": local}))
    else:
        tok = tokenizer.for_config(cfg)
        if jax.process_index() == 0 and paths.resolve(tok.path) != paths.resolve(local):
            paths.copy(tok.path, local)
    if (line := data.prepare(cfg, tok)) and jax.process_index() == 0:
        print(line, flush=True)
    return tok


def _check_batch_fits(cfg: Config, mesh) -> None:
    shards = sharding.batch_shards(mesh, sharding.rules_for(cfg.mesh))
    rows = cfg.train.global_batch_size // cfg.optim.grad_accum_steps
    if rows % shards:
        raise ConfigError(
            f"config key 'train.global_batch_size' ({cfg.train.global_batch_size}, "
            f"{rows} rows per microbatch) must be divisible by mesh.data x mesh.fsdp ({shards})")
    stages = mesh.shape["stage"]
    if stages > 1:
        micro = pipeline.resolve_microbatches(cfg.mesh.pipeline_microbatches, stages)
        if rows % (shards * micro):
            raise ConfigError(
                f"config key 'train.global_batch_size' ({cfg.train.global_batch_size}, {rows} rows "
                f"per step{' per accumulation microbatch' if cfg.optim.grad_accum_steps > 1 else ''}) "
                f"must be divisible by mesh.data x mesh.fsdp x pipeline microbatches "
                f"({shards} x {micro}); change it or 'mesh.pipeline_microbatches'")


def _task_runner(cfg: Config, tok: tokenizer.Tokenizer):
    """The lm-eval tasks of `train.eval_tasks` as a callable, or None (lm-eval is imported only
    then: it is the `eval` extra, and harness.py sits above this module, as it loads models)."""
    if not cfg.train.eval_tasks.strip():
        return None
    from jaxlm import harness

    try:
        return harness.TrainingTasks(cfg, tok.path)
    except harness.HarnessError as e:
        raise ConfigError(f"config key 'train.eval_tasks': {e}") from None


def _pinned_source(cfg: Config, workdir: str) -> Config:
    """A resumed run keeps the source it started from: its config.json names train.init_from
    pinned to a path and step (finetune.resolve), even if the source has newer checkpoints now."""
    saved = paths.join(workdir, "config.json")
    if not (cfg.train.init_from and paths.isfile(saved) and checkpoint.steps(workdir)):
        return cfg
    pinned = json.loads(paths.read_text(saved))["train"].get("init_from")
    return cfg.replace(train={"init_from": pinned}) if pinned else cfg


def _best_checkpointer(workdir: str, tok) -> checkpoint.Checkpointer:
    """WORKDIR/best: one checkpoint (the best evaluation's) with the tokenizer beside it, so the
    folder is a workdir `jaxlm.load` reads."""
    best = paths.join(workdir, "best")
    if jax.process_index() == 0:
        paths.makedirs(best)
        paths.copy(tok.path, paths.join(best, "tokenizer.model"))
    return checkpoint.Checkpointer(best, keep=1)


def train(cfg: Config, workdir: str) -> dict:
    """Train `cfg` in `workdir`, resuming from its latest checkpoint. Returns the final metrics."""
    return run(cfg, workdir)[1]


def _setup(cfg: Config, devices=None):
    """Mesh, optimizer, graphdef, abstract state and its shardings: all from shapes."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    attention.resolve(cfg.model.attention, cfg.model.dtype, mesh.devices.flat[0].platform)
    rules = sharding.rules_for(cfg.mesh)
    sharding.check_divisible(mesh, cfg.model, rules)
    _check_batch_fits(cfg, mesh)
    tx = optim.make(cfg)
    graphdef, abstract, logical_specs = abstract_state(cfg, tx)
    return mesh, tx, graphdef, abstract, state_shardings(mesh, tx, abstract, logical_specs, rules)


def run(cfg: Config, workdir: str) -> tuple[TrainState, dict]:
    """`train`, also returning the final train state."""
    cfg, source = finetune.resolve(_pinned_source(cfg, workdir))  # model keys, tokenizer, params
    mesh, tx, graphdef, abstract, shardings = _setup(cfg)
    rules = sharding.rules_for(cfg.mesh)
    batch_sharding = data.batch_shardings(cfg, sharding.batch_sharding(mesh, rules))
    ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.keep)
    start = ckpt.latest_step() or 0
    if jax.process_index() == 0:  # prepares the dataset and tokenizer once, for every process
        tok = _prepare_workdir(cfg, workdir, resuming=start > 0)
    multihost_utils.sync_global_devices("jaxlm: data and tokenizer ready")
    if jax.process_index() != 0:
        tok = _prepare_workdir(cfg, workdir, resuming=start > 0)
    train_iter = iter(data.train_dataset(cfg, tok=tok))
    eval_tasks = _task_runner(cfg, tok)  # builds abstract shapes: outside the mesh context
    peak = metrics.peak_tflops_per_device(cfg.train.peak_tflops)  # may time a matmul: outside the mesh
    if jax.process_index() == 0 and (summary := pipeline.summary(cfg.mesh, mesh)):
        print("pipeline: {pipeline_stages} stages, {pipeline_microbatches} microbatches, bubble "
              "fraction {pipeline_bubble}".format(**summary), flush=True)
    with jax.set_mesh(mesh), sharding.logical_rules(rules), pipeline.context(cfg.mesh, mesh):
        frozen = frozen_base(cfg, source, abstract, shardings)  # read again on every resume
        if start:
            start, params, opt_state = ckpt.restore_newest(
                start, with_shardings(abstract.params, shardings.params),
                with_shardings(abstract.opt_state, shardings.opt_state), train_iter,
                cfg.data.streams or jax.process_count())
            state = TrainState(jax.device_put(jnp.int32(start), shardings.step), params, opt_state,
                               frozen)
            if jax.process_index() == 0:  # one writer: another would replace the file under it
                metrics.truncate_after(workdir, start)
            print(f"resumed from step {start}", flush=True)
            if jax.process_index() == 0 and (note := checkpoint.elastic_note(
                    workdir, start, distributed.joined)):
                print(note, flush=True)
        elif source is not None and not cfg.lora.rank:
            params = finetune.initial_params(source, with_shardings(abstract.params, shardings.params))
            state = init_state(cfg, tx, shardings, params, frozen)
        else:
            state = init_state(cfg, tx, shardings, frozen=frozen)
        if source is not None and not start:
            print(f"initialized from {source.path}" + (f" (step {source.step})" if source.step
                                                        is not None else " (HF)"), flush=True)
        if cfg.lora.rank and jax.process_index() == 0:
            trained = lora.count(state.params)
            total = lora.count({k: v for k, v in state.frozen.items() if k != TEACHER})
            print(f"LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {trained:,} trainable "
                  f"parameters, {total:,} frozen ({100 * trained / total:.2f}%)", flush=True)
        train_step = jit_train_step(cfg, graphdef, tx, shardings, batch_sharding)
        eval_step = jax.jit(make_eval_step(graphdef, cfg.model.num_labels))

        writer = metrics.Writer(workdir, cfg.train.steps)
        flops_token = metrics.flops_per_token(cfg.model, cfg.data.seq_len)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        stop = runtime.Stop()
        best = runtime.Best(cfg.checkpoint.best_metric, cfg.checkpoint.best_mode,
                            cfg.train.early_stop_patience, metrics.records(workdir) if start else ())
        best_ckpt = _best_checkpointer(workdir, tok) if best.enabled else None
        pending = None  # (device metrics, step) of the last dispatched step, fetched one step late
        timer, timed_steps = None, 0  # throughput over the steps since the last log line
        last_eval: dict = {}

        def runs_on():  # the params the model runs on now (LoRA: the base with the factors)
            return model_params(cfg, state.params, state.frozen)

        if source is not None and start == 0:  # the starting point, on this run's data
            writer.write(0, evaluate(cfg, graphdef, runs_on(), tok, mesh, eval_step))

        def finish(step_metrics, step):
            nonlocal timer, timed_steps
            host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
                raise TrainingError(
                    f"non-finite loss {host['loss']} / grad norm {host['grad_norm']} at step {step}; "
                    f"stopped without saving (last checkpoint: step {ckpt.latest_step() or 'none'})")
            now = time.perf_counter()
            if timer is None:  # the first step compiled: time from here
                timer, timed_steps = now, 0
            else:
                timed_steps += 1
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                if timed_steps:
                    host.update(metrics.throughput(timed_steps * tokens_per_step, now - timer,
                                                   flops_token, peak))
                    timer, timed_steps = now, 0
                writer.write(step, host)

        # Trace steps start+2 .. start+1+profile_steps: after the compile, before any eval.
        profile_dir = paths.join(workdir, "profile")  # jax writes traces to local files only
        profile = runtime.Profile(paths.cache_path(profile_dir) if paths.is_remote(workdir)
                                  else profile_dir, start + 1, cfg.train.profile_steps)
        try:
            step = start
            while step < cfg.train.steps and not stop.requested and not best.stop:
                batch = data.to_global(next(train_iter), batch_sharding)
                profile.before(step)
                state, step_metrics = train_step(state, batch)
                step += 1
                stop.check(step)
                profile.after(step, step_metrics)
                if pending is not None:
                    finish(*pending)
                pending = (step_metrics, step)
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    finish(*pending)
                    pending = None
                    eval_start = time.perf_counter()
                    last_eval = evaluate(cfg, graphdef, runs_on(), tok, mesh, eval_step)
                    if eval_tasks is not None:
                        last_eval.update(eval_tasks(runs_on(), mesh))
                    writer.write(step, last_eval)
                    try:
                        if best.update(step, last_eval):
                            best_ckpt.save(step, state.params, state.opt_state, train_iter, cfg)
                    except KeyError as e:
                        raise TrainingError(e.args[0]) from None
                    if timer is not None:  # throughput counts training time only
                        timer += time.perf_counter() - eval_start
                if (step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop.requested
                        or best.stop):
                    if pending is not None:  # never save a state whose loss was not checked
                        finish(*pending)
                        pending = None
                    ckpt.save(step, state.params, state.opt_state, train_iter, cfg)
                    writer.flush()  # on object storage, lines are otherwise rewritten every few s
            if pending is not None:
                finish(*pending)
            if not last_eval and step >= cfg.train.steps:  # e.g. a finished run started again
                last_eval = evaluate(cfg, graphdef, runs_on(), tok, mesh, eval_step)
        finally:
            profile.stop()
            stop.restore()
            for manager in (ckpt, best_ckpt) if best_ckpt else (ckpt,):
                try:
                    manager.wait()
                finally:
                    manager.close()
            writer.close()
    extra = {f"best_{best.metric}": best.best, "best_step": best.best_step,
             "early_stopped": best.stop} if best.enabled else {}
    return state, {"step": step, "stopped_by_sigterm": stop.requested, **last_eval, **extra}
