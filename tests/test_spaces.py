"""Search spaces: ranges from docs/methods.md 6, conditional dimensions, configs the pipeline
accepts."""

from __future__ import annotations

import math
import pickle

import optuna
import pytest

from spaces import Sampler, SpaceError, fixed_settings, get_space, space_names
from spaces.core import scale_phases
from spaces.recipes import count_reference
from trainables.config import TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

# docs/methods.md section 6, written out independently of spaces/: (low, high, log) per dimension.
SPEC = {
    "lam": (0.05, 0.95, False),
    "eps": (0.01, 5.0, True),
    "temperature": (0.05, 5.0, True),
    "lr": (0.003, 0.3, True),
    "weight_decay": (1e-5, 1e-1, True),
    "dro_lr": (1e-3, 1e-1, True),
    "dro_weight_decay": (1e-5, 1e-1, True),
    "cls_lr": (1e-3, 1e-1, True),
    "cls_weight_decay": (1e-4, 1.0, True),
    "maxnorm_t": (0.0, 1.0, False),
    "cb_one_minus_beta": (1e-4, 1e-1, True),
}
REQUIRED = {
    "ce": {"lr", "weight_decay"},
    "dro_lt": {"lam", "radius", "eps", "temperature", "dro_lr", "dro_weight_decay"},
    "wb": {"lr", "weight_decay", "cls_lr", "cls_weight_decay", "maxnorm_t", "cb_one_minus_beta"},
}
REQUIRED["dro_wb"] = REQUIRED["dro_lt"] | REQUIRED["wb"]
# When each conditional dimension must be present, given the sampled params.
CONDITIONS = {
    "eps": lambda params: params["radius"] != "erm",
    "maxnorm_t": lambda params: params["maxnorm"] == "step",
}
SAMPLES = 300


def draw(space_name: str, count: int = SAMPLES, seed: int = 0) -> list[dict]:
    """Sample a space through real Optuna trials (random sampler: covers the whole space)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = get_space(space_name)
    draws = []
    for _ in range(count):
        trial = study.ask()
        draws.append(space.sample(trial))
        study.tell(trial, 0.0)
    return draws


def test_registry_has_the_four_spaces_and_refuses_others() -> None:
    # the registry is open (a new space is a new module): the four come first, others may follow
    assert space_names()[:4] == ["ce", "dro_lt", "wb", "dro_wb"]
    with pytest.raises(SpaceError, match=r"unknown space 'dro'; accepted: ce, dro_lt, wb, dro_wb"):
        get_space("dro")


@pytest.mark.parametrize("name", ["ce", "dro_lt", "wb", "dro_wb"])
def test_space_dimensions_and_ranges_follow_methods_md(name: str) -> None:
    space = get_space(name)
    names = {dim.name for dim in space.dimensions}
    assert REQUIRED[name] <= names
    assert space.method == name
    for dim in space.dimensions:
        if dim.categorical:
            continue
        assert (dim.low, dim.high, dim.log) == SPEC[dim.name], dim.name


@pytest.mark.parametrize("name", ["ce", "dro_lt", "wb", "dro_wb"])
def test_samples_lie_in_range_and_conditionals_appear_exactly_when_they_should(name: str) -> None:
    space = get_space(name)
    seen: dict[str, set] = {}
    for params in draw(name):
        for dim in space.dimensions:
            condition = CONDITIONS.get(dim.name, lambda _: True)
            assert (dim.name in params) == condition(params), (dim.name, params)
            if dim.name not in params:
                continue
            value = params[dim.name]
            if dim.categorical:
                assert value in dim.choices
                seen.setdefault(dim.name, set()).add(value)
            else:
                low, high, _ = SPEC[dim.name]
                assert low <= value <= high, (dim.name, value)
        assert set(params) <= {dim.name for dim in space.dimensions}
    # every branch of every categorical was exercised, so both sides of each condition were
    for dim in space.dimensions:
        if dim.categorical:
            assert seen[dim.name] == set(dim.choices)


@pytest.mark.parametrize("name", ["ce", "dro_lt", "wb", "dro_wb"])
def test_sampled_configs_are_valid_trial_configs(name: str) -> None:
    space = get_space(name)
    fixed = fixed_settings(space, "digits_lt")
    for params in draw(name, count=60, seed=1):
        config = space.to_config(params, fixed)
        trial = TrialConfig.from_dict(config)  # raises on any invalid field
        assert trial.method == name
        assert trial.data.dataset == "digits_lt"
        if "cb_one_minus_beta" in params:
            assert math.isclose(trial.classifier.cb_beta, 1 - params["cb_one_minus_beta"])
        if params.get("radius") == "count":
            assert math.isclose(trial.dro.eps,
                                params["eps"] * math.sqrt(count_reference("digits_lt")))
        elif params.get("radius") in ("shared", "learned"):
            assert trial.dro.eps == params["eps"]
        elif params.get("radius") == "erm":
            assert trial.dro.eps == 0.0
        if "maxnorm" in params:
            assert trial.classifier.maxnorm == params["maxnorm"]


def test_sampler_is_what_optuna_search_calls_and_survives_pickling() -> None:
    # Tune pickles the searcher (with this function) into its experiment state for restore.
    sampler = pickle.loads(pickle.dumps(Sampler("dro_wb", fixed_settings(get_space("dro_wb"),
                                                                         "digits_lt"))))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3))
    trial = study.ask()
    out = sampler(trial)
    assert set(out) == {"trial"}
    assert set(trial.params) <= {dim.name for dim in get_space("dro_wb").dimensions}
    assert out["trial"]["lam"] == trial.params["lam"]
    TrialConfig.from_dict(out["trial"])


def test_fixed_settings_per_dataset_scale() -> None:
    dro_lt = get_space("dro_lt")
    tiny = fixed_settings(dro_lt, "digits_lt")
    cifar = fixed_settings(dro_lt, "cifar100_lt")
    assert tiny["dataset"] == "digits_lt" and cifar["dataset"] == "cifar100_lt"
    assert cifar["epochs"] == 200 and cifar["dro_epochs"] == 80 and cifar["batch_size"] == 128
    assert tiny["epochs"] + tiny["dro_epochs"] + tiny["cls_epochs"] < 100
    assert fixed_settings(get_space("ce"), "digits_lt").get("dro_epochs", 0) == 0


@pytest.mark.parametrize("total", [3, 4, 7, 10, 35, 101])
def test_epochs_override_keeps_every_phase_and_sums_to_the_total(total: int) -> None:
    fixed = fixed_settings(get_space("dro_wb"), "digits_lt", epochs=total)
    phases = [fixed["epochs"], fixed["dro_epochs"], fixed["cls_epochs"]]
    assert sum(phases) == total
    assert min(phases) >= 1
    assert TrialConfig.from_dict(get_space("dro_wb").to_config({}, fixed)).total_epochs == total


def test_epochs_override_too_small_is_refused_with_the_accepted_range() -> None:
    with pytest.raises(SpaceError, match=r"--epochs 2 .*accepted: an integer >= 3"):
        fixed_settings(get_space("dro_lt"), "digits_lt", epochs=2)
    assert scale_phases({"epochs": 30, "dro_epochs": 0, "cls_epochs": 0}, 1) == {
        "epochs": 1, "dro_epochs": 0, "cls_epochs": 0}


def test_rungs_start_where_the_last_searched_phase_begins() -> None:
    def offset(name: str) -> tuple[int, dict]:
        plan = fixed_settings(get_space(name), "digits_lt")
        return get_space(name).rung_offset(plan), plan

    assert offset("ce")[0] == 0  # lr and weight decay act from the first epoch
    dro_lt, plan = offset("dro_lt")
    assert dro_lt == plan["epochs"]  # the shared stage 1 is never judged
    wb, plan = offset("wb")
    assert wb == plan["epochs"]  # judged once the classifier dimensions acted
    dro_wb, plan = offset("dro_wb")
    assert dro_wb == plan["epochs"] + plan["dro_epochs"]


def test_list_spaces_prints_every_dimension_with_its_range(capsys) -> None:
    from search.run import main

    assert main(["--list-spaces"]) == 0
    out = capsys.readouterr().out
    for name in space_names():
        assert out.count(f"{name}  (method {name})") == 1
    assert "lam" in out and "[0.05, 0.95]" in out and "{erm, shared, count, learned}" in out
    assert "if radius in {shared, count, learned}" in out and "if maxnorm in {step}" in out
    assert "[0.0001, 1]" in out  # stage-2 weight decay


def test_a_space_shares_stage1_when_nothing_it_searches_acts_on_it() -> None:
    shared = {name: get_space(name).shares_stage1 for name in ("dro_lt", "wb", "la", "ce")}
    assert shared == {"dro_lt": True, "wb": False, "la": False, "ce": False}
