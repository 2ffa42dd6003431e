"""The four methods built from the shared phases: cross-entropy, DRO-LT, Weight Balancing and
their combination (docs/methods.md 3 to 5). Stage 1 is plain cross-entropy for all of them; they
differ in which later phases run and with what settings.

Their report key names what a trial actually ran, from its config, so a `ce` trial with a
retrained classifier is reported as cRT and one with a tau-normalised classifier as tau-norm
(the keys published numbers are matched on, results/published.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainables.losses import RADII
from trainables.methods import Method, register_method


def phase_key(params: Mapping[str, Any]) -> str:
    """DRO trials: "<method>/<radius>" (dro_lt/learned, dro_wb/count, ...). Otherwise by the
    classifier phase: none -> "ce", tau-norm -> "ce+tau_norm", retrained with a class-balanced
    loss -> "wb/cb" or "wb/cb+maxnorm", retrained with plain CE -> "ce+crt"."""
    if int(params.get("dro_epochs") or 0) > 0:
        return f"{params['method']}/{params.get('radius', '?')}"
    classifier = params.get("classifier", "none")
    if classifier == "tau_norm":
        return "ce+tau_norm"
    if classifier == "retrain" and int(params.get("cls_epochs") or 0) > 0:
        norm = "+l2norm" if params.get("cls_norm", "off") == "l2" else ""
        if params.get("cls_loss") in ("cb", "cb_bce"):
            maxnorm = "+maxnorm" if params.get("maxnorm", "off") != "off" else ""
            return f"wb/cb{maxnorm}{norm}"
        return f"ce+crt{norm}"
    return "ce"


NAMES = {
    "ce": "CE, stage 1 only",
    "ce+tau_norm": "CE features + tau-norm classifier",
    "ce+crt": "CE features + retrained classifier (cRT)",
    "wb/cb": "WD features, then classifier with WD + CB loss",
    "wb/cb+maxnorm": "WD features, then classifier with WD + CB loss + MaxNorm",
    "ce+crt+l2norm": "CE features + retrained L2-normalised classifier",
    "wb/cb+l2norm": "WD features, then L2-normalised classifier with WD + CB loss",
    "wb/cb+maxnorm+l2norm": "WD features, then L2-normalised classifier with WD + CB loss "
                            "(+ MaxNorm on its raw rows)",
    **{f"dro_lt/{radius}": f"DRO-LT ({radius} radius) + cRT" for radius in RADII},
    **{f"dro_wb/{radius}": f"DRO-LT ({radius} radius) + WB classifier" for radius in RADII},
}

register_method(Method(
    name="ce", order=0, summary="cross-entropy baseline (stage 1 only)",
    phases=("stage1",), report_key=phase_key, report_names=NAMES,
))
register_method(Method(
    name="dro_lt", order=1,
    summary="DRO-LT features (CE + robust loss), then class-balanced classifier retraining",
    phases=("stage1", "dro", "classifier"), report_key=phase_key, report_names=NAMES,
    defaults={"dro_epochs": 10, "classifier": "retrain", "cls_loss": "ce",
              "cls_sampler": "class_balanced"},
))
register_method(Method(
    name="wb", order=2,
    summary="weight-decayed CE features, then class-balanced classifier, weight decay, MaxNorm",
    phases=("stage1", "classifier"), report_key=phase_key, report_names=NAMES,
    defaults={"schedule": "cosine", "weight_decay": 5e-3, "classifier": "retrain",
              "cls_loss": "cb", "cls_weight_decay": 0.1, "maxnorm": "step"},
))
register_method(Method(
    name="dro_wb", order=3,
    summary="weight-decayed CE features, DRO-LT, then the Weight Balancing classifier",
    phases=("stage1", "dro", "classifier"), report_key=phase_key, report_names=NAMES,
    defaults={"dro_epochs": 10, "classifier": "retrain", "cls_loss": "cb",
              "cls_weight_decay": 0.1, "maxnorm": "step"},
))
