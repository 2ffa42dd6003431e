"""The published numbers of docs/methods.md sections 4 and 5, as data (accuracy in %).

Each `Published` row is one table line of one paper: overall accuracy per imbalance factor and,
where the paper gives them, Many / Medium / Few at one imbalance factor. `method` is the key this
project's trials are matched on (see `results.report.method_key`): several published lines can
share a key (the DRO-LT paper's "CE" and Weight Balancing's "naive CE" are both a stage-1-only
cross-entropy model). Nothing here is computed; a value a paper does not give is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DRO_LT_PAPER = "DRO-LT (Samuel & Chechik, ICCV 2021)"
WB_PAPER = "Weight Balancing (Alshammari et al., CVPR 2022)"
# docs/methods.md 2: the WB authors' CIFAR code used a CIFAR-stem ResNet-34, the paper says
# ResNet-32.
WB_BACKBONE = "ResNet-32 (paper; the authors' code used ResNet-34)"


@dataclass(frozen=True)
class Published:
    method: str  # the measured method key it compares with
    label: str  # the paper's own name for the line
    source: str
    dataset: str  # a tailtune dataset name
    backbone: str
    # imbalance factor (None: the dataset's natural imbalance) -> overall accuracy
    overall: dict[float | None, float]
    # imbalance factor -> (many, medium, few)
    groups: dict[float | None, tuple[float, float, float]] = field(default_factory=dict)


PUBLISHED: tuple[Published, ...] = (
    # docs/methods.md 4, "Reported results (ResNet-32, CIFAR-100-LT)"
    Published("ce", "CE", DRO_LT_PAPER, "cifar100_lt", "ResNet-32",
              {100: 38.32, 50: 43.85, 10: 55.71}, {100: (65.5, 37.9, 7.4)}),
    Published("dro_lt/erm", "DRO-LT, eps = 0", DRO_LT_PAPER, "cifar100_lt", "ResNet-32",
              {100: 43.92, 50: 52.31, 10: 59.54}, {100: (61.9, 43.7, 22.2)}),
    Published("dro_lt/shared", "DRO-LT, shared eps", DRO_LT_PAPER, "cifar100_lt", "ResNet-32",
              {100: 45.66, 50: 55.32, 10: 61.22}, {100: (64.1, 47.9, 21.5)}),
    Published("dro_lt/count", "DRO-LT, count eps", DRO_LT_PAPER, "cifar100_lt", "ResNet-32",
              {100: 46.92, 50: 57.20, 10: 63.10}, {100: (65.0, 49.8, 22.3)}),
    Published("dro_lt/learned", "DRO-LT, learned eps", DRO_LT_PAPER, "cifar100_lt",
              "ResNet-32", {100: 47.31, 50: 57.57, 10: 63.41}, {100: (64.7, 50.0, 23.8)}),
    Published("dro_lt/learned", "DRO-LT, learned eps", DRO_LT_PAPER, "imagenet_lt",
              "ResNet-50", {None: 53.5}, {None: (64.0, 49.8, 33.1)}),
    Published("dro_lt/learned", "DRO-LT, learned eps", DRO_LT_PAPER, "inat2018", "ResNet-50",
              {None: 69.7}),
    # docs/methods.md 5, "Reported results (CIFAR-100-LT)"
    Published("ce", "naive CE", WB_PAPER, "cifar100_lt", WB_BACKBONE,
              {100: 38.38, 50: 43.99, 10: 57.31}, {100: (64.05, 35.80, 11.43)}),
    Published("ce", "WD (tuned weight decay)", WB_PAPER, "cifar100_lt", WB_BACKBONE,
              {100: 46.08, 50: 52.71, 10: 66.03}, {100: (76.94, 44.28, 12.17)}),
    Published("ce+tau_norm", "WD + tau-norm", WB_PAPER, "cifar100_lt", WB_BACKBONE,
              {100: 51.31, 50: 57.65, 10: 67.79}, {100: (73.11, 47.69, 30.10)}),
    Published("wb/cb", "WD, then WD + CB", WB_PAPER, "cifar100_lt", WB_BACKBONE,
              {100: 52.42, 50: 57.47, 10: 67.96}, {100: (72.77, 49.74, 31.80)}),
    Published("wb/cb+maxnorm", "WD, then WD + CB + MaxNorm", WB_PAPER, "cifar100_lt",
              WB_BACKBONE, {100: 53.35, 50: 57.71, 10: 68.67}, {100: (72.60, 51.86, 32.63)}),
    Published("wb/cb+maxnorm", "WD, then WD + CB + MaxNorm", WB_PAPER, "imagenet_lt",
              "ResNeXt-50", {None: 53.9}, {None: (62.5, 50.4, 41.5)}),
    Published("wb/cb+maxnorm", "WD, then WD + CB + MaxNorm", WB_PAPER, "inat2018",
              "ResNet-50", {None: 70.2}),
)

# Imbalance factors of the CIFAR tables, the rows every report shows for CIFAR-100-LT.
CIFAR_FACTORS: tuple[float, ...] = (100, 50, 10)


def published_for(method: str, dataset: str) -> list[Published]:
    """The published lines for a method key on a dataset (empty when none)."""
    return [row for row in PUBLISHED if row.method == method and row.dataset == dataset]


def published_methods() -> list[str]:
    """Method keys with published numbers, in table order, each once."""
    return list(dict.fromkeys(row.method for row in PUBLISHED))


__all__ = ["CIFAR_FACTORS", "PUBLISHED", "Published", "published_for", "published_methods"]
