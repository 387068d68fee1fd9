"""Supervised fine-tuning of the `make train` model: write a function's body from its signature
and docstring.

    make train   # runs/tiny, once
    jaxlm train --config=configs/tiny_sft.py --workdir=runs/tiny_sft

The rows come from the embedded corpus (`data.dataset=stdlib_sft`, jaxlm/finetune_data.py):
prompt = a function's def line(s) and docstring, completion = the rest of its body; training
rows from the corpus's train split, validation rows from its validation split. The loss covers
completion tokens only; examples are packed whole, several to a row. The model keys and the
tokenizer come from runs/tiny (`train.init_from`). Results: docs/finetuning.md.
"""

from jaxlm.configs import base


def get_config():
    c = base.get_config()
    c.train.init_from = "runs/tiny"
    c.data.dataset = "stdlib_sft"
    c.data.seq_len = 256
    c.optim.lr = 1e-3
    c.optim.schedule = "linear"
    c.optim.min_lr_ratio = 0.0
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.train.steps = 300
    c.train.global_batch_size = 4
    c.train.log_every = 50
    c.train.eval_every = 150
    c.checkpoint.every = 150
    return c
