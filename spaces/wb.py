"""`wb`: Weight Balancing (docs/methods.md 5). Stage 1 with a searched weight decay (the paper's
main lever), then the classifier retrained with a class-balanced loss, weight decay and MaxNorm."""

from spaces.core import Space, register_space
from spaces.dimensions import CLS_NORM, LR, WB_STAGE2, WEIGHT_DECAY, derive_fields

SPACE = register_space(Space(
    name="wb",
    method="wb",
    summary="weight-decayed CE features, then class-balanced classifier, weight decay, MaxNorm",
    dimensions=(LR, WEIGHT_DECAY, *WB_STAGE2, CLS_NORM),
    plans={
        "tiny": {"epochs": 20, "cls_epochs": 10, "schedule": "cosine"},
        "cifar": {"epochs": 200, "cls_epochs": 10, "schedule": "cosine"},
        "large": {"epochs": 90, "cls_epochs": 10, "schedule": "cosine"},
    },
    derive=derive_fields,
    order=2,
))
