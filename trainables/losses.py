"""The DRO-LT robust representation loss and its per-class radii (docs/methods.md section 4).

For every class c present in a batch B and every sample j in B:

    s[c, j]   = -( ||mu_c - z_j||_2 + eps_c * [y_j == c] ) / T
    logp[c,j] = s[c, j] - logsumexp over k in B of s[c, k]
    l_c       = - mean over j with y_j == c of logp[c, j]
    L_DRO     = sum_c w_c l_c / sum_c w_c        (classes present in B)

The authors' code adds the positives' radii through a class-major boolean-mask assignment, which
gives sample j another class's radius unless the batch is sorted by label; this module indexes
radii by each sample's own label, so batch order does not matter.
"""

from __future__ import annotations

import torch
from torch import nn

RADII = ("erm", "shared", "count", "learned")

# Squared distances are clamped here before the square root: the root's gradient at 0 is
# infinite, the clamp's gradient below the floor is 0, so a feature sitting on its centroid
# contributes no gradient through the distance instead of NaN.
_SQUARED_DISTANCE_FLOOR = 1e-12


def dro_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centroids: torch.Tensor,
    radii: torch.Tensor,
    temperature: float = 1.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_DRO of one batch: features (B, D), labels (B,), centroids (C, D), radii (C,).

    Vectorised without knowing which classes are present (no host sync): row i of the score
    matrix is the centroid of sample i's class, so a class with n_c samples in the batch fills
    n_c identical rows. Each row's l is its class's l_c; weighting row i by w_{y_i} / n_{y_i}
    turns the mean over rows into the weighted mean over present classes. Cost is B x B x D,
    independent of the number of classes. Computed in float32 even under bf16 autocast.
    Class weights must be non-negative with a positive sum over the present classes.
    """
    _check_shapes(features, labels, centroids, radii, class_weights)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    return dro_loss_unchecked(features, labels, centroids, radii, temperature, class_weights)


def dro_loss_unchecked(
    features: torch.Tensor,
    labels: torch.Tensor,
    centroids: torch.Tensor,
    radii: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dro_loss` without its argument checks: no Python branch on a value, so it runs under
    `torch.func.vmap` with a per-member temperature tensor (trainables.fused)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = features.float()
        mu = centroids.detach().float()[labels]  # (B, D): the centroid of each row's class
        # Distances are translation invariant; centring on the batch mean keeps the
        # ||a||^2 + ||b||^2 - 2ab expansion below free of cancellation between large norms.
        shift = z.detach().mean(0, keepdim=True)
        z, mu = z - shift, mu - shift
        squared = (mu.square().sum(1, keepdim=True) + z.square().sum(1).unsqueeze(0)
                   - 2.0 * mu @ z.T)
        distance = squared.clamp_min(_SQUARED_DISTANCE_FLOOR).sqrt()  # (B rows, B samples)
        same_class = labels.unsqueeze(1) == labels.unsqueeze(0)  # [y_j == y_i]
        row_radius = radii.float()[labels].unsqueeze(1)
        scores = -(distance + row_radius * same_class) / temperature
        log_prob = scores - torch.logsumexp(scores, dim=1, keepdim=True)
        same = same_class.float()
        in_class = same.sum(1)  # n_{y_i} in the batch, >= 1 (row i itself)
        row_loss = -(log_prob * same).sum(1) / in_class  # l_{y_i}
        weights = torch.ones_like(row_loss) if class_weights is None \
            else class_weights.float()[labels]
        row_weight = weights / in_class
        return (row_weight * row_loss).sum() / row_weight.sum().clamp_min(1e-12)


def _check_shapes(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                  radii: torch.Tensor, class_weights: torch.Tensor | None) -> None:
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (B, D) and labels (B,); got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if centroids.dim() != 2 or centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids must be (C, {features.shape[1]}); "
                         f"got {tuple(centroids.shape)}")
    num_classes = centroids.shape[0]
    if radii.shape != (num_classes,):
        raise ValueError(f"radii must be ({num_classes},); got {tuple(radii.shape)}")
    if class_weights is not None and class_weights.shape != (num_classes,):
        raise ValueError(f"class_weights must be ({num_classes},); "
                         f"got {tuple(class_weights.shape)}")


class RadiusModel(nn.Module):
    """The per-class radii eps_c; `forward()` returns them as a (C,) tensor.

    Fixed variants keep them in a buffer (moves with `.to(device)`, no gradient); `learned`
    keeps one parameter per class for the feature optimiser.

    Learned radii: d L_DRO / d eps_c > 0 always (a larger radius only makes the own class look
    farther), so the loss alone drives every learned radius down; unconstrained, as in the
    authors' code, they go negative, which rewards pulling features away from their own
    centroid. Here the radius used is clamp(param, min=0): it starts exactly at eps, and a radius
    that reaches 0 stays there (the clamp passes no gradient below 0), i.e. that class falls back
    to the plain (erm) loss. Weight decay on this parameter would push the radii down further;
    leave it out of the decayed group unless that is wanted.
    """

    def __init__(self, variant: str, radii: torch.Tensor) -> None:
        super().__init__()
        self.variant = variant
        if variant == "learned":
            self.raw = nn.Parameter(radii.clone())
        else:
            self.register_buffer("fixed", radii.clone())

    @property
    def trainable(self) -> bool:
        return self.variant == "learned"

    def forward(self) -> torch.Tensor:
        if self.trainable:
            return self.raw.clamp(min=0.0)
        return self.fixed

    def values(self) -> list[float]:
        """The radii the loss uses now, one per class (for logging)."""
        with torch.no_grad():
            return [float(value) for value in self().detach().cpu()]


def make_radii(variant: str, eps: float, class_counts: list[int]) -> RadiusModel:
    """Radii for `variant`: erm (0), shared (eps), count (eps / sqrt(n_c)), learned (init eps).

    A class with no training sample gets radius eps under `count` (it never appears in a batch).
    """
    if variant not in RADII:
        raise ValueError(f"radius must be one of {', '.join(RADII)}; got {variant!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    if not class_counts or any(count < 0 for count in class_counts):
        raise ValueError("class_counts must be a non-empty list of counts >= 0; "
                         f"got {class_counts!r}")
    counts = torch.tensor(class_counts, dtype=torch.float32)
    if variant == "erm":
        radii = torch.zeros_like(counts)
    elif variant == "count":
        radii = eps / counts.clamp_min(1.0).sqrt()
    else:  # shared, learned
        radii = torch.full_like(counts, float(eps))
    return RadiusModel(variant, radii)
