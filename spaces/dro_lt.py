"""`dro_lt`: DRO-LT (docs/methods.md 4). Stage 1 is the fixed LDAM recipe, shared by every trial
of a sweep through the stage-1 cache; the search acts on the DRO phase; then cRT retrains the
classifier with class-balanced sampling."""

from spaces.core import Space, register_space
from spaces.dimensions import DRO_LT, derive_fields

SPACE = register_space(Space(
    name="dro_lt",
    method="dro_lt",
    summary="DRO-LT features (CE + robust loss), then class-balanced classifier retraining",
    dimensions=DRO_LT,
    plans={
        "tiny": {"epochs": 20, "dro_epochs": 10, "cls_epochs": 5},
        "cifar": {"epochs": 200, "dro_epochs": 80, "cls_epochs": 20},
        "large": {"epochs": 90, "dro_epochs": 30, "cls_epochs": 10, "schedule": "cosine"},
    },
    derive=derive_fields,
    notes=("stage 1 (lr 0.1, weight decay 2e-4) is not searched: all trials share one stage-1 "
           "model", "count radius: eps_c = eps * sqrt(n_max / n_c)"),
    order=1,
))
