"""The default: a 1M-parameter Llama that trains on two CPU cores in minutes, on the embedded corpus.

    jaxlm train --config=configs/tiny.py --workdir=runs/tiny

What `make train` runs: the Python standard library as text, a 2048-piece BPE tokenizer trained on
it, 500 steps of 16 x 256 tokens (2M tokens), validation on all the held-out files.
"""

from jaxlm.configs import base


def get_config():
    c = base.get_config()
    c.model.vocab_size = 2048
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.mlp_dim = 384
    c.model.max_seq_len = 256
    c.model.tie_embeddings = True
    c.data.seq_len = 256
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.train.steps = 500
    c.train.global_batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.eval_batches = 0
    c.checkpoint.every = 250
    return c
