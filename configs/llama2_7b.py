"""Llama-2-7B shapes (6,738,415,616 parameters), FSDP over all devices, full remat, bf16 compute.

    jaxlm train --config=configs/llama2_7b.py --workdir=runs/llama2_7b

vocab 32000, d_model 4096, 32 layers, 32 heads (no GQA), SwiGLU 11008, untied embeddings,
4096-token context, RMSNorm eps 1e-5, RoPE theta 10000: the published Llama-2-7B architecture,
so `jaxlm.load` of its HF directory fits this config exactly.
"""

from jaxlm.configs import base


def get_config():
    c = base.get_config()
    c.model.vocab_size = 32000
    c.model.d_model = 4096
    c.model.num_layers = 32
    c.model.num_heads = 32
    c.model.num_kv_heads = 32
    c.model.mlp_dim = 11008
    c.model.max_seq_len = 4096
    c.model.rope_theta = 10000.0
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.attention = "auto"  # cudnn on NVIDIA GPUs, splash on TPUs, xla elsewhere
    c.data.seq_len = 4096
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.train.steps = 250000
    c.train.global_batch_size = 1024  # 4M tokens per step, as Llama 2
    c.optim.grad_accum_steps = 64  # 16 rows per microbatch: 2 per device on 8 devices
    c.checkpoint.every = 500
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
