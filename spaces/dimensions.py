"""The search dimensions of docs/methods.md section 6, defined once and shared by the spaces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spaces.core import Dimension
from spaces.recipes import count_reference

RADII_WITH_EPS = ("shared", "count", "learned")

# Stage 1: cross-entropy feature learning.
LR = Dimension("lr", "stage1", "stage-1 learning rate (SGD)", 0.003, 0.3, log=True)
WEIGHT_DECAY = Dimension("weight_decay", "stage1", "stage-1 weight decay", 1e-5, 1e-1, log=True)

# DRO-LT phase: L = (1 - lambda) CE + lambda DRO on the features.
LAM = Dimension("lam", "dro", "lambda, the DRO-LT share of the loss", 0.05, 0.95)
RADIUS = Dimension(
    "radius", "dro", "radius variant eps_c", choices=("erm", "shared", "count", "learned")
)
EPS = Dimension(
    "eps", "dro", "radius (count: of the largest class; learned: initial)", 0.01, 5.0, log=True,
    when=("radius", RADII_WITH_EPS),
)
TEMPERATURE = Dimension("temperature", "dro", "temperature T of the DRO-LT softmax", 0.05, 5.0,
                        log=True)
DRO_LR = Dimension("dro_lr", "dro", "DRO-phase learning rate", 1e-3, 1e-1, log=True)
DRO_WEIGHT_DECAY = Dimension("dro_weight_decay", "dro", "DRO-phase weight decay", 1e-5, 1e-1,
                             log=True)

# Classifier phase on frozen features (Weight Balancing's stage 2).
CLS_LR = Dimension("cls_lr", "classifier", "stage-2 learning rate", 1e-3, 1e-1, log=True)
CLS_WEIGHT_DECAY = Dimension("cls_weight_decay", "classifier", "stage-2 weight decay", 1e-4, 1.0,
                             log=True)
MAXNORM = Dimension("maxnorm", "classifier", "MaxNorm projection after every step, or none",
                    choices=("step", "off"))
MAXNORM_T = Dimension(
    "maxnorm_t", "classifier",
    "MaxNorm radius t: delta = min + t (max - min) of stage-1 row norms", 0.0, 1.0,
    when=("maxnorm", ("step",)),
)
CB_ONE_MINUS_BETA = Dimension("cb_one_minus_beta", "classifier",
                              "1 - beta of the class-balanced loss", 1e-4, 1e-1, log=True,
                              derived=True)

CLS_NORM = Dimension("cls_norm", "classifier",
                     "L2-normalised classifier rows times a learned scale, or plain rows",
                     choices=("off", "l2"))

DRO_LT = (LAM, RADIUS, EPS, TEMPERATURE, DRO_LR, DRO_WEIGHT_DECAY)
WB_STAGE2 = (CLS_LR, CLS_WEIGHT_DECAY, MAXNORM, MAXNORM_T, CB_ONE_MINUS_BETA)


def derive_fields(params: Mapping[str, Any], config: dict[str, Any]) -> None:
    """Sampled values that are not TrialConfig fields as they stand."""
    if "cb_one_minus_beta" in params:
        config["cb_beta"] = 1.0 - params["cb_one_minus_beta"]
    if params.get("radius") == "count":
        # eps_c = eps / sqrt(n_c): scale so the sampled eps is the largest class's radius.
        n_max = config.get("n_max") or count_reference(config.get("dataset", ""))
        config["eps"] = params["eps"] * n_max ** 0.5
    if params.get("radius") == "erm":
        config["eps"] = 0.0
