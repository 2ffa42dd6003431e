"""search/run.py on bad input: one line on stderr, exit code 2, nothing created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from search import sweep
from search.book import KEY, MEMBERS
from search.cluster import fit_resources
from search.options import SweepOptions, UsageError, parse_options
from search.optuna_search import tpe_sampler
from search.run import main

REPO = Path(__file__).resolve().parents[1]

BAD = [
    (["--space", "dro"], "unknown space 'dro'; accepted: ce, dro_lt, wb, dro_wb"),
    (["--space", "ce", "--dataset", "mnist_lt"], "unknown dataset 'mnist_lt'; accepted: "),
    (["--space", "ce", "--dataset", "cifar10_lt", "--data-dir", "/nonexistent-tailtune-data"],
     "CIFAR-10 python archive not found in /nonexistent-tailtune-data"),
    (["--space", "ce", "--imbalance", "1"], "--imbalance must be a number > 1; got 1"),
    (["--space", "ce", "--imbalance", "nan"], "--imbalance must be a number > 1; got nan"),
    (["--space", "ce", "--num-samples", "0"], "--num-samples must be an integer >= 1; got 0"),
    (["--space", "ce", "--max-concurrent", "-1"], "--max-concurrent must be an integer >= 1"),
    (["--space", "ce", "--epochs", "0"], "--epochs must be an integer >= 1; got 0"),
    (["--space", "dro_lt", "--epochs", "2"], "--epochs 2 is too few for 3 phases"),
    (["--space", "ce", "--scheduler", "pbt"], "unknown scheduler 'pbt'; accepted: asha, none"),
    (["--space", "ce", "--reduction-factor", "1"], "--reduction-factor must be a number > 1"),
    (["--space", "ce", "--epochs", "4", "--grace-period", "5"],
     "--grace-period 5 is beyond the 4 epochs the method trains; accepted: 1 to 4"),
    (["--space", "ce", "--cpus-per-trial", "0"], "--cpus-per-trial must be a number > 0"),
    (["--space", "ce", "--gpus-per-trial", "-1"], "--gpus-per-trial must be 0, a fraction"),
    (["--space", "ce", "--gpus-per-trial", "1.5"], "--gpus-per-trial must be 0, a fraction"),
    (["--space", "ce", "--time-budget", "0"], "--time-budget must be a number > 0; got 0"),
    (["--space", "ce", "--name", "../escape"], "--name '../escape' is not a valid sweep name"),
    (["--space", "ce", "--num-samples", "many"], "argument --num-samples: invalid int value"),
    (["--num-samples", "3"], "--space is required; accepted: ce, dro_lt, wb, dro_wb"),
    (["--space", "ce", "--n-max", "0"], "--n-max must be an integer >= 1; got 0"),
    (["--space", "ce", "--val-per-class", "0"], "--val-per-class must be an integer >= 1"),
    (["--space", "ce", "--image-size", "4"], "--image-size must be an integer in [8, 1024]"),
    (["--space", "ce", "--model", "vgg"], "unknown model 'vgg'; accepted: resnet20, resnet32"),
    (["--space", "ce", "--profile", "natural"],
     "profile natural keeps an image folder's own counts; digits_lt is"),
    (["--space", "ce", "--dataset", "imagefolder", "--data-dir", "/nonexistent-tailtune-data"],
     "image folder /nonexistent-tailtune-data is not a directory"),
    (["--resume"], "--resume needs --name"),
    (["--resume", "--name", "nothing-here"], "no sweep 'nothing-here' to resume"),
]


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(argv, message, tmp_path, capsys):
    storage = tmp_path / "runs"
    code, out, err = _run_main([*argv, "--storage", str(storage)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("search/run.py: error: ")
    assert message in lines[0]
    assert out == ""
    assert not storage.exists()  # no results folder, hence no MLflow store or run


def test_existing_sweep_name_is_refused_without_touching_the_results(tmp_path, capsys) -> None:
    storage = tmp_path / "runs"
    (storage / "taken").mkdir(parents=True)
    (storage / "taken" / "optuna.db").write_bytes(b"")
    before = sorted(p.name for p in storage.rglob("*"))
    code, _, err = _run_main(["--space", "ce", "--name", "taken", "--storage", str(storage)],
                             capsys)
    assert code == 2
    assert "sweep 'taken' already exists" in err and "--resume" in err
    assert sorted(p.name for p in storage.rglob("*")) == before


def test_a_name_left_by_a_driver_killed_while_saving_its_options_is_free(tmp_path) -> None:
    """Killed between creating the sweep folder and saving sweep.json: there is nothing to
    resume, so the name may be used again (and --resume says there is no sweep)."""
    storage = tmp_path / "runs"
    (storage / "half").mkdir(parents=True)
    (storage / "half" / ".sweep.json.partial").write_text('{"space": "c')
    options, _ = parse_options(["--space", "ce", "--name", "half", "--storage", str(storage)])
    assert options.name == "half"
    with pytest.raises(UsageError, match="no sweep 'half' to resume"):
        parse_options(["--resume", "--name", "half", "--storage", str(storage)])
    options.save()
    assert SweepOptions(**json.loads((storage / "half" / "sweep.json").read_text())) == options
    assert sorted(p.name for p in (storage / "half").iterdir()) == ["sweep.json"]


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs a machine without a GPU")
def test_gpus_on_a_machine_without_is_refused_from_the_command_line(tmp_path) -> None:
    storage = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "search/run.py", "--space", "dro_lt", "--gpus-per-trial", "0.25",
         "--storage", str(storage)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "search/run.py: error: --gpus-per-trial 0.25 asked for, but this machine has no GPU; "
        "accepted here: 0 (trials run on the CPU)"
    ]
    assert not storage.exists()


def test_list_spaces_runs_as_a_script_from_the_repo_root() -> None:
    proc = subprocess.run([sys.executable, "search/run.py", "--list-spaces"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dro_wb  (method dro_wb)" in proc.stdout


def _options(**values) -> SweepOptions:
    return SweepOptions(space="ce", **values)


def test_gpus_on_a_cluster_without_are_refused() -> None:
    with pytest.raises(UsageError, match="the Ray cluster has no GPU"):
        fit_resources(_options(gpus_per_trial=0.25), {"CPU": 16.0})


def test_default_resources_fall_back_to_the_cpu_and_share_gpus() -> None:
    cpu_only = fit_resources(_options(num_samples=8), {"CPU": 2.0})
    assert (cpu_only.gpus, cpu_only.max_concurrent) == (0.0, 2)
    shared = fit_resources(_options(num_samples=8, max_concurrent=4), {"CPU": 16.0, "GPU": 1.0})
    assert (shared.gpus, shared.max_concurrent) == (0.25, 4)
    packed = fit_resources(_options(num_samples=8, gpus_per_trial=0.25), {"CPU": 16.0, "GPU": 1.0})
    assert (packed.gpus, packed.max_concurrent) == (0.25, 4)  # four trials on one GPU
    with pytest.raises(UsageError, match="--cpus-per-trial 4 is more than the 2 CPUs"):
        fit_resources(_options(cpus_per_trial=4.0), {"CPU": 2.0})


def test_trials_are_fused_by_default_only_where_they_share_gpus() -> None:
    gpu = {"CPU": 16.0, "GPU": 1.0}
    assert fit_resources(_options(num_samples=16), gpu).fuse == 8  # 2 trials of 8 members
    assert fit_resources(_options(num_samples=16), gpu, fusable=False).fuse == 1
    assert fit_resources(_options(gpus_per_trial=0.25), gpu).fuse == 1  # packing asked for
    assert fit_resources(_options(), {"CPU": 2.0}).fuse == 1
    assert fit_resources(_options(fuse=3), {"CPU": 2.0}).fuse == 3


def test_a_fused_group_on_cpus_takes_the_slots_its_members_would_have_taken() -> None:
    cpus = {"CPU": 2.0}
    one_group = fit_resources(_options(num_samples=8, fuse=8), cpus)
    assert (one_group.cpus_for(fused=True), one_group.cpus_for(fused=False)) == (2.0, 1.0)
    # four groups of two, two at a time: a core each, as unfused trials
    assert fit_resources(_options(num_samples=8, fuse=2), cpus).cpus_for(fused=True) == 1.0
    wide = fit_resources(_options(num_samples=8, fuse=4, cpus_per_trial=2.0), {"CPU": 16.0})
    assert wide.cpus_for(fused=True) == 8.0  # 2 groups share 8 slots of 2 CPUs
    assert fit_resources(_options(num_samples=3, fuse=8), {"CPU": 16.0}).cpus_for(True) == 3.0
    gpu = fit_resources(_options(num_samples=16), {"CPU": 16.0, "GPU": 1.0})
    assert gpu.cpus_for(fused=True) == 1.0  # on a GPU the device does the work
    # what Tune asks Ray for, per trial
    group = sweep._trial_resources(one_group, {MEMBERS: [{}, {}], KEY: "g"})
    alone = sweep._trial_resources(one_group, {"trial": {}, KEY: "t"})
    assert (group.required_resources["CPU"], alone.required_resources["CPU"]) == (2.0, 1.0)


def test_a_default_sized_sweep_is_modelled_by_tpe_not_drawn_at_random():
    # Optuna's TPE draws its first 10 trials at random: an 8-trial sweep would never be modelled.
    def objective(trial: optuna.Trial) -> float:
        return -(trial.suggest_float("x", 0.0, 1.0) - 0.8) ** 2

    studies = {}
    for name, sampler in (("ours", tpe_sampler(0, 8)),
                          ("optuna default", optuna.samplers.TPESampler(seed=0))):
        studies[name] = optuna.create_study(direction="maximize", sampler=sampler)
        studies[name].optimize(objective, n_trials=8)
    ours, default = ([t.params["x"] for t in s.trials] for s in studies.values())
    assert ours[:2] == default[:2]  # the same seeded random start-up draws
    assert ours[2:] != default[2:]  # then TPE proposes, where the default still draws at random
