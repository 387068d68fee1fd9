"""The `make train` model distilled from configs/tiny_teacher.py: the tiny shape, data, steps and
schedule, with loss = 0.5 * T^2 * KL(teacher_T || student_T) + 0.5 * cross-entropy at T = 2.

    make train                                                               # runs/tiny
    jaxlm train --config=configs/tiny_teacher.py --workdir=runs/tiny_teacher
    jaxlm train --config=configs/tiny_distill.py --workdir=runs/tiny_distill

Measured (docs/ablations.md): 2.153 / 2.220 validation bits per byte on seeds 0 / 1, against
2.223 / 2.262 for the same student trained alone (runs/tiny), the teacher at 1.957.
"""

from jaxlm.configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.tokenizer = "runs/tiny/tokenizer.model"
    c.distill.teacher = "runs/tiny_teacher"
    c.distill.temperature = 2.0
    c.distill.alpha = 0.5
    return c
