"""`dro_wb`: Weight Balancing's stage 1, DRO-LT on its features, then Weight Balancing's
classifier; every dimension of `dro_lt` and `wb`."""

from spaces.core import Space, register_space
from spaces.dimensions import DRO_LT, LR, WB_STAGE2, WEIGHT_DECAY, derive_fields

SPACE = register_space(Space(
    name="dro_wb",
    method="dro_wb",
    summary="weight-decayed CE features, DRO-LT, then the Weight Balancing classifier",
    dimensions=(LR, WEIGHT_DECAY, *DRO_LT, *WB_STAGE2),
    plans={
        "tiny": {"epochs": 20, "dro_epochs": 10, "cls_epochs": 10, "schedule": "cosine"},
        "cifar": {"epochs": 200, "dro_epochs": 80, "cls_epochs": 10, "schedule": "cosine"},
        "large": {"epochs": 90, "dro_epochs": 30, "cls_epochs": 10, "schedule": "cosine"},
    },
    derive=derive_fields,
    notes=("count radius: eps_c = eps * sqrt(n_max / n_c)",),
    order=3,
))
