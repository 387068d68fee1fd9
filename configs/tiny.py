"""The default: a small Llama that trains on two CPU cores in minutes, on the embedded corpus.

    jaxlm train --config=configs/tiny.py --workdir=runs/tiny
"""

from jaxlm.configs import base


def get_config():
    c = base.get_config()
    c.model.vocab_size = 4096
    c.model.d_model = 256
    c.model.num_layers = 4
    c.model.num_heads = 8
    c.model.num_kv_heads = 4
    c.model.mlp_dim = 768
    c.model.max_seq_len = 256
    c.model.tie_embeddings = True
    c.data.seq_len = 256
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.global_batch_size = 16
    c.train.log_every = 20
    c.train.eval_every = 200
    c.checkpoint.every = 200
    c.mesh.data = -1
    return c
