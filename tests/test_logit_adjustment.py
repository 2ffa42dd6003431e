"""Logit adjustment (Menon et al., ICLR 2021): the loss against the paper's formula, the post-hoc
form, one-epoch trials through the method and the `la` space."""

from __future__ import annotations

import math
import random

import optuna
import pytest
import torch

from results.report import method_key, method_name
from spaces import fixed_settings, get_space, space_names
from trainables.config import ConfigError, TrialConfig
from trainables.evaluation import predict
from trainables.methods.logit_adjustment import (
    adjust_posthoc_,
    log_prior,
    logit_adjusted_cross_entropy,
)
from trainables.pipeline import TrialRunner, run_trial

ONE_EPOCH = {"dataset": "digits_lt", "epochs": 1, "batch_size": 128, "warmup_epochs": 0,
             "device": "cpu"}


def paper_loss(logits: list[list[float]], labels: list[int], counts: list[int],
               tau: float) -> float:
    """Menon et al., eq. (10), in float64 Python arithmetic: the mean over the batch of
    -log( exp(f_y + tau log pi_y) / sum_c exp(f_c + tau log pi_c) ), pi_c = n_c / sum n."""
    total = sum(counts)
    adjusted_rows = [[f + tau * math.log(n / total) for f, n in zip(row, counts, strict=True)]
                     for row in logits]
    losses = []
    for row, label in zip(adjusted_rows, labels, strict=True):
        top = max(row)  # log-sum-exp shifted by the row's maximum
        log_sum = top + math.log(sum(math.exp(a - top) for a in row))
        losses.append(log_sum - row[label])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_loss_matches_the_papers_formula(tau: float) -> None:
    rng = random.Random(7)
    counts = [500, 200, 80, 30, 9, 3]
    logits = [[rng.uniform(-6, 6) for _ in counts] for _ in range(64)]
    labels = [rng.randrange(len(counts)) for _ in range(64)]
    ours = logit_adjusted_cross_entropy(torch.tensor(logits), torch.tensor(labels),
                                        log_prior(counts), tau)
    assert ours.dtype == torch.float32
    assert float(ours) == pytest.approx(paper_loss(logits, labels, counts, tau), rel=1e-6,
                                        abs=1e-6)


def test_loss_pushes_the_head_class_margin_up() -> None:
    # the adjusted loss penalises a head-class label less than plain CE and a tail label more:
    # it asks for a larger margin on the rare classes (the paper's motivation)
    counts = [1000, 10]
    logits = torch.zeros(1, 2)
    prior = log_prior(counts)
    head = logit_adjusted_cross_entropy(logits, torch.tensor([0]), prior, 1.0)
    tail = logit_adjusted_cross_entropy(logits, torch.tensor([1]), prior, 1.0)
    plain = logit_adjusted_cross_entropy(logits, torch.tensor([0]), prior, 0.0)
    assert head < plain < tail


def test_a_class_without_images_keeps_the_loss_finite_at_every_tau() -> None:
    prior = log_prior([50, 0, 5])
    assert torch.isfinite(prior).all()
    logits = torch.randn(8, 3, requires_grad=True)
    loss = logit_adjusted_cross_entropy(logits, torch.tensor([0, 2] * 4), prior, 0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def _trained(config: dict) -> TrialRunner:
    runner = TrialRunner(TrialConfig.from_dict(config))
    assert runner.run()["status"] == "completed"
    return runner


def test_posthoc_with_tau_zero_leaves_predictions_unchanged() -> None:
    runner = _trained({**ONE_EPOCH, "method": "ce"})
    batches = runner.eval_batches("test")
    before, labels, _ = predict(runner.model, batches, False)
    logits_before = torch.cat([runner.model(images) for images, _ in batches]).detach()
    adjust_posthoc_(runner.model.classifier, log_prior(runner.class_counts), 0.0)
    after, _, _ = predict(runner.model, batches, False)
    logits_after = torch.cat([runner.model(images) for images, _ in batches]).detach()
    assert torch.equal(before, after)
    assert torch.equal(logits_before, logits_after)
    # and with tau > 0 the logits move by exactly -tau log pi
    adjust_posthoc_(runner.model.classifier, log_prior(runner.class_counts), 1.5)
    shifted = torch.cat([runner.model(images) for images, _ in batches]).detach()
    expected = logits_before - 1.5 * log_prior(runner.class_counts)
    assert torch.allclose(shifted, expected, atol=1e-5)
    assert labels.numel() == before.numel()


def test_both_forms_at_tau_zero_are_the_cross_entropy_trial() -> None:
    ce = run_trial({**ONE_EPOCH, "method": "ce"})
    for form in ("loss", "posthoc"):
        la = run_trial({**ONE_EPOCH, "method": "la", "la_form": form, "la_tau": 0.0})
        assert la["val"] == ce["val"] and la["test"] == ce["test"], form


def test_one_epoch_trial_through_the_method() -> None:
    for form in ("loss", "posthoc"):
        result = run_trial({**ONE_EPOCH, "method": "la", "la_form": form, "la_tau": 1.0})
        assert result["status"] == "completed" and result["epochs_run"] == 1
        assert [m["phase"] for m in result["history"]] == ["stage1"]
        assert math.isfinite(result["history"][0]["train_loss"])
        assert result["config"]["la_tau"] == 1.0 and result["config"]["la_form"] == form
        assert method_key(result["config"]) == f"la/{form}"
        assert "Menon" in method_name(f"la/{form}")


def test_the_stage1_cache_never_hands_a_cross_entropy_stage1_to_the_method() -> None:
    ce = TrialConfig.from_dict({**ONE_EPOCH, "method": "ce"}).stage1_key()
    la = TrialConfig.from_dict({**ONE_EPOCH, "method": "la"}).stage1_key()
    other_tau = TrialConfig.from_dict({**ONE_EPOCH, "method": "la", "la_tau": 2.0}).stage1_key()
    assert len({repr(sorted(k.items())) for k in (ce, la, other_tau)}) == 3


def test_options_are_checked_and_belong_to_the_method() -> None:
    with pytest.raises(ConfigError, match=r"la_tau must be a number in \[0.0, 10.0\]; got -1"):
        TrialConfig.from_dict({"method": "la", "la_tau": -1})
    with pytest.raises(ConfigError, match=r"la_form must be one of loss, posthoc; got 'x'"):
        TrialConfig.from_dict({"method": "la", "la_form": "x"})
    with pytest.raises(ConfigError, match=r"la_tau is an option of method la, not of ce"):
        TrialConfig.from_dict({"method": "ce", "la_tau": 1.0})


def test_the_la_space_samples_valid_configs_and_is_listed(capsys) -> None:
    from search.run import main

    assert "la" in space_names()
    space = get_space("la")
    fixed = fixed_settings(space, "digits_lt")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(50):
        trial = study.ask()
        params = space.sample(trial)
        study.tell(trial, 0.0)
        config = TrialConfig.from_dict(space.to_config(params, fixed))
        assert config.method == "la" and config.options["la_tau"] == params["la_tau"]
        assert 0.0 <= params["la_tau"] <= 2.5
    assert space.rung_offset(fixed) == 0  # every dimension acts from the first epoch
    assert main(["--list-spaces"]) == 0
    out = capsys.readouterr().out
    assert "la  (method la)" in out and "la_tau" in out
