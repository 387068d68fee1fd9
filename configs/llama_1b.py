"""A 1.1B-parameter Llama (TinyLlama shapes: grouped-query attention with 4 kv heads).

    jaxlm train --config=configs/llama_1b.py --workdir=runs/llama_1b

d_model 2048, 22 layers, 32 heads / 4 kv heads, SwiGLU 5632, vocab 32000, 2048-token rows,
bf16 compute with the projections' outputs kept for the backward pass (save_dots).
"""

from jaxlm.configs import base


def get_config():
    c = base.get_config()
    c.model.vocab_size = 32000
    c.model.d_model = 2048
    c.model.num_layers = 22
    c.model.num_heads = 32
    c.model.num_kv_heads = 4
    c.model.mlp_dim = 5632
    c.model.max_seq_len = 2048
    c.model.dtype = "bfloat16"
    c.model.remat = "save_dots"
    c.model.attention = "auto"  # cudnn on NVIDIA GPUs, splash on TPUs, xla elsewhere
    c.data.seq_len = 2048
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 2000
    c.train.steps = 100000
    c.train.global_batch_size = 512  # 1M tokens per step
    c.optim.grad_accum_steps = 64  # 8 rows per microbatch: fits one 80 GB H100 (docs/performance.md)
    c.checkpoint.every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
