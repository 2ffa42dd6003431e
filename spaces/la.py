"""`la`: logit adjustment (Menon et al., ICLR 2021; docs/methods.md, "Logit adjustment"). One
stage trained with the logit-adjusted cross-entropy; the search acts on its temperature tau
(0 is plain cross-entropy, the paper's default is 1) and the stage-1 learning rate and weight
decay."""

from spaces.core import Dimension, Space, register_space
from spaces.dimensions import LR, WEIGHT_DECAY

LA_TAU = Dimension("la_tau", "stage1", "logit adjustment temperature tau", 0.0, 2.5)

SPACE = register_space(Space(
    name="la",
    method="la",
    summary="logit-adjusted cross-entropy (one stage)",
    dimensions=(LA_TAU, LR, WEIGHT_DECAY),
    plans={
        "tiny": {"epochs": 30, "schedule": "warmup_multistep", "la_form": "loss"},
        "cifar": {"epochs": 200, "schedule": "warmup_multistep", "la_form": "loss"},
        "large": {"epochs": 90, "schedule": "cosine", "la_form": "loss"},
    },
    notes=("post-hoc form: python -m trainables.pipeline --method la --la-form posthoc",),
))
