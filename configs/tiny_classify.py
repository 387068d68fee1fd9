"""Classification with the `make train` model: which standard-library package a 12-line code
snippet comes from (8 labels).

    make train   # runs/tiny, once
    jaxlm train --config=configs/tiny_classify.py --workdir=runs/tiny_classify

The rows come from the embedded corpus (`data.dataset=stdlib_classify`,
jaxlm/finetune_data.py): snippets of asyncio, email, idlelib, importlib, multiprocessing,
tkinter, unittest and xml files, a quarter of each package's files held out for validation.
The decoder and tokenizer come from runs/tiny (`train.init_from`); a score head [8, d_model]
replaces its output layer and reads the final hidden state of each snippet's EOS. Everything is
trained. The best evaluation (by accuracy) is kept in runs/tiny_classify/best. Results, against
the majority class and the same run from a random init: docs/finetuning.md.
"""

from jaxlm.configs import base


def get_config():
    c = base.get_config()
    c.train.init_from = "runs/tiny"
    c.data.dataset = "stdlib_classify"
    c.data.seq_len = 256
    c.optim.lr = 1e-3
    c.optim.schedule = "linear"
    c.optim.min_lr_ratio = 0.0
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.0
    c.train.steps = 300
    c.train.global_batch_size = 8
    c.train.log_every = 50
    c.train.eval_every = 100
    c.checkpoint.every = 100
    c.checkpoint.best_metric = "eval_accuracy"
    c.checkpoint.best_mode = "max"
    return c
