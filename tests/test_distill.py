"""Knowledge distillation (distill.teacher): alpha = 0 is the plain step bit for bit; a student
identical to its teacher has zero KL and zero KL gradient; the loss equals a hand computation;
a teacher larger than the student, sharded on 8 devices, gives the one-device loss; bad input."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import config, finetune, objectives, optim, sharding, train
from jaxlm.config import ConfigError

pytestmark = pytest.mark.slow

TEACHER = {"vocab_size": 512, "d_model": 48, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
           "mlp_dim": 96, "max_seq_len": 64}
STUDENT = {"vocab_size": 512, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
           "mlp_dim": 64, "max_seq_len": 64}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, stdlib_data_dir):
    """A short LM run on the embedded corpus, larger than the student."""
    out = str(tmp_path_factory.mktemp("teacher"))
    train.train(config.from_dict({
        "model": TEACHER, "data": {"data_dir": stdlib_data_dir, "seq_len": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 3, "global_batch_size": 8, "eval_every": 3, "eval_batches": 1},
        "checkpoint": {"every": 3}}), out)
    return out


def student_cfg(teacher, **distill):
    return config.from_dict({
        "model": STUDENT, "data": {"seq_len": 16, "tokenizer": os.path.join(teacher, "tokenizer.model")},
        "distill": {"teacher": teacher, **distill}})


BATCH_TOKENS = np.random.RandomState(0).randint(4, 512, (8, 17))


def batch():
    weights = np.ones((8, 16), np.float32)
    weights[:, :3] = 0.0  # e.g. an SFT prompt: those targets count nowhere
    return {"inputs": BATCH_TOKENS[:, :-1], "targets": BATCH_TOKENS[:, 1:],
            "segment_ids": np.ones((8, 16), np.int32),
            "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy(),
            "weights": weights}


def one_step(cfg, mesh_keys=None, devices=None, steps=1):
    """(state, metrics) after `steps` train steps from the seed on `batch()`."""
    cfg = cfg.replace(mesh=mesh_keys or {"data": 1})
    mesh, tx, graphdef, abstract, shardings = train._setup(cfg, devices or jax.devices()[:1])
    rules = sharding.rules_for(cfg.mesh)
    with jax.set_mesh(mesh), sharding.logical_rules(rules):
        frozen = train.frozen_base(cfg, None, abstract, shardings)
        state = train.init_state(cfg, tx, shardings, frozen=frozen)
        bs = sharding.batch_sharding(mesh, rules)
        step = train.jit_train_step(cfg, graphdef, tx, shardings, bs)
        for _ in range(steps):
            state, out = step(state, {k: jax.device_put(v, bs) for k, v in batch().items()})
    return jax.device_get(state), jax.device_get(out)


def test_alpha_zero_is_the_plain_step_bit_for_bit(teacher):
    plain = student_cfg(teacher).replace(distill={"teacher": ""})
    (s_plain, m_plain), (s_zero, m_zero) = one_step(plain), one_step(student_cfg(teacher, alpha=0.0))
    assert train.TEACHER in s_zero.frozen  # the teacher is there, and changes nothing
    assert float(m_plain["loss"]) == float(m_zero["loss"])
    for a, b in zip(jax.tree.leaves(s_plain.params), jax.tree.leaves(s_zero.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loss_equals_a_hand_computation_and_identical_models_have_zero_kl(teacher):
    cfg = student_cfg(teacher, alpha=0.3, temperature=2.5)
    _, abstract, _ = train.abstract_state(cfg, optim.make(cfg))
    graphdef, _ = train._split_abstract(cfg.model)
    src, teacher_model = finetune.teacher(cfg)
    teacher_graphdef, _ = train._split_abstract(teacher_model)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    teacher_params = finetune.initial_params(src, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract.frozen["teacher"]))
    student_params = train._seed_params(cfg)
    b = batch()
    loss = objectives.for_config(cfg, teacher_graphdef)
    total, (nll_sum, weight) = loss(graphdef, student_params, b, teacher_params)

    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    args = (b["inputs"], b["segment_ids"], b["positions"])
    s = np.asarray(nnx.merge(graphdef, student_params)(*args))
    t = np.asarray(nnx.merge(teacher_graphdef, teacher_params)(*args))
    T, w = 2.5, b["weights"]
    log_p, log_q = log_softmax(t / T), log_softmax(s / T)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    nll = -np.take_along_axis(log_softmax(s), b["targets"][..., None], -1)[..., 0]
    want = 0.3 * T**2 * (kl * w).sum() + 0.7 * (nll * w).sum()
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert float(nll_sum) == pytest.approx((nll * w).sum(), rel=1e-5) and float(weight) == w.sum()

    # The teacher as its own student, alpha = 1: the KL term and its gradient are 0.
    same = student_cfg(teacher, alpha=1.0).replace(model=TEACHER)
    kl_only = objectives.for_config(same, teacher_graphdef)
    value, grads = jax.value_and_grad(
        lambda p: kl_only(teacher_graphdef, p, b, teacher_params)[0])(teacher_params)
    assert abs(float(value)) < 1e-4
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6


def test_a_larger_teacher_on_eight_devices_gives_the_one_device_loss(teacher):
    cfg = student_cfg(teacher, alpha=0.5)
    one_state, one = one_step(cfg, steps=2)
    many_state, many = one_step(cfg, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), steps=2)
    assert float(many["loss"]) == pytest.approx(float(one["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(many_state.params),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_bad_teachers_are_one_line(teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"'distill.teacher': '.*' has a vocabulary of 512 "
                                          r"tokens and the student 256"):
        finetune.teacher(student_cfg(teacher).replace(model={"vocab_size": 256}))
    with pytest.raises(ConfigError, match="'distill.teacher': '.*' is neither a jaxlm workdir"):
        finetune.teacher(student_cfg(str(tmp_path)))
    with pytest.raises(ConfigError, match="'distill.alpha' must be in \\[0, 1\\]"):
        student_cfg(teacher, alpha=1.5)
