"""`ce`: the cross-entropy baseline; stage 1 only, searching its learning rate and weight decay."""

from spaces.core import Space, register_space
from spaces.dimensions import LR, WEIGHT_DECAY

SPACE = register_space(Space(
    name="ce",
    method="ce",
    summary="cross-entropy baseline (one stage)",
    dimensions=(LR, WEIGHT_DECAY),
    plans={
        "tiny": {"epochs": 30, "schedule": "warmup_multistep"},
        "cifar": {"epochs": 200, "schedule": "warmup_multistep"},
        "large": {"epochs": 90, "schedule": "cosine"},
    },
    order=0,
))
