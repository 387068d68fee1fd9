"""The Llama-style decoder: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU, in Flax NNX.

Dimension key (suffixes on tensor and weight names; the name is the shape comment):
  B batch   L length (queries)   S length (keys)   D d_model   F mlp hidden   V vocab
  H query heads   G kv heads   K head dim   N layers

Every parameter carries logical axis names (batch, length, embed, heads, kv_heads, head_dim, mlp,
vocab, layers) in its `out_sharding` metadata, and activations at block boundaries go through
`sharding.constrain`. This file never names a device axis: `sharding.py` maps the names to devices.

Numerics: parameters are stored in `param_dtype` and cast to `dtype` where used; RMSNorm
statistics, RoPE angles, attention scores and softmax, and the logits are float32.

The blocks are always stored stacked, with a leading `layers` axis, whether they run under
`lax.scan` (`scan_layers=True`: one compiled body, fast compile) or an unrolled Python loop.
One parameter layout for both keeps checkpoints and HF conversion independent of that choice.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlm import attention as attention_lib
from jaxlm import pipeline
from jaxlm.config import ModelConfig
from jaxlm.sharding import constrain

ACTIVATION = ("batch", "length", "embed")


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.num_heads


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

    def __call__(self, x_BLD, positions_BL, segment_ids_BL):
        dt = self.dtype
        q_BLHK = jnp.einsum("BLD,HKD->BLHK", x_BLD, self.w_q_HKD[...].astype(dt))
        k_BLGK = jnp.einsum("BLD,GKD->BLGK", x_BLD, self.w_k_GKD[...].astype(dt))
        v_BLGK = jnp.einsum("BLD,GKD->BLGK", x_BLD, self.w_v_GKD[...].astype(dt))
        # Names let the save_attn remat policy keep exactly these tensors.
        q_BLHK = checkpoint_name(rope(q_BLHK, positions_BL, self.rope_theta), "query")
        k_BLGK = checkpoint_name(rope(k_BLGK, positions_BL, self.rope_theta), "key")
        v_BLGK = checkpoint_name(v_BLGK, "value")
        out_BLHK = attention_lib.attention(
            q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, implementation=self.implementation
        )
        out_BLHK = checkpoint_name(out_BLHK, "attn_out")
        return jnp.einsum("BLHK,DHK->BLD", out_BLHK, self.w_o_DHK[...].astype(dt))


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
        gate_BLF = jnp.einsum("BLD,FD->BLF", x_BLD, self.w_gate_FD[...].astype(dt))
        up_BLF = jnp.einsum("BLD,FD->BLF", x_BLD, self.w_up_FD[...].astype(dt))
        # Not "length": under sequence parallelism the MLP sees whole sequences, split on mlp.
        hidden_BLF = constrain(jax.nn.silu(gate_BLF) * up_BLF, ("batch", None, "mlp"))
        return jnp.einsum("BLF,DF->BLD", hidden_BLF, self.w_down_DF[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BLD, positions_BL, segment_ids_BL):
        h_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL)
        h_BLD = constrain(h_BLD, ACTIVATION)
        out_BLD = h_BLD + self.mlp(self.mlp_norm(h_BLD))
        return constrain(out_BLD, ACTIVATION)


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
        if not cfg.tie_embeddings:
            # [vocab, d_model] like the embedding (and HF's lm_head): the backward pass then needs
            # no transposed copy of the [tokens, vocab] logit gradient (measured ~30% faster on
            # CPU for the output layer; docs/performance.md).
            self.w_out_VD = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, cfg)

    def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None):
        """Logits for `tokens_BL`. Packed rows pass `segment_ids_BL` (attention stays within a
        segment) and `positions_BL` (RoPE positions restarting at 0 in each segment)."""
        return self.from_embeddings(self.embed(tokens_BL), segment_ids_BL, positions_BL)

    def embed(self, tokens_BL):
        x_BLD = jnp.take(self.embed_VD[...], tokens_BL, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x_BLD, ACTIVATION)

    def from_embeddings(self, x_BLD, segment_ids_BL=None, positions_BL=None):
        """Everything after the embedding lookup: blocks, final norm, output projection."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
        x_BLD = self._run_blocks(x_BLD, positions_BL, segment_ids_BL)
        x_BLD = self.final_norm(x_BLD)
        # Logits come out of the matmul in float32 (accumulated there), whatever the compute dtype.
        w_out_VD = self.embed_VD if cfg.tie_embeddings else self.w_out_VD
        logits_BLV = jnp.einsum(
            "BLD,VD->BLV", x_BLD, w_out_VD[...].astype(dt), preferred_element_type=jnp.float32
        )
        return constrain(logits_BLV, ("batch", None, "vocab"))

    def _run_blocks(self, x_BLD, positions_BL, segment_ids_BL):
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)

        def body(x_BLD, layer, positions_BL, segment_ids_BL):
            block = nnx.merge(graphdef, layer)
            return block(x_BLD, positions_BL, segment_ids_BL), None

        if cfg.remat != "none":
            # prevent_cse only matters outside scan; inside it would block useful optimizations.
            body = jax.checkpoint(
                body, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers
            )

        def run_layers(x_BLD, layers, positions_BL, segment_ids_BL):
            """Every layer of `layers` (stacked on axis 0) in order: scanned or unrolled."""
            if cfg.scan_layers:
                step = lambda x, layer: body(x, layer, positions_BL, segment_ids_BL)  # noqa: E731
                return jax.lax.scan(step, x_BLD, layers)[0]
            for i in range(jax.tree.leaves(layers)[0].shape[0]):
                layer = jax.tree.map(lambda a, i=i: a[i], layers)
                x_BLD, _ = body(x_BLD, layer, positions_BL, segment_ids_BL)
            return x_BLD

        if pipeline.num_stages() > 1:
            return pipeline.run(run_layers, x_BLD, stacked, positions_BL, segment_ids_BL)
        return run_layers(x_BLD, stacked, positions_BL, segment_ids_BL)


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
        + D (final norm) + [D*V if the output projection is untied]
    """
    V, D, N, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.mlp_dim
    H, G, K = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    per_layer = D * H * K + 2 * D * G * K + H * K * D + 3 * D * F + 2 * D
    return V * D + N * per_layer + D + (0 if cfg.tie_embeddings else D * V)
