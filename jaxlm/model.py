"""The Llama-style decoder: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU, in Flax NNX.

Dimension key (suffixes on tensor and weight names; the name is the shape comment):
  B batch   L length (queries)   S length (keys)   D d_model   F mlp hidden   V vocab
  H query heads   G kv heads   K head dim   N layers   C classes (model.num_labels)

Every parameter carries logical axis names (batch, length, embed, heads, kv_heads, head_dim, mlp,
vocab, layers) in its `out_sharding` metadata, and activations at block boundaries go through
`sharding.constrain`. This file never names a device axis: `sharding.py` maps the names to devices.

Numerics: parameters are stored in `param_dtype` and cast to `dtype` where used; RMSNorm
statistics, RoPE angles, attention scores and softmax, and the logits are float32.

The blocks are always stored stacked, with a leading `layers` axis, whether they run under
`lax.scan` (`scan_layers=True`: one compiled body, fast compile) or an unrolled Python loop.
One parameter layout for both keeps checkpoints and HF conversion independent of that choice.

Decoding uses the same code: a `KVCache` (jaxlm/kv_cache.py: keys and values stacked along
`layers` like the params, or per layer with per-layer weights) is passed through the same layer
loop, and each attention writes its new keys and values into it.
A matmul weight may hold a `quantize.QArray` (int8 + scales) instead of a float array; `_matmul`
multiplies by it inside the jitted program (jaxlm/quantize.py). It may also hold a
`lora.LoraWeight` (a frozen weight and its low-rank factors), whose two products `_matmul` adds.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlm import attention as attention_lib
from jaxlm import kv_cache, lora, pipeline, quantize
from jaxlm.config import ModelConfig
from jaxlm.kv_cache import KVCache, head_dim
from jaxlm.sharding import constrain

ACTIVATION = ("batch", "length", "embed")
def _param(rngs: nnx.Rngs, shape, names, std: float, cfg: ModelConfig) -> nnx.Param:
    init = jax.nn.initializers.normal(std)
    value = init(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
    # eager_sharding=False: the names are logical, and placement is decided by sharding.py from
    # the abstract state, not by Flax at construction time.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        ones_D = jnp.ones((cfg.d_model,), jnp.dtype(cfg.param_dtype))
        self.scale_D = nnx.Param(ones_D, out_sharding=("embed",), eager_sharding=False)
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = x_BLD.astype(jnp.float32)
        ms_BL1 = jnp.mean(jnp.square(x_BLD), axis=-1, keepdims=True)
        normed_BLD = x_BLD * jax.lax.rsqrt(ms_BL1 + self.eps)
        return (normed_BLD * self.scale_D[...].astype(jnp.float32)).astype(self.dtype)


def rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split convention (the HF Llama layout): pairs (i, i + K/2)."""
    K = x_BLHK.shape[-1]
    inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    angle_BLK2 = positions_BL.astype(jnp.float32)[..., None] * inv_freq_K2
    cos_BL1K2 = jnp.cos(angle_BLK2)[:, :, None, :]
    sin_BL1K2 = jnp.sin(angle_BLK2)[:, :, None, :]
    x1_BLHK2, x2_BLHK2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    out_BLHK = jnp.concatenate(
        [x1_BLHK2 * cos_BL1K2 - x2_BLHK2 * sin_BL1K2, x2_BLHK2 * cos_BL1K2 + x1_BLHK2 * sin_BL1K2],
        axis=-1,
    )
    return out_BLHK.astype(x_BLHK.dtype)


def _matmul(spec: str, x, weight: nnx.Param, dtype, **kwargs):
    """`jnp.einsum(spec, x, weight)` in `dtype`, for a float or an int8-quantized weight, or a
    frozen weight with LoRA factors (jaxlm/lora.py)."""
    w = weight.get_value()
    if isinstance(w, lora.LoraWeight):
        return lora.einsum(spec, x, w, dtype, **kwargs)
    return quantize.einsum(spec, x, w, dtype, cpu=attention_lib.platform() == "cpu", **kwargs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.w_q_HKD = _param(rngs, (H, K, D), ("heads", "head_dim", "embed"), cfg.init_std, cfg)
        self.w_k_GKD = _param(rngs, (G, K, D), ("kv_heads", "head_dim", "embed"), cfg.init_std, cfg)
        self.w_v_GKD = _param(rngs, (G, K, D), ("kv_heads", "head_dim", "embed"), cfg.init_std, cfg)
        self.w_o_DHK = _param(rngs, (D, H, K), ("embed", "heads", "head_dim"), out_std, cfg)
        self.dtype = jnp.dtype(cfg.dtype)
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention

    def _rotated_qk(self, x_BLD, positions_BL):
        q_BLHK = _matmul("BLD,HKD->BLHK", x_BLD, self.w_q_HKD, self.dtype)
        k_BLGK = _matmul("BLD,GKD->BLGK", x_BLD, self.w_k_GKD, self.dtype)
        return rope(q_BLHK, positions_BL, self.rope_theta), rope(k_BLGK, positions_BL, self.rope_theta)

    def probabilities(self, x_BLD, positions_BL, segment_ids_BL):
        """float32 [B, H, L, S] attention probabilities of the reference path (for looking)."""
        return attention_lib.probabilities(*self._rotated_qk(x_BLD, positions_BL), segment_ids_BL)

    def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache: KVCache | None = None,
                 layer=0, entropy: bool = False):
        """(output, cache, entropy sum): with a `cache`, the new keys and values are written into
        its row `layer` at slot `cache.index` and the updated cache is returned; without one,
        None. With `entropy`, the float32 sum over batch, heads and real queries (segment id
        not 0) of each query's attention entropy (loss.attention_entropy); else None."""
        dt = self.dtype
        q_BLHK = _matmul("BLD,HKD->BLHK", x_BLD, self.w_q_HKD, dt)
        k_BLGK = _matmul("BLD,GKD->BLGK", x_BLD, self.w_k_GKD, dt)
        v_BLGK = _matmul("BLD,GKD->BLGK", x_BLD, self.w_v_GKD, dt)
        # Names let the save_attn remat policy keep exactly these tensors.
        q_BLHK = checkpoint_name(rope(q_BLHK, positions_BL, self.rope_theta), "query")
        k_BLGK = checkpoint_name(rope(k_BLGK, positions_BL, self.rope_theta), "key")
        v_BLGK = checkpoint_name(v_BLGK, "value")
        if cache is None or cache.fresh:
            # Training, scoring and prefill: the kernel over the tokens given (a prefill writes
            # the whole prompt into an empty cache, so nothing else is there to attend to).
            out_BLHK = attention_lib.attention(
                q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, implementation=self.implementation,
                entropy=entropy)
        entropy_sum = None
        if entropy:
            if cache is not None:
                raise ValueError("the attention entropy is a training term: not with a KV cache")
            out_BLHK, entropy_BLH = out_BLHK
            real_BL = attention_lib.real_queries(segment_ids_BL, x_BLD.shape[:2])
            entropy_sum = (entropy_BLH * real_BL[..., None]).sum()
        if cache is not None:
            cache, k_BGTK, v_BGKT = kv_cache.write(cache, layer, k_BLGK, v_BLGK)
            if not cache.fresh:
                # Decode: query l sits in slot index + l and sees the row's real slots up to it.
                allowed_BLT = kv_cache.allowed(cache, q_BLHK.shape[1], segment_ids_BL)
                out_BLHK = attention_lib.cached_attention(q_BLHK, k_BGTK, v_BGKT, allowed_BLT)
        out_BLHK = checkpoint_name(out_BLHK, "attn_out")
        return _matmul("BLHK,DHK->BLD", out_BLHK, self.w_o_DHK, dt), cache, entropy_sum


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.w_gate_FD = _param(rngs, (F, D), ("mlp", "embed"), cfg.init_std, cfg)
        self.w_up_FD = _param(rngs, (F, D), ("mlp", "embed"), cfg.init_std, cfg)
        self.w_down_DF = _param(rngs, (D, F), ("embed", "mlp"), out_std, cfg)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BLD):
        dt = self.dtype
        gate_BLF = _matmul("BLD,FD->BLF", x_BLD, self.w_gate_FD, dt)
        up_BLF = _matmul("BLD,FD->BLF", x_BLD, self.w_up_FD, dt)
        # Not "length": under sequence parallelism the MLP sees whole sequences, split on mlp.
        hidden_BLF = constrain(jax.nn.silu(gate_BLF) * up_BLF, ("batch", None, "mlp"))
        return _matmul("BLF,DF->BLD", hidden_BLF, self.w_down_DF, dt)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache: KVCache | None = None,
                 layer=0, entropy: bool = False):
        """(output, cache, attention entropy sum or None): see Attention.__call__."""
        attn_BLD, cache, entropy_sum = self.attn(self.attn_norm(x_BLD), positions_BL,
                                                 segment_ids_BL, cache, layer, entropy)
        h_BLD = constrain(x_BLD + attn_BLD, ACTIVATION)
        out_BLD = h_BLD + self.mlp(self.mlp_norm(h_BLD))
        return constrain(out_BLD, ACTIVATION), cache, entropy_sum

    def attention_probabilities(self, x_BLD, positions_BL, segment_ids_BL):
        return self.attn.probabilities(self.attn_norm(x_BLD), positions_BL, segment_ids_BL)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter has a leading `layers` axis of size num_layers."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    return make(rngs)


def remat_policy(name: str):
    """What the backward pass keeps of a block's forward; everything else is recomputed.

    none: keep everything (fastest, most memory). full: keep only the block's input.
    save_dots: keep matmul outputs that have no batch dimension (the projections), recompute
    the rest (norms, activations, attention). save_attn: keep q, k, v and the attention output,
    recompute the MLP and the projections to them.
    """
    match name:
        case "none":
            return None
        case "full":
            return jax.checkpoint_policies.nothing_saveable
        case "save_dots":
            return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        case "save_attn":
            return jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out")
        case _:
            raise ValueError(
                f"unknown remat policy {name!r}; valid: none, full, save_dots, save_attn"
            )


class Decoder(nnx.Module):
    """tokens [B, L] (+ optional segment_ids, positions) -> float32 logits [B, L, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.d_model
        self.embed_VD = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, cfg)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(cfg)
        if cfg.num_labels:
            # A classifier (HF's LlamaForSequenceClassification): a score head in place of the
            # output layer, replicated (it is tiny). Created last, so every other parameter has
            # the values an LM of the same seed gets.
            self.w_score_CD = _param(rngs, (cfg.num_labels, D), (None, "embed"), cfg.init_std, cfg)
        elif not cfg.tie_embeddings:
            # [vocab, d_model] like the embedding (and HF's lm_head): the backward pass then needs
            # no transposed copy of the [tokens, vocab] logit gradient (measured ~30% faster on
            # CPU for the output layer; docs/performance.md).
            self.w_out_VD = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, cfg)

    def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, *,
                 cache: KVCache | None = None, last_only: bool = False, at_BS=None,
                 layers=None, attention_entropy: bool = False):
        """Logits for `tokens_BL`. Packed rows pass `segment_ids_BL` (attention stays within a
        segment) and `positions_BL` (RoPE positions restarting at 0 in each segment).

        With `cache`, returns (logits, cache) with the tokens' keys and values written at
        `cache.index` (jaxlm/generate.py). `last_only` computes the logits of the last position
        only ([B, 1, V]): a prefill needs no more, and [B, L, V] would be the largest buffer.
        `at_BS` (int [B, S]) computes the logits of those positions of each row only ([B, S, V]).
        `layers`, a list of one State per layer (`unstack_layers`), runs the blocks from those
        instead of the stacked params, unrolled (see `unstack_layers` for why).

        `attention_entropy` (training, loss.attention_entropy) returns (logits, (entropy sum,
        count)): every layer's per-query attention entropies summed over layers, heads and real
        queries, and how many there are (their mean is sum / count)."""
        if attention_entropy:
            x_BLD, entropy = self._hidden(self.embed(tokens_BL), segment_ids_BL, positions_BL,
                                          None, entropy=True)
            return self.project(x_BLD), entropy
        x_BLD, cache = self._hidden(self.embed(tokens_BL), segment_ids_BL, positions_BL, cache,
                                    layers)
        if last_only:
            x_BLD = x_BLD[:, -1:]
        elif at_BS is not None:
            x_BLD = jnp.take_along_axis(x_BLD, at_BS[..., None], axis=1)
        logits_BLV = self.project(x_BLD)
        return logits_BLV if cache is None else (logits_BLV, cache)

    def classify(self, tokens_BL, segment_ids_BL=None, positions_BL=None, *,
                 attention_entropy: bool = False):
        """float32 class logits [B, C]: the score head on the final hidden state of each row's
        last real token, the rightmost one whose segment id is not 0 (so left- and right-padded
        rows pool the same token; transformers pools the rightmost non-pad id). Without
        segment ids every token is real and the last position is pooled. `attention_entropy`
        returns (logits, (entropy sum, count)) as `__call__` does."""
        if not self.cfg.num_labels:
            raise ValueError("this model has no score head (model.num_labels is 0)")
        x_BLD, entropy = self._hidden(self.embed(tokens_BL), segment_ids_BL, positions_BL, None,
                                      entropy=attention_entropy)
        B, L = tokens_BL.shape
        if segment_ids_BL is None:
            last_B = jnp.full((B,), L - 1, jnp.int32)
        else:
            last_B = L - 1 - jnp.argmax((segment_ids_BL != 0)[:, ::-1], axis=1)
        x_BD = jnp.take_along_axis(x_BLD, last_B[:, None, None], axis=1)[:, 0]
        logits_BC = _matmul("BD,CD->BC", x_BD, self.w_score_CD, jnp.dtype(self.cfg.dtype),
                            preferred_element_type=jnp.float32)
        return (logits_BC, entropy) if attention_entropy else logits_BC

    def attention_maps(self, tokens_BL, segment_ids_BL=None, positions_BL=None):
        """float32 attention probabilities [N, B, H, L, S] of every layer, computed by the
        reference path beside the configured kernel's forward (which keeps none), layer by
        layer. For looking at the attention (LM.attention_maps); [L, S] per head and layer."""
        x_BLD = self.embed(tokens_BL)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
        graphdef, stacked = nnx.split(self.blocks)
        maps = []
        for i in range(self.cfg.num_layers):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
            maps.append(block.attention_probabilities(x_BLD, positions_BL, segment_ids_BL))
            x_BLD = block(x_BLD, positions_BL, segment_ids_BL)[0]
        return jnp.stack(maps)

    def embed(self, tokens_BL):
        table = self.embed_VD.get_value()
        if isinstance(table, quantize.QArray):  # a tied table quantized as the output layer
            x_BLD = quantize.take_rows(table, tokens_BL, jnp.dtype(self.cfg.dtype))
        else:
            x_BLD = jnp.take(table, tokens_BL, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x_BLD, ACTIVATION)

    def from_embeddings(self, x_BLD, segment_ids_BL=None, positions_BL=None):
        """Everything after the embedding lookup: blocks, final norm, output projection."""
        return self.project(self._hidden(x_BLD, segment_ids_BL, positions_BL, None)[0])

    def _hidden(self, x_BLD, segment_ids_BL, positions_BL, cache, layers=None, entropy=False):
        """(final-normed hidden states, cache): the blocks and the final norm. With `entropy`,
        (hidden states, (attention entropy sum, count)) instead."""
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
        if entropy:
            x_BLD, entropy_sum = self._run_blocks(x_BLD, positions_BL, segment_ids_BL, None,
                                                  entropy=True)
            count = (self.cfg.num_layers * self.cfg.num_heads
                     * attention_lib.real_queries(segment_ids_BL, x_BLD.shape[:2]).sum())
            return self.final_norm(x_BLD), (entropy_sum, count)
        x_BLD, cache = self._run_blocks(x_BLD, positions_BL, segment_ids_BL, cache, layers)
        return self.final_norm(x_BLD), cache

    def project(self, x_BLD):
        """The output projection. Logits come out of the matmul in float32 (accumulated there),
        whatever the compute dtype."""
        if self.cfg.num_labels and not self.cfg.tie_embeddings:
            raise ValueError(f"this is a classifier (model.num_labels={self.cfg.num_labels}): it "
                             "has a score head instead of an output layer; use classify")
        w_out_VD = self.embed_VD if self.cfg.tie_embeddings else self.w_out_VD
        logits_BLV = _matmul("BLD,VD->BLV", x_BLD, w_out_VD, jnp.dtype(self.cfg.dtype),
                             preferred_element_type=jnp.float32)
        return constrain(logits_BLV, ("batch", None, "vocab"))

    def _run_blocks(self, x_BLD, positions_BL, segment_ids_BL, cache, layers=None,
                    entropy=False):
        """(x, cache) after every block; with `entropy` (no cache), (x, the layers' summed
        attention entropy)."""
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)

        def body(x_BLD, layer, i, positions_BL, segment_ids_BL, kv=None):
            """Block i, with the whole cache's (k, v) when decoding. Returns (x, (k, v) or None,
            the block's attention entropy sum or None)."""
            block = nnx.merge(graphdef, layer)
            layer_cache = None
            if kv is not None:  # the stacked (k, v), or lists of per-layer buffers (kv_cache.py)
                k, v = (kv[0][i], kv[1][i]) if isinstance(kv[0], list) else kv
                layer_cache = dataclasses.replace(cache, k_NBGTK=k, v_NBGKT=v)
            x_BLD, layer_cache, entropy_sum = block(x_BLD, positions_BL, segment_ids_BL,
                                                    layer_cache, i, entropy)
            if kv is not None and isinstance(kv[0], list):
                kv = tuple([*buffers[:i], new, *buffers[i + 1:]] for buffers, new in
                           zip(kv, (layer_cache.k_NBGTK, layer_cache.v_NBGKT), strict=True))
            elif kv is not None:
                kv = (layer_cache.k_NBGTK, layer_cache.v_NBGKT)
            return x_BLD, kv, entropy_sum

        if cfg.remat != "none" and cache is None:
            # prevent_cse only matters outside scan; inside it would block useful optimizations.
            body = jax.checkpoint(
                body, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers
            )

        def run_layers(x_BLD, layers, positions_BL, segment_ids_BL, kv=None):
            """Every layer of `layers` (stacked on axis 0, or a list) in order, scanned or
            unrolled, carrying the cache's (k, v) when given. Returns (x, (k, v) or None,
            summed attention entropy or None)."""
            if cfg.scan_layers and not isinstance(layers, list):
                def step(carry, xs):
                    x_BLD, kv, entropy_sum = body(carry[0], *xs, positions_BL, segment_ids_BL,
                                                  carry[1])
                    return (x_BLD, kv), entropy_sum

                n = jax.tree.leaves(layers)[0].shape[0]
                (x_BLD, kv), entropy_N = jax.lax.scan(step, (x_BLD, kv), (layers, jnp.arange(n)))
                return x_BLD, kv, None if entropy_N is None else entropy_N.sum()
            n = len(layers) if isinstance(layers, list) else jax.tree.leaves(layers)[0].shape[0]
            total = None
            for i in range(n):
                layer = layers[i] if isinstance(layers, list) else jax.tree.map(
                    lambda a, i=i: a[i], layers)
                x_BLD, kv, entropy_sum = body(x_BLD, layer, i, positions_BL, segment_ids_BL, kv)
                if entropy_sum is not None:
                    total = entropy_sum if total is None else total + entropy_sum
            return x_BLD, kv, total

        if pipeline.num_stages() > 1:
            if cache is not None:
                raise ValueError("decoding with a KV cache runs without pipeline stages")
            if entropy:
                raise ValueError("loss.attention_entropy runs without pipeline stages")
            return pipeline.run(lambda *a: run_layers(*a)[0], x_BLD, stacked, positions_BL,
                                segment_ids_BL), None
        layers = stacked if layers is None else layers
        if cache is None:
            x_BLD, _, total = run_layers(x_BLD, layers, positions_BL, segment_ids_BL)
            return x_BLD, total
        if isinstance(cache.k_NBGTK, list) and not isinstance(layers, list):
            raise ValueError("a per-layer KV cache (KVCache.empty(per_layer=True)) needs "
                             "per-layer weights (layers=unstack_layers(params))")
        x_BLD, (k, v), _ = run_layers(x_BLD, layers, positions_BL, segment_ids_BL,
                                      (cache.k_NBGTK, cache.v_NBGKT))
        return x_BLD, KVCache(k, v, cache.index + x_BLD.shape[1], cache.start_B).constrained()


def unstack_layers(params):
    """The blocks' parameters as one State per layer (copies), for `Decoder(..., layers=...)`.

    Only decoding on CPU uses this. There a decode step is bound by reading the weights once,
    and XLA:CPU copies every slice of a stacked weight (scanned or unrolled) before a matmul
    reads it, which tripled the bytes moved per token (docs/performance.md). Separate buffers
    per layer are read in place; the price is a second copy of the block weights in host memory.
    Accelerators keep the stacked layout (their compilers read the slice in place)."""
    blocks = params["blocks"]
    n = jax.tree.leaves(blocks)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(n)]


def init(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStructs for values: shapes and metadata, nothing allocated."""
    return nnx.eval_shape(lambda: init(cfg))


def num_params(cfg: ModelConfig) -> int:
    """Parameter count read off the abstract model (no memory allocated)."""
    state = nnx.state(abstract(cfg), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def num_params_formula(cfg: ModelConfig) -> int:
    """Closed form of `num_params`:

        V*D (embedding) + N * (D*H*K + 2*D*G*K + H*K*D  (attention)
                               + 3*D*F                   (SwiGLU)
                               + 2*D)                    (two RMSNorm scales)
        + D (final norm) + [C*D, the score head of a classifier,
                             else D*V if the output projection is untied]
    """
    V, D, N, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.mlp_dim
    H, G, K = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    per_layer = D * H * K + 2 * D * G * K + H * K * D + 3 * D * F + 2 * D
    head = cfg.num_labels * D if cfg.num_labels else (0 if cfg.tie_embeddings else D * V)
    return V * D + N * per_layer + D + head
