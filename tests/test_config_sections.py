"""The sectioned TrialConfig: flat names outside the trainer, sections inside, one table of both."""

from __future__ import annotations

import pytest

from trainables.cli import build_parser
from trainables.config import KNOBS, PRESETS, SECTIONS, ConfigError, TrialConfig
from trainables.methods import METHODS, Method, register_method
from trainables.phases import PHASES, Phase, register_phase
from trainables.registry import RegistryError
from trainables.stage1_cache import stage1_cache_key

# another valid value for every field, by flat name (not the default of any method)
OTHER = {
    "dataset": "fashion_mnist_lt", "imbalance": 50.0, "profile": "step", "protocol": "paper",
    "data_dir": "/elsewhere", "download": True, "n_max": 40, "val_per_class": 3,
    "image_size": 16, "split_seed": 1,
    "model": "resnet8", "epochs": 7, "batch_size": 64, "lr": 0.05, "momentum": 0.8,
    "weight_decay": 1e-3, "schedule": "constant", "warmup_epochs": 1,
    "dro_epochs": 3, "dro_lr": 0.01, "dro_weight_decay": 0.0, "dro_batch_size": 32,
    "dro_schedule": "cosine", "dro_sampler": "class_aware", "lam": 0.25, "radius": "learned",
    "eps": 0.3, "temperature": 2.0, "centroids": "augmented", "dro_combine": "sum",
    "ce_weighting": "count", "dro_freeze_classifier": True, "ncm_every": 2,
    "classifier": "tau_norm", "cls_reinit": True, "cls_epochs": 4, "cls_lr": 0.2,
    "cls_weight_decay": 0.01, "cls_batch_size": 16, "cls_schedule": "constant",
    "cls_sampler": "class_balanced", "cls_loss": "cb_bce", "cls_norm": "l2",
    "cls_norm_scale": 2.5, "cb_beta": 0.99, "maxnorm": "epoch", "maxnorm_radius": 1.5,
    "maxnorm_t": 0.3, "tau": 0.5,
    "seed": 3, "device": "cpu", "amp": False,
}
# what stage 1's result depends on, as the hand-kept list named it before the sections: the
# derived key must name the same fields, so existing cache entries keep their meaning
STAGE1_FIELDS = {"dataset", "data_dir", "imbalance", "n_max", "val_per_class", "image_size",
                 "profile", "protocol", "split_seed", "seed", "model", "epochs", "batch_size",
                 "lr", "momentum", "weight_decay", "schedule", "warmup_epochs", "amp"}


def test_every_field_has_an_other_value_here() -> None:
    assert set(OTHER) == set(KNOBS) - {"method"}


def test_the_stage1_key_is_the_data_and_stage1_sections_plus_seed_and_amp() -> None:
    key = TrialConfig().stage1_key()
    assert set(key) == STAGE1_FIELDS
    derived = {flat for flat, entry in KNOBS.items() if entry.section in ("data", "stage1")}
    assert set(key) == derived - {"download"} | {"seed", "amp"}


@pytest.mark.parametrize("flat", sorted(OTHER))
def test_a_field_changes_the_stage1_key_exactly_when_it_changes_stage1(flat: str) -> None:
    base = TrialConfig.from_dict({"method": "ce"})
    changed = base.replace(**{flat: OTHER[flat]})
    assert changed.get(flat) == OTHER[flat]
    moved = stage1_cache_key(changed.stage1_key()) != stage1_cache_key(base.stage1_key())
    assert moved == (flat in STAGE1_FIELDS), flat


@pytest.mark.parametrize("method", ["ce", "dro_lt", "wb", "dro_wb", "la"])
def test_every_field_and_option_survives_the_flat_round_trip(method: str) -> None:
    options = {"la_tau": 0.7, "la_form": "posthoc"} if method == "la" else {}
    config = TrialConfig.from_dict({**OTHER, "method": method, **options})
    flat = config.to_dict()
    assert list(flat) == [*KNOBS, *METHODS[method].option_defaults()]
    assert flat == {**OTHER, "method": method, **(options or flat_options(method))}
    assert TrialConfig.from_dict(flat) == config


def flat_options(method: str) -> dict:
    return METHODS[method].option_defaults()


def test_sections_read_what_the_flat_names_set() -> None:
    config = TrialConfig.from_dict({"dro_lr": 0.02, "lam": 0.1, "classifier": "retrain",
                                    "cls_lr": 0.3, "dataset": "cifar10_lt", "lr": 0.2,
                                    "seed": 5, "dro_combine": "sum", "cls_norm_scale": 4.0})
    assert config.dro.lr == 0.02 and config.dro.lam == 0.1 and config.dro.combine == "sum"
    assert config.classifier.mode == "retrain" and config.classifier.lr == 0.3
    assert config.classifier.norm_scale == 4.0
    assert config.data.dataset == "cifar10_lt" and config.stage1.lr == 0.2
    assert config.runtime.seed == 5
    assert set(SECTIONS) == {"data", "stage1", "dro", "classifier", "runtime"}


def test_presets_and_method_defaults_land_in_their_sections() -> None:
    paper = TrialConfig.from_dict(PRESETS["dro_lt_paper"])
    assert paper.dro.epochs == 80 and paper.dro.sampler == "class_aware"
    assert paper.classifier.sampler == "class_balanced" and paper.stage1.epochs == 200
    wb = TrialConfig.from_dict({"method": "wb"})
    assert wb.classifier.loss == "cb" and wb.stage1.weight_decay == 5e-3


def test_errors_name_the_flat_names() -> None:
    with pytest.raises(ConfigError, match=r"dro_lr must be a number in \(0, inf\]; got 0"):
        TrialConfig.from_dict({"dro_lr": 0})
    with pytest.raises(ConfigError, match=r"classifier must be one of none, retrain, tau_norm"):
        TrialConfig.from_dict({"classifier": "x"})
    with pytest.raises(ConfigError, match=r"cls_batch_size must be a number in \[2, "):
        TrialConfig.from_dict({"cls_batch_size": 1})
    with pytest.raises(ConfigError, match=r"unknown config key 'lr_dro'; accepted: .*\bdro_lr\b"):
        TrialConfig.from_dict({"lr_dro": 0.1})
    with pytest.raises(ConfigError, match=r"unknown config key 'dro'"):
        TrialConfig.from_dict({"dro": {"lr": 0.1}})  # sections are not flat names


def test_help_groups_the_flags_by_section() -> None:
    parser = build_parser()
    groups = {group.title: {flag for action in group._group_actions
                            for flag in action.option_strings}
              for group in parser._action_groups}
    assert {"data", "stage 1", "DRO-LT phase", "classifier phase", "runtime",
            "method la"} <= set(groups)
    for flat, entry in KNOBS.items():
        title = "options" if entry.section is None else SECTIONS[entry.section].TITLE
        assert "--" + flat.replace("_", "-") in groups[title], flat
    assert {"--dro-lr", "--lam", "--lambda"} <= groups["DRO-LT phase"]
    assert {"--cls-epochs", "--classifier", "--maxnorm"} <= groups["classifier phase"]
    assert {"--seed", "--device", "--amp"} <= groups["runtime"]
    assert {"--la-tau", "--la-form"} <= groups["method la"]
    text = parser.format_help()
    assert (text.index("\nstage 1:") < text.index("\n  --weight-decay")
            < text.index("\nDRO-LT phase:"))


def test_the_phase_registry_lists_the_three_phases_and_refuses_unknown_ones() -> None:
    assert list(PHASES) == ["stage1", "dro", "classifier"]
    assert PHASES["stage1"].cached and not PHASES["dro"].cached
    with pytest.raises(ConfigError, match=r"unknown phase 'nope'; accepted: stage1, dro, "
                                          r"classifier"):
        PHASES.get("nope")
    with pytest.raises(RegistryError, match=r"phase 'nope' .*accepted: stage1, dro, classifier"):
        register_phase("nope")(lambda trial, resume: None)
    with pytest.raises(RegistryError, match=r"phase 'dro' is registered twice"):
        PHASES.register("dro", Phase("dro", build=lambda trial, resume: None))
    with pytest.raises(RegistryError, match=r"phases \('stage1', 'nope'\); accepted"):
        register_method(Method(name="bad", summary="-", phases=("stage1", "nope"),
                               report_key=str, report_names={"bad": "bad"}))
    assert "nope" not in PHASES and "bad" not in METHODS
