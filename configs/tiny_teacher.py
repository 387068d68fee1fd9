"""A larger model of the `make train` kind, to distil into the tiny shape (configs/tiny_distill.py):
3.2M parameters (d_model 192, 6 layers), the same tokenizer, data and batch as configs/tiny.py,
trained for 3x the tiny model's steps and tokens (4800 steps, 2.5M tokens): at tiny's 1600 steps
it is under-trained (2.258 bits per byte, worse than tiny's 2.225), so no better a teacher.

    make train    # runs/tiny: its tokenizer is shared
    jaxlm train --config=configs/tiny_teacher.py --workdir=runs/tiny_teacher

Results beside the tiny model: docs/inside.md.
"""

from jaxlm.configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.tokenizer = "runs/tiny/tokenizer.model"
    c.model.d_model = 192
    c.model.num_layers = 6
    c.model.num_heads = 6
    c.model.num_kv_heads = 3
    c.model.mlp_dim = 512
    c.train.steps = 4800
    c.train.eval_every = 4800
    c.checkpoint.every = 1600
    return c
