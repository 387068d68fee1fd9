"""LoRA fine-tuning of the `make train` model on the same SFT task as configs/tiny_sft.py:
rank-8 factors on every block matmul, the base frozen.

    make train   # runs/tiny, once
    jaxlm train --config=configs/tiny_lora.py --workdir=runs/tiny_lora
    jaxlm export --workdir=runs/tiny_lora --format=peft --out=runs/tiny_lora/adapter

Only the factors (~78k parameters, 6% of the model) are trained and have optimizer state;
checkpoints hold them and name their base (train.init_from, pinned to its step). `jaxlm.load`
of this workdir gives the base with the factors merged. LoRA takes a larger learning rate than
full fine-tuning (B starts at zero). Results beside full fine-tuning: docs/finetuning.md.
"""

from jaxlm.configs import tiny_sft


def get_config():
    c = tiny_sft.get_config()
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = "q,k,v,o,gate,up,down"
    c.optim.lr = 1e-2
    return c
