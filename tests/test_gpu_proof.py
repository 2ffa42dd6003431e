"""The GPU proof's CPU rehearsal: every stage at toy size, with only what the GPU machine has.

The GPU machine has PyTorch, torchvision and numpy and nothing else: the rehearsal runs with every
other installed package made unimportable (a meta-path finder installed through sitecustomize, so
the stage and worker processes the script starts inherit it), which is how a dependency that
would break the GPU run shows up here first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from trainables.config import METHODS, RADII

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_proof.py"
# What the GPU machine has, with what those pull in, and the installer's own packages.
GPU_MACHINE_HAS = ("torch", "torchvision", "numpy", "pip", "setuptools", "wheel")
# The project is copied there, not installed with its dependencies.
PROJECT = "tailtune"
NEVER_ASKED_FOR = ("ray", "optuna", "mlflow", "sklearn")
STAGES = ("env", "correctness", "throughput", "packing", "fused", "paper_ce", "paper_dro_lt",
          "paper_wb", "fused_sweep")

SITECUSTOMIZE = '''
import os
import sys

_ABSENT = frozenset(os.environ["GPU_PROOF_ABSENT"].split(","))
_LOG = os.environ["GPU_PROOF_ASKED_LOG"]


class _AbsentOnGpuMachine:
    """Imports of these top-level names fail as if they were not installed; each is noted."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in _ABSENT:
            return None
        # Only an import statement is refused: importlib.util.find_spec() merely asks whether a
        # module exists (torch._dynamo asks about many at import time) and imports nothing.
        if sys._getframe(2).f_code.co_name != "_find_and_load_unlocked":
            return None
        with open(_LOG, "a") as handle:
            handle.write(f"{os.getpid()} {name}\\n")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, _AbsentOnGpuMachine())
'''


def requirement_closure(names: tuple[str, ...]) -> set[str]:
    """Distributions `names` need, transitively, as installed here (extras left out)."""
    seen: set[str] = set()
    todo = [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def absent_on_gpu_machine() -> list[str]:
    """Top-level modules installed here that the GPU machine does not have."""
    present = requirement_closure(GPU_MACHINE_HAS) | {PROJECT}
    return sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not any(canonicalize_name(dist) in present for dist in dists)
    )


def run_proof(out: Path, *args: str, tiny: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    shim = out / "gpu_machine_site"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
        "GPU_PROOF_ABSENT": ",".join(absent_on_gpu_machine()),
        "GPU_PROOF_ASKED_LOG": str(out / "asked_for_absent.log"),
        # one intra-op thread: on a busy 2-core machine two threads spin against each other
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", *(["--tiny"] if tiny else []),
         "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def records(out: Path) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in (out / "gpu_proof.jsonl").read_text().splitlines()]
    assert len({line["run"] for line in lines}) == 1, "one run, one run id"
    by_stage = {line["stage"]: line for line in lines}
    assert len(by_stage) == len(lines), "one line per stage"
    return by_stage


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_proof")
    started = time.perf_counter()
    done = run_proof(out)
    return {"out": out, "done": done, "seconds": time.perf_counter() - started}


def test_every_stage_passes_with_only_the_gpu_machine_packages(rehearsal: dict) -> None:
    done, out = rehearsal["done"], rehearsal["out"]
    lines = records(out)
    failing = {stage: line.get("error") or f"{line.get('headline')} {line.get('checks')}"
               for stage, line in lines.items() if line["status"] != "passed"}
    assert not failing, failing
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(lines) == list(STAGES)  # all of them, cheapest first
    for line in lines.values():
        assert line["forbidden_modules_loaded"] == []
        assert line["device"] == "cpu" and line["tiny"] is True
    asked = out / "asked_for_absent.log"
    names = {row.split()[1].partition(".")[0] for row in asked.read_text().splitlines()} \
        if asked.exists() else set()
    assert not names & set(NEVER_ASKED_FOR), names
    env = lines["env"]["result"]
    assert set(env["project_modules"].values()) == {"ok"}
    assert "tune" not in env["project_modules"] and "pipeline" in env["project_modules"]
    assert env["autocast_dtype"] == "torch.bfloat16"


def test_the_table_closes_the_run(rehearsal: dict) -> None:
    stdout = rehearsal["done"].stdout
    table = stdout[stdout.index("stage "):]
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+passed\s+[0-9.]+\s+[0-9.]+\s+\S", table, re.M), stage
    assert re.search(r"^ce\s+[0-9.]+\s+-\s+[0-9.]+\s+[0-9.]+\s+cross-entropy \(LDAM paper\) "
                     r"70\.36$", table, re.M)
    assert "CIFAR-10 (JPEG q75 copy)" in table


def test_correctness_covers_every_method_and_radius(rehearsal: dict) -> None:
    result = records(rehearsal["out"])["correctness"]["result"]
    runs = result["runs"]
    expected = {m for m in METHODS if m != "dro_lt"} | {f"dro_lt/{r}" for r in RADII}
    assert expected | {"preset:dro_lt_paper", "preset:wb_paper"} == set(runs)
    for name, run in runs.items():
        assert run["status"] == "completed" and run["finite"], name
        # 2 epochs in every phase the method has
        assert set(run["epochs"].values()) == {2}, (name, run["epochs"])
        assert all(math.isfinite(loss) for losses in run["losses"].values() for loss in losses)
    assert set(runs["dro_lt/learned"]["epochs"]) == {"stage1", "dro", "classifier"}
    assert set(runs["wb"]["epochs"]) == {"stage1", "classifier"}
    assert set(runs["ce"]["epochs"]) == {"stage1"}


def test_dro_loss_under_autocast_matches_float32(rehearsal: dict) -> None:
    dro = records(rehearsal["out"])["correctness"]["result"]["dro_loss_autocast"]
    assert set(dro["radii"]) == set(RADII)
    for variant, row in dro["radii"].items():
        assert row["passed"], variant
        assert row["rel_error_same_features"] < 1e-2, variant
        assert row["rel_error_bf16_features"] < 1e-2, variant
        # bf16 features really were rounded: the comparison is not float32 against itself
        assert row["autocast_bf16_features"] != row["float32"], variant
        assert row["float32"] > 0


def test_seeded_repeat_and_stage1_cache(rehearsal: dict) -> None:
    result = records(rehearsal["out"])["correctness"]["result"]
    assert result["repeat"]["identical"] is True and result["repeat"]["max_difference"] == 0
    cache = result["stage1_cache"]
    assert cache["passed"] and cache["stage1_epochs_replayed"] == 2
    assert cache["loaded_weights_match"]


def test_throughput_compares_both_paths_and_compiles(rehearsal: dict) -> None:
    result = records(rehearsal["out"])["throughput"]["result"]
    assert result["device_resident_images_per_s"] > 0 and result["reference_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["device_resident_images_per_s"] / result["reference_images_per_s"])
    (compiled,) = result["compiled"]
    assert compiled["status"] == "ok", compiled
    assert compiled["backend"] == "eager" and compiled["images_per_s"] > 0
    assert compiled["forbidden_modules_loaded"] == []


def test_packing_runs_k_trial_processes(rehearsal: dict) -> None:
    result = records(rehearsal["out"])["packing"]["result"]
    rows = {row["k"]: row for row in result["packing"]}
    assert set(rows) == {1, 2}
    for k, row in rows.items():
        assert row["status"] == "ok"
        assert len(row["per_trial_images_per_s"]) == k
        assert row["images"] == k * result["epochs_per_trial"] * row["train_images"]
        assert row["aggregate_images_per_s"] == pytest.approx(row["images"] /
                                                              row["window_seconds"])
        assert row["forbidden_modules_loaded"] == []
    assert rows[1]["speedup_vs_k1"] == 1.0
    assert result["fused"].startswith("measured by the fused stage")


def test_fused_measures_k_members_against_one_trial_and_packing(rehearsal: dict) -> None:
    lines = records(rehearsal["out"])
    result = lines["fused"]["result"]
    single = result["one_trial_images_per_s"]
    assert single > 0
    rows = {row["k"]: row for row in result["fused"]}
    assert set(rows) == {1, 2}  # --tiny's K list
    for row in rows.values():
        assert row["status"] == "ok" and row["aggregate_images_per_s"] > 0
        assert row["ratio_vs_one_trial"] == pytest.approx(row["aggregate_images_per_s"] / single)
    # on the CPU the pipeline neither autocasts nor goes channels-last; the fused path never
    # goes channels-last, and the line says so
    assert result["unfused_path"] == {"amp": False, "channels_last": False}
    assert result["fused_path"] == {"amp": False, "channels_last": False}
    # the packing stage ran before it in the same --out: its K processes are set beside
    packing = result["packing"]
    assert packing["same_run"] and packing["run"] == lines["packing"]["run"]
    measured = {row["k"]: row for row in lines["packing"]["result"]["packing"]}
    for row in packing["rows"]:
        assert row["aggregate_images_per_s"] == measured[row["k"]]["aggregate_images_per_s"]
        assert row["ratio_vs_one_trial"] == pytest.approx(row["aggregate_images_per_s"] / single)
    assert lines["fused"]["goals"] == {}  # the 8x goal is a GPU figure


def test_fused_sweep_trains_dro_lt_trials_in_fused_groups(rehearsal: dict) -> None:
    out = rehearsal["out"]
    result = records(out)["fused_sweep"]["result"]
    assert result["space"] == "dro_lt" and result["shares_stage1"] is True
    assert result["trials"] == 3 and result["fuse"] == 2 and result["groups"] == 2
    assert len(result["group_walls"]) == 2 and result["wall_seconds"] > 0
    assert result["plan"] == [["stage1", 1], ["dro", 1], ["classifier", 1]]
    configs = result["configs"]
    # a seeded draw through the space: distinct trials, each inside the space's ranges, one
    # seed and one data set for all
    from spaces import get_space

    space = get_space("dro_lt")
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 3
    for config in configs:
        assert config["method"] == "dro_lt" and config["seed"] == 0
        assert config["dataset"] == "cifar10_lt" and config["n_max"] == 8
        for name in ("lam", "temperature", "dro_lr", "dro_weight_decay"):
            assert space.dimension(name).contains(config[name]), name
        assert config["radius"] in space.dimension("radius").choices
    assert [m["status"] for m in result["members"]] == ["completed"] * 3
    for member in result["members"]:
        assert 0 <= member["val_all"] <= 1 and 0 <= member["test_all"] <= 1
    assert result["test_all"]["min"] <= result["test_all"]["median"] <= result["test_all"]["max"]
    unfused = result["unfused"]
    assert unfused["status"] == "completed"
    assert unfused["estimate_seconds"] == pytest.approx(3 * unfused["trial_wall_seconds"])
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    fused = [row for row in progress if row["stage"] == "fused_sweep"]
    assert len(fused) == 3 * 3  # every member's every epoch
    assert sorted({row["fused_members"] for row in fused}) == [1, 2]


def test_paper_stages_reuse_stage1_and_report_groups(rehearsal: dict) -> None:
    lines = records(rehearsal["out"])
    ce, dro, wb = (lines[s]["result"] for s in ("paper_ce", "paper_dro_lt", "paper_wb"))
    for result in (ce, dro, wb):
        assert result["dataset"]["source"] == "CIFAR-10 (JPEG q75 copy)"
        assert result["dataset"]["n_max"] == 20 and result["config"]["val_per_class"] == 5
        assert set(result["test"]) == {"all", "many", "medium", "few"}
        assert result["status_trial"] == "completed"
    assert ce["plan"] == [["stage1", 3]] and ce["timing"]["stage1"]["epochs"] == 3
    assert ce["published"] == {"cross-entropy (LDAM paper)": 70.36}
    # DRO-LT's stage 1 is paper_ce's, from the cache: replayed, not trained again
    assert dro["stage1_from_cache"] and "stage1" not in dro["timing"]
    assert dro["plan"] == [["stage1", 3], ["dro", 2], ["classifier", 2]]
    assert dro["radii_range"] is not None
    assert wb["plan"] == [["stage1", 3], ["classifier", 2]] and not wb["stage1_from_cache"]
    assert wb["maxnorm_radius"] > 0
    progress = [json.loads(line) for line in
                (rehearsal["out"] / "progress.jsonl").read_text().splitlines()]
    paper = [row for row in progress if row["stage"].startswith("paper")]
    assert len(paper) == 3 + (3 + 2 + 2) + (3 + 2)  # every epoch, replayed ones included


def test_rehearsal_stays_toy_sized() -> None:
    # The rehearsal is part of every CI run: it must stay a rehearsal, not a benchmark. Its size
    # is checked, not its seconds: on the shared 2-core machine the same rehearsal took 389 s
    # at load average 6, so a clock bound would fail on the neighbours' load, not on this code.
    tiny = load_script().TINY
    assert tiny.steps <= 5 and tiny.packing_epochs <= 2 and tiny.images <= 64
    assert tiny.fused_batch <= 16 and tiny.fused_steps * tiny.fused_repeats <= 2
    assert tiny.sweep_trials <= 4 and tiny.sweep_epochs == 3  # one epoch a phase
    assert max(tiny.paper_overrides["data"]["n_max"], tiny.sweep_data["n_max"]) <= 20


def test_budget_spent_skips_stages(tmp_path: Path) -> None:
    done = run_proof(tmp_path, "--stages", "env,paper", "--budget", "0", timeout=120)
    assert done.returncode == 1
    lines = records(tmp_path)
    assert list(lines) == ["env", "paper_ce", "paper_dro_lt", "paper_wb"]
    assert {line["status"] for line in lines.values()} == {"skipped"}
    assert not (tmp_path / "logs").exists()  # no stage process was started


def test_a_failing_stage_is_a_line_not_a_crash(tmp_path: Path) -> None:
    # without --tiny the paper stage reads --data-dir: an empty folder is a DataError
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "out"
    done = run_proof(out, "--stages", "paper_ce", "--data-dir", str(empty), tiny=False,
                     timeout=180)
    assert done.returncode == 1
    line = records(out)["paper_ce"]
    assert line["status"] == "error" and str(empty) in line["error"]
    assert re.search(r"^paper_ce\s+error\s", done.stdout, re.M)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_proof", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # registered first: its dataclasses look their module up while they are being built
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_stage_names_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    assert script.parse_args(["--stages", "paper,env"]).stage_list == [
        "env", "paper_ce", "paper_dro_lt", "paper_wb"]
    with pytest.raises(SystemExit) as exited:
        script.parse_args(["--stages", "env,gpu"])
    assert exited.value.code == 2
    assert "unknown stage 'gpu'; accepted: env, correctness" in capsys.readouterr().err
