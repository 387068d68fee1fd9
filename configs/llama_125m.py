"""A 134M-parameter Llama (GPT-2-small widths) for quick real-data experiments on one accelerator.

    jaxlm train --config=configs/llama_125m.py --workdir=runs/llama_125m

d_model 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32000, untied output, 1024-token rows.
"""

from jaxlm.configs import base


def get_config():
    c = base.get_config()
    c.model.vocab_size = 32000
    c.model.d_model = 768
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.num_kv_heads = 12
    c.model.mlp_dim = 2048
    c.model.max_seq_len = 1024
    c.model.dtype = "bfloat16"
    c.data.seq_len = 1024
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 1000
    c.train.steps = 20000
    c.train.global_batch_size = 256
    c.checkpoint.every = 1000
    return c
