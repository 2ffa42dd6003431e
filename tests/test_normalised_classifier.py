"""The L2-normalised classifier: unit rows times one scale, learned or fixed, in a real trial."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from results.report import method_key, method_name
from trainables.config import ConfigError, TrialConfig
from trainables.normalised_classifier import NormalisedLinear, normalise_classifier_
from trainables.pipeline import run_trial

WB = {"method": "wb", "dataset": "digits_lt", "epochs": 2, "cls_epochs": 2, "batch_size": 128,
      "warmup_epochs": 0, "device": "cpu", "cls_norm": "l2"}


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_logits_are_unit_rows_times_the_scale_whatever_the_row_norms() -> None:
    torch.manual_seed(0)
    layer = NormalisedLinear(5, 3, scale=4.0, learn_scale=False)
    features = torch.randn(7, 5, dtype=torch.float64)
    weight = layer.weight.detach().double()
    expected = 4.0 * features @ (weight / weight.norm(dim=1, keepdim=True)).T
    assert torch.allclose(layer(features.float()).double() - layer.bias.detach().double(),
                          expected, atol=1e-5)
    before = layer(features.float()).detach()
    with torch.no_grad():
        layer.weight[1] *= 25.0  # a larger row norm no longer means larger logits
    assert torch.allclose(layer(features.float()).detach(), before, atol=1e-5)
    assert torch.allclose(layer.effective_weight().norm(dim=1), torch.full((3,), 4.0))


def test_the_switch_keeps_the_rows_and_starts_a_learned_scale_at_their_mean_norm() -> None:
    model = nn.Module()
    model.classifier = nn.Linear(4, 3)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([[3.0, 4, 0, 0], [0, 0, 1, 0], [0, 2, 0, 0]]))
    normalise_classifier_(model, None)
    layer = model.classifier
    assert isinstance(layer, NormalisedLinear) and layer.log_scale.requires_grad
    assert math.exp(float(layer.log_scale.detach())) == pytest.approx((5 + 1 + 2) / 3)
    fixed = nn.Module()
    fixed.classifier = nn.Linear(4, 3)
    normalise_classifier_(fixed, 7.5)
    assert not fixed.classifier.log_scale.requires_grad
    assert "log_scale" not in dict(fixed.classifier.named_parameters())


def test_a_wb_trial_with_a_learned_scale_ends_with_equal_row_norms() -> None:
    result = run_trial(WB)
    assert result["status"] == "completed" and result["epochs_run"] == 4
    final = result["diagnostics"]["weight_norms"]["final"]
    stage1 = result["diagnostics"]["weight_norms"]["stage1"]
    assert max(final) == pytest.approx(min(final), rel=1e-5)  # one scale for every class
    assert max(stage1) / min(stage1) > 1.01  # the plain classifier's rows were not equal
    assert method_key(result["config"]) == "wb/cb+maxnorm+l2norm"
    assert "L2-normalised" in method_name("wb/cb+maxnorm+l2norm")


def test_a_fixed_scale_is_the_final_row_norm_and_resume_continues_the_phase() -> None:
    config = {**WB, "cls_norm_scale": 3.0}
    snapshots: dict[int, dict] = {}

    def keep(metrics, snapshot):
        snapshots[metrics["epoch"]] = _roundtrip(snapshot())

    full = run_trial(config, on_epoch=keep)
    assert full["diagnostics"]["weight_norms"]["final"] == pytest.approx([3.0] * 10, rel=1e-5)
    resumed = run_trial(config, resume_state=snapshots[3])  # inside the classifier phase
    assert resumed["test"]["per_class"] == full["test"]["per_class"]


def test_bad_values_name_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match=r"cls_norm must be one of off, l2; got 'l1'"):
        TrialConfig.from_dict({"method": "wb", "cls_norm": "l1"})
    with pytest.raises(ConfigError, match=r"cls_norm_scale must be a number in \(0, inf\]"):
        TrialConfig.from_dict({"method": "wb", "cls_norm_scale": 0.0})
