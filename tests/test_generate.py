"""Generation: the KV cache against the full forward, greedy parity with transformers' generate,
sampling, bucketing, sharded decoding, and one-line errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxlm
from jaxlm import api, config, generate, model

VOCAB = 96  # divisible by the tensor axis of the sharded tests


def tiny(scan: bool = True, **model_overrides):
    return config.from_dict({
        "model": {"vocab_size": VOCAB, "d_model": 32, "num_layers": 3, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 64, "max_seq_len": 64, "scan_layers": scan,
                  **model_overrides},
        "data": {"seq_len": 32},
    })


@pytest.fixture(scope="module")
def lm():
    return api.LM(tiny(), model.init(tiny().model, seed=1), eos_ids=[])


PROMPTS = [[2, 5, 7, 9, 11], [2, 40], [2, 13, 50, 60, 70, 80, 90, 1, 4, 6], [2, 8, 8]]


@pytest.mark.parametrize("scan, unstack", [(True, False), (False, False), (False, True)],
                         ids=["scanned", "unrolled", "per_layer_buffers"])
def test_cached_decode_logits_equal_full_forward(scan, unstack):
    """Prefill a left-padded batch, then decode token by token: every step's logits equal the
    full forward of that row's unpadded prefix."""
    cfg = tiny(scan)
    decoder = model.init(cfg.model, seed=3)
    graphdef, params = nnx.split(decoder, nnx.Param)
    layers = model.unstack_layers(params) if unstack else None
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))

    @jax.jit
    def step(p, layers, tokens, segment_ids, positions, cache):
        return nnx.merge(graphdef, p)(tokens, segment_ids, positions, cache=cache, layers=layers)

    rng = np.random.RandomState(0)
    lengths = [6, 2, 9]
    P, steps = 16, 5
    rows = [rng.randint(4, VOCAB, n).tolist() for n in lengths]
    tokens = np.zeros((3, P), np.int32)
    start = np.array([P - n for n in lengths], np.int32)
    for r, row in enumerate(rows):
        tokens[r, P - len(row):] = row
    slots = np.arange(P)[None]
    segment_ids = (slots >= start[:, None]).astype(np.int32)
    positions = np.maximum(slots - start[:, None], 0)
    cache = model.KVCache.empty(cfg.model, 3, P + steps, jnp.asarray(start), per_layer=unstack)
    logits, cache = step(params, layers, tokens, segment_ids, positions, cache)
    k = jnp.stack(cache.k_NBGTK) if unstack else cache.k_NBGTK
    assert int(cache.index) == P and k.shape == (3, 3, 2, P + steps, 8)
    got = [[] for _ in rows]  # per row: the logits of each step, for prefixes of growing length
    for _ in range(steps):
        for r in range(3):
            got[r].append(np.asarray(logits)[r, -1])
        nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
        rows = [row + [int(t)] for row, t in zip(rows, nxt, strict=True)]
        pos = np.asarray([[len(row) - 1] for row in rows], np.int32)
        logits, cache = step(params, layers, nxt[:, None].astype(np.int32), None, pos, cache)
    for r, row in enumerate(rows):
        # The full forward's logits at position j are those of the prefix row[:j + 1] alone
        # (causality is tested in test_model.py): one forward checks every step of the row.
        full = np.asarray(forward(params, np.asarray([row[:-1]])))[0]
        np.testing.assert_allclose(np.stack(got[r]), full[lengths[r] - 1:], atol=1e-4, rtol=0)


def test_generate_greedy_equals_argmax_loop_and_reports_logprobs(lm):
    out = lm.generate(PROMPTS, max_new_tokens=9, logprobs=True)
    assert out.finish_reasons == ["length"] * 4 and out.texts is None
    for r, prompt in enumerate(PROMPTS):
        seq = list(prompt) + out.ids[r]
        # Teacher-forced on the whole sequence: each emitted token is the argmax after its prefix.
        logits = np.asarray(lm.logits([seq[:-1]]))[0, len(prompt) - 1:]
        np.testing.assert_array_equal(logits.argmax(-1), out.ids[r])
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        np.testing.assert_allclose(out.logprobs[r], logp[np.arange(9), out.ids[r]], atol=1e-4)


def test_eos_ends_a_row_and_masks_what_follows(lm):
    free = lm.generate(PROMPTS, max_new_tokens=9)
    eos = free.ids[0][3]  # a token row 0 emits at step 3: make it the EOS
    lm.eos_ids = [eos]  # EOS ids are traced: the same compiled programs run
    try:
        out = lm.generate(PROMPTS, max_new_tokens=9)
    finally:
        lm.eos_ids = []
    for r, row in enumerate(free.ids):
        cut = row.index(eos) if eos in row else None
        assert out.ids[r] == row[:cut]
        assert out.finish_reasons[r] == ("eos" if cut is not None else "length")
    assert out.ids[0] == free.ids[0][:3]


def test_prompt_lengths_share_a_bucket(lm):
    lm.generate([[2, 3, 4, 5, 6]], max_new_tokens=5)
    compiled = len(lm._generator.compiled)
    lm.generate([[2, 3, 4, 5, 6, 7, 8]], max_new_tokens=7)  # same buckets: batch 1, P 8, buffer 8
    assert len(lm._generator.compiled) == compiled
    lm.generate([[2] * 12], max_new_tokens=5)  # P 16: a new program
    assert len(lm._generator.compiled) == compiled + 1
    assert generate.bucket(1) == 8 and generate.bucket(9) == 16 and generate.bucket(16) == 16


# --- transformers parity -------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=144, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})).eval()
    hf.save_pretrained(tmp_path)
    lm = jaxlm.load(str(tmp_path))
    assert lm.eos_ids == [hf.config.eos_token_id]
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 101, n).tolist() for n in (5, 11, 1, 8)]
    lm.eos_ids = []
    eos = lm.generate(prompts, max_new_tokens=20).ids[0][3]  # EOS that row 0 meets mid-way
    lm.eos_ids = [eos]
    ours = lm.generate(prompts, max_new_tokens=20)
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                             eos_token_id=eos, pad_token_id=0)
    reasons = []
    for r in range(len(prompts)):
        row = theirs[r, P:].tolist()
        cut = row.index(eos) if eos in row else len(row)
        assert ours.ids[r] == row[:cut], r
        reasons.append("eos" if cut < len(row) else "length")
    assert ours.finish_reasons == reasons and reasons.count("eos") >= 1 and "length" in reasons


# --- sampling ------------------------------------------------------------------------------------


def test_same_seed_same_sample_and_top_k_1_is_greedy(lm):
    kwargs = dict(max_new_tokens=12, temperature=1.0)
    a = lm.generate(PROMPTS, seed=7, **kwargs).ids
    assert lm.generate(PROMPTS, seed=7, **kwargs).ids == a
    assert lm.generate(PROMPTS, seed=8, **kwargs).ids != a
    greedy = lm.generate(PROMPTS, max_new_tokens=12).ids
    assert lm.generate(PROMPTS, seed=7, top_k=1, **kwargs).ids == greedy
    assert a != greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(probs[None], jnp.float32))
    kept = lambda **kw: np.isfinite(np.asarray(generate.filter_logits(logits, **kw)))[0]  # noqa: E731
    # 0.5 < 0.6 so a second token is needed; 0.5 + 0.2 reaches 0.6.
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=0, top_p=0.6), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=0, top_p=0.5), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=0, top_p=0.86), [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=2, top_p=1.0), [1, 1, 0, 0, 0])
    # top-k first, then top-p on what is left (transformers' order): renormalized 0.5/0.85 < 0.6.
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=3, top_p=0.6), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=3, top_p=0.55), [1, 0, 0, 0, 0])


def test_temperature_reshapes_the_empirical_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 3))
    draw = jax.jit(lambda key, t: generate.choose(logits, key, t, jnp.int32(0), jnp.float32(1.0))[0])
    for t in (1.0, 0.5, 2.0):
        counts = np.bincount(np.asarray(draw(jax.random.key(0), jnp.float32(t))), minlength=3)
        want = probs ** (1 / t) / (probs ** (1 / t)).sum()
        np.testing.assert_allclose(counts / counts.sum(), want, atol=0.03)
    assert np.all(np.asarray(draw(jax.random.key(0), jnp.float32(0.0))) == 0)  # greedy


# --- sharded decoding ----------------------------------------------------------------------------


def test_sharded_generation_gives_the_single_device_tokens(lm):
    """A config trained with pipeline stages generates without them, on data2 x fsdp2 x tensor2."""
    want = lm.generate(PROMPTS, max_new_tokens=10).ids
    staged = lm.config.replace(mesh={"data": 1, "stage": 2, "fsdp": 2, "tensor": 2})
    sharded = api.LM(staged, nnx.merge(lm.graphdef, jax.device_get(lm.params)), eos_ids=[],
                     mesh="config")
    assert dict(sharded.mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "tensor": 2}
    w_q = sharded.params["blocks"]["attn"]["w_q_HKD"][...]
    assert w_q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
    out = sharded.generate(PROMPTS, max_new_tokens=10)
    assert out.ids == want
    assert sharded._generator.compiled  # it really ran on the 8-device mesh
    assert len(sharded.mesh.devices.flat) == 8


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, named", [
    (dict(prompts=[[2] * 60], max_new_tokens=8), "prompt 0 has 60 tokens"),
    (dict(prompts=[[2, VOCAB]]), f"token id {VOCAB}"),
    (dict(prompts=[[2, -1]]), "token id -1"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[2]], temperature=-0.5), "temperature"),
    (dict(prompts=[[2]], top_p=0.0), "top_p"),
    (dict(prompts=[[2]], top_p=1.5), "top_p"),
    (dict(prompts=[[2]], top_k=-1), "top_k"),
    (dict(prompts=[[2]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=["def "]), "no tokenizer"),
    (dict(prompts=[[2]], stop=["\n"]), "need a tokenizer"),
])
def test_bad_input_is_one_clear_line(lm, kwargs, named):
    prompts = kwargs.pop("prompts")
    with pytest.raises(generate.GenerateError) as e:
        lm.generate(prompts, **kwargs)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_unknown_quantization_is_one_line(lm):
    with pytest.raises(generate.GenerateError, match="unknown quantization 'int4'; valid: none, int8"):
        api.LM(lm.config, nnx.merge(lm.graphdef, lm.params), quantize="int4")
