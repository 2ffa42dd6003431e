"""The registries are extension points: a dataset and a method registered from this file run a
real one-epoch trial; bad registrations and unknown names are errors naming what is accepted."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from results.report import method_key, method_name
from spaces import SPACES, Space, SpaceError, fixed_settings, get_space
from spaces.recipes import count_reference
from trainables.config import ConfigError, TrialConfig
from trainables.data import DATASETS, DataError, LTDataset, build_dataset, register_dataset
from trainables.methods import METHODS, Method, Option, register_method
from trainables.models import MODELS, create_model
from trainables.pipeline import run_trial
from trainables.registry import RegistryError

TOY_CLASSES = 4


@pytest.fixture
def toy_dataset() -> Iterator[str]:
    """The first four digit classes of digits_lt, as a dataset of its own."""

    @register_dataset("toy_lt", scale="tiny", n_max=77, default_model="resnet8")
    def build_toy(**options: object) -> LTDataset:
        digits = build_dataset("digits_lt", **options)
        splits = {}
        for name, split in digits.splits.items():
            keep = split.labels < TOY_CLASSES
            splits[name] = type(split)(split.images[keep], split.labels[keep])
        return LTDataset(
            name="toy_lt", num_classes=TOY_CLASSES,
            class_counts=digits.class_counts[:TOY_CLASSES], protocol=digits.protocol,
            splits=splits, mean=digits.mean, std=digits.std, crop_padding=1, flip=False,
            image_size=8,
        )

    yield "toy_lt"
    DATASETS.unregister("toy_lt")


@pytest.fixture
def focal_method() -> Iterator[list[tuple[float, int]]]:
    """Focal loss (Lin et al., 2017) as a stage-1 method; yields (loss, batch size) of every
    batch it computed."""
    seen: list[tuple[float, int]] = []

    def stage1_loss(config, class_counts, device):
        gamma = config.options["toy_gamma"]

        def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            log_p = F.log_softmax(logits.float(), 1).gather(1, labels[:, None]).squeeze(1)
            value = (-(1 - log_p.exp()) ** gamma * log_p).mean()
            seen.append((float(value.detach()), labels.numel()))
            return value

        return loss

    register_method(Method(
        name="toy_focal", summary="focal loss in stage 1", phases=("stage1",),
        options=(Option("toy_gamma", 2.0, "focusing parameter gamma", low=0.0, high=5.0),),
        stage1_loss=stage1_loss,
        report_key=lambda params: f"toy_focal/gamma{params['toy_gamma']:g}",
        report_names={"toy_focal/gamma2": "focal loss, gamma 2"},
    ))
    yield seen
    METHODS.unregister("toy_focal")


def test_a_dataset_and_a_method_registered_here_run_a_one_epoch_trial(
        toy_dataset: str, focal_method: list[tuple[float, int]]) -> None:
    result = run_trial({"dataset": toy_dataset, "method": "toy_focal", "epochs": 1,
                        "warmup_epochs": 0, "batch_size": 64, "device": "cpu"})
    assert result["status"] == "completed" and result["epochs_run"] == 1
    assert result["dataset"]["dataset"] == "toy_lt" and len(result["class_counts"]) == 4
    # the method's own loss trained stage 1: one value a batch, and the epoch's loss (the mean
    # over images) is theirs
    images = sum(result["class_counts"])
    assert len(focal_method) == math.ceil(images / 64)
    assert sum(size for _, size in focal_method) == images
    assert result["history"][0]["train_loss"] == pytest.approx(
        sum(loss * size for loss, size in focal_method) / images, rel=1e-5)
    # the dataset's declared default model was used: ResNet-8 has one block a stage
    assert result["config"]["model"] is None
    assert method_key(result["config"]) == "toy_focal/gamma2"
    assert method_name("toy_focal/gamma2") == "focal loss, gamma 2"
    # spaces read the dataset's metadata: its scale's plan and its n_max
    assert fixed_settings(get_space("ce"), toy_dataset)["epochs"] == 30
    assert count_reference(toy_dataset) == 77


def test_the_registered_default_model_is_the_one_built(toy_dataset: str) -> None:
    from trainables.pipeline import TrialRunner

    runner = TrialRunner(TrialConfig.from_dict({"dataset": toy_dataset, "device": "cpu"}))
    reference = create_model("resnet8", TOY_CLASSES, 1)
    assert [p.shape for p in runner.model.parameters()] == [
        p.shape for p in reference.parameters()]


def test_missing_or_bad_metadata_is_an_error_naming_the_accepted_values() -> None:
    def build(**_: object) -> LTDataset:
        raise AssertionError("never built")

    with pytest.raises(RegistryError, match=r"scale 'huge'; accepted: tiny, cifar, large"):
        register_dataset("bad_lt", scale="huge", n_max=10, default_model="resnet8")(build)
    with pytest.raises(RegistryError, match=r"default_model 'vgg'; accepted: resnet20, "):
        register_dataset("bad_lt", scale="tiny", n_max=10, default_model="vgg")(build)
    with pytest.raises(TypeError, match="scale"):
        register_dataset("bad_lt", n_max=10, default_model="resnet8")(build)  # type: ignore
    with pytest.raises(RegistryError, match=r"dataset 'digits_lt' is registered twice"):
        register_dataset("digits_lt", scale="tiny", n_max=10, default_model="resnet8")(build)
    with pytest.raises(RegistryError, match=r"phases \('dro',\); accepted: stage1 first"):
        register_method(Method(name="bad", summary="-", phases=("dro",),
                               report_key=str, report_names={"bad": "bad"}))
    with pytest.raises(RegistryError, match=r"option 'la_tau' is owned by another method"):
        register_method(Method(name="bad", summary="-", phases=("stage1",),
                               options=(Option("la_tau", 1.0, "-", low=0, high=1),),
                               report_key=str, report_names={"bad": "bad"}))
    with pytest.raises(RegistryError, match=r"searches method 'nope'; accepted: ce, dro_lt"):
        SPACES.register("bad", Space(name="bad", method="nope", summary="-", dimensions=(),
                                     plans={}))
    assert "bad_lt" not in DATASETS and "bad" not in METHODS and "bad" not in SPACES


def test_unknown_names_are_errors_naming_the_accepted_values() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'nope_lt'; accepted: cifar100_lt, "):
        build_dataset("nope_lt")
    with pytest.raises(ConfigError, match=r"method must be one of ce, dro_lt, wb, dro_wb"):
        TrialConfig.from_dict({"method": "nope"})
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; accepted: resnet20, resnet32"):
        create_model("vgg", 10)
    with pytest.raises(SpaceError, match=r"unknown space 'nope'; accepted: ce, dro_lt, wb"):
        get_space("nope")
    assert "resnet32" in MODELS and sorted(MODELS)[0] == "resnet20"


def test_a_dataset_whose_n_max_depends_on_its_data_gives_no_silent_reference() -> None:
    with pytest.raises(SpaceError, match=r"imagefolder takes from its data; accepted: n_max"):
        count_reference("imagefolder")
