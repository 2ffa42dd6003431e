"""Input a hostile user gave search/run.py and results/leaderboard.py: out-of-range seeds,
names with a trailing newline, experiment names that are paths, --resume flags that were
ignored, hand-edited sweep.json files, two drivers creating one MLflow store at once, and stores
that are not SQLite databases. Each is refused in one line (exit 2, nothing written) or handled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from results import leaderboard
from results.mlflow_logging import SweepRecorder, local_tracking_uri
from results.store import SQLITE_HEADER, lock_path, prepare_local_store
from search.options import SEED_MAX, SWEEP_FILE, UsageError, parse_options
from search.optuna_search import tpe_sampler
from search.run import main

REPO = Path(__file__).resolve().parents[1]
PREFIX = "search/run.py: error: "


def _refused(argv: list[str], capsys) -> str:
    """Run search/run.py's main on argv; it must refuse in one line on stderr with exit 2 and
    print nothing else. Returns the message. Every refusal here is made while the command line
    is parsed, before a dataset is built or Ray started."""
    with pytest.raises(UsageError):
        parse_options(argv)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), captured.err[-2000:]
    assert captured.out == ""
    return lines[0].removeprefix(PREFIX)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- --seed
@pytest.mark.parametrize("seed", ["-1", str(SEED_MAX + 1)])
def test_a_seed_numpy_cannot_take_is_refused_up_front(seed, tmp_path, capsys) -> None:
    storage = tmp_path / "runs"
    message = _refused(["--space", "ce", "--seed", seed, "--storage", str(storage)], capsys)
    assert message == (f"--seed {seed} is out of range; accepted: an integer from 0 to "
                       f"{SEED_MAX} (2**32 - 1)")
    assert not storage.exists()
    # the ends of the accepted range are seeds numpy takes (via Optuna's TPE sampler)
    for edge in (0, SEED_MAX):
        options, _ = parse_options(["--space", "ce", "--seed", str(edge),
                                    "--storage", str(storage)])
        tpe_sampler(options.seed, options.num_samples)


# ---------------------------------------------------------------- --name
def test_a_sweep_name_with_a_trailing_newline_is_refused(tmp_path, capsys) -> None:
    storage = tmp_path / "runs"
    argv = ["--space", "ce", "--name", "abc\n", "--storage", str(storage)]
    message = _refused(argv, capsys)
    assert message.startswith("--name 'abc\\n' is not a valid sweep name; accepted: letters")
    assert not storage.exists()


def test_resume_checks_the_name_before_it_becomes_a_path(tmp_path, capsys) -> None:
    """--resume --name ../x would read the sweep.json of a folder beside --storage."""
    storage, outside = tmp_path / "runs", tmp_path / "outside"
    outside.mkdir()
    (outside / SWEEP_FILE).write_text(json.dumps({"space": "ce", "name": "outside"}))
    message = _refused(["--resume", "--name", "../outside", "--storage", str(storage)], capsys)
    assert message.startswith("--name '../outside' is not a valid sweep name")
    assert not storage.exists()


# ---------------------------------------------------------------- --experiment
HOSTILE_EXPERIMENTS = ["/abs/path", "../x", "", "a/b", "a\\b", "a\x00b", "a\tb", "a\nb", "abc\n",
                       ".hidden", "x" * 101, "trailing ", "it's", "_under", "a\x7fb"]


@pytest.mark.parametrize("experiment", HOSTILE_EXPERIMENTS,
                         ids=[repr(e)[:20] for e in HOSTILE_EXPERIMENTS])
def test_an_experiment_name_that_is_not_a_plain_name_is_refused_up_front(experiment, tmp_path,
                                                                         capsys) -> None:
    storage = tmp_path / "runs"
    argv = ["--space", "ce", "--experiment", experiment, "--storage", str(storage)]
    message = _refused(argv, capsys)
    assert message == (f"--experiment {experiment!r} is not a valid MLflow experiment name; "
                       "accepted: letters, digits, spaces, '.', '_', '-' (up to 100, starting "
                       "with a letter or digit, not ending with a space)")
    assert not storage.exists()


def test_an_accepted_experiment_keeps_its_artifacts_under_the_storage(tmp_path) -> None:
    """What the name check protects: results.mlflow_logging builds the artifact folder from the
    experiment name, so every accepted name must land in <storage>/mlartifacts/<name>."""
    storage = tmp_path / "runs"
    uri = local_tracking_uri(storage)
    storage.mkdir()
    prepare_local_store(uri)
    client = MlflowClient(uri)
    for name in ["tailtune", "my sweeps 2", "a.b_c-d", "x..y", "A" * 100]:
        options, _ = parse_options(["--space", "ce", "--experiment", name,
                                    "--storage", str(storage)])
        experiment_id = SweepRecorder(uri, options.experiment, "s", {})._experiment_id()
        location = client.get_experiment(experiment_id).artifact_location
        parsed = urllib.parse.urlparse(location)
        assert parsed.scheme == "file", location
        path = Path(urllib.request.url2pathname(parsed.path)).resolve()
        assert path == (storage / "mlartifacts" / name).resolve(), location


# ---------------------------------------------------------------- --resume
def _saved_sweep(storage: Path, *extra: str) -> Path:
    """A sweep's folder as search/run.py leaves it before its first trial: validated options
    saved to sweep.json (what search.sweep.start_records does)."""
    options, _ = parse_options(["--space", "ce", "--name", "s", "--storage", str(storage),
                                "--seed", "5", "--num-samples", "4", "--experiment", "exp1",
                                "--epochs", "3", "--reduction-factor", "3", *extra])
    options.sweep_dir.mkdir(parents=True)
    options.save()
    return options.sweep_dir / SWEEP_FILE


def test_a_copied_sweep_resumes_in_the_storage_given_with_its_saved_options(tmp_path) -> None:
    original = tmp_path / "original"
    _saved_sweep(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    # no flag of the sweep typed: the saved values, not the parser's defaults (seed 0, 8 ...)
    options, _ = parse_options(["--resume", "--name", "s", "--storage", str(copy)])
    assert options.storage == str(copy.resolve())
    assert options.sweep_dir == copy.resolve() / "s"
    assert options.mlflow_uri is None  # so the store is <copy>/mlflow.db, not the original's
    assert local_tracking_uri(options.storage) == f"sqlite:///{copy.resolve() / 'mlflow.db'}"
    assert (options.seed, options.num_samples, options.experiment, options.epochs,
            options.reduction_factor, options.resume) == (5, 4, "exp1", 3, 3.0, True)
    # the same values typed again are accepted
    again, _ = parse_options(["--resume", "--name", "s", "--storage", str(copy), "--seed", "5",
                              "--experiment", "exp1", "--space", "ce", "--epochs", "3"])
    assert (again.seed, again.experiment, again.storage) == (5, "exp1", str(copy.resolve()))


FIXED_CHANGES = [
    (["--seed", "3"], "--seed 3 differs from the sweep's original --seed 5"),
    (["--seed", "0"], "--seed 0 differs from the sweep's original --seed 5"),  # the default
    (["--see", "3"], "--seed 3 differs from the sweep's original --seed 5"),  # abbreviated
    (["--space", "wb"], "--space wb differs from the sweep's original --space ce"),
    (["--num-samples", "5", "--experiment", "tailtune"],
     "--experiment tailtune differs from the sweep's original --experiment exp1"),
    (["--epochs", "30"], "--epochs 30 differs from the sweep's original --epochs 3"),
    (["--imbalance", "50"], "--imbalance 50 differs from the sweep's original --imbalance "
                            "(not set)"),
    (["--dataset", "cifar10_lt"], "--dataset cifar10_lt differs from the sweep's original "
                                  "--dataset digits_lt"),
    (["--scheduler", "none"], "--scheduler none differs from the sweep's original --scheduler "
                              "asha"),
    (["--reduction-factor", "2"], "--reduction-factor 2 differs from the sweep's original "
                                  "--reduction-factor 3"),
    (["--model", "resnet20"], "--model resnet20 differs from the sweep's original --model "
                              "(not set)"),
    (["--mlflow-uri", "http://127.0.0.1:9"], "--mlflow-uri http://127.0.0.1:9 differs from the "
                                             "sweep's original --mlflow-uri (not set)"),
]


@pytest.mark.parametrize(("extra", "message"), FIXED_CHANGES,
                         ids=[" ".join(e) for e, _ in FIXED_CHANGES])
def test_resume_refuses_a_changed_option_of_the_sweep(extra, message, tmp_path, capsys) -> None:
    storage = tmp_path / "runs"
    saved = _saved_sweep(storage)
    before = _digest(saved)
    argv = ["--resume", "--name", "s", "--storage", str(storage), *extra]
    assert _refused(argv, capsys) == (f"--resume: {message}; accepted: the original value, or "
                                      "leave the flag out")
    assert _digest(saved) == before
    assert sorted(p.name for p in storage.iterdir()) == ["s"]  # no MLflow store made
    assert sorted(p.name for p in saved.parent.iterdir()) == [SWEEP_FILE]


def test_resume_refuses_another_data_dir_compared_resolved(tmp_path, capsys,
                                                          monkeypatch) -> None:
    storage, data = tmp_path / "runs", tmp_path / "data"
    _saved_sweep(storage, "--data-dir", str(data))
    other = tmp_path / "other"
    message = _refused(["--resume", "--name", "s", "--storage", str(storage),
                        "--data-dir", str(other)], capsys)
    assert message.startswith(f"--resume: --data-dir {other} differs from the sweep's original "
                              f"--data-dir {data}")
    monkeypatch.chdir(tmp_path)  # the same folder typed relative to the working folder
    options, _ = parse_options(["--resume", "--name", "s", "--storage", str(storage),
                                "--data-dir", "data"])
    assert options.data_dir == str(data)


def test_resume_honours_the_options_that_may_change(tmp_path) -> None:
    storage = tmp_path / "runs"
    _saved_sweep(storage)
    options, _ = parse_options([
        "--resume", "--name", "s", "--storage", str(storage), "--num-samples", "6",
        "--time-budget", "30", "--max-concurrent", "1", "--max-failures", "0",
        "--checkpoint-interval", "0", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0",
        "--address", "127.0.0.1:6379", "--top", "3", "--no-plots"])
    assert (options.num_samples, options.time_budget, options.max_concurrent,
            options.max_failures, options.checkpoint_interval, options.cpus_per_trial,
            options.gpus_per_trial, options.address, options.top, options.plots) == (
        6, 30.0, 1, 0, 0.0, 0.5, 0.0, "127.0.0.1:6379", 3, False)
    assert (options.seed, options.experiment, options.resume) == (5, "exp1", True)


@pytest.mark.parametrize(("extra", "message"), [
    (["--num-samples", "3"], "--resume: --num-samples 3 is fewer than the sweep's original "
                             "--num-samples 4; accepted: 4 or more, or leave the flag out"),
    (["--max-failures", "-1"], "--max-failures must be an integer >= 0; got -1"),
    (["--time-budget", "0"], "--time-budget must be a number > 0; got 0"),
    (["--max-concurrent", "0"], "--max-concurrent must be an integer >= 1; got 0"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be a number > 0; got 0"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial must be 0, a fraction in (0, 1] or a whole "
                                  "number; got 1.5"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval must be a number >= 0; got -1"),
])
def test_resume_checks_the_options_it_honours(extra, message, tmp_path, capsys) -> None:
    storage = tmp_path / "runs"
    saved = _saved_sweep(storage)
    before = _digest(saved)
    argv = ["--resume", "--name", "s", "--storage", str(storage), *extra]
    assert _refused(argv, capsys) == message
    assert _digest(saved) == before


# ---------------------------------------------------------------- a hand-edited sweep.json
ACCEPTED_FILE = ("accepted: the sweep.json search/run.py wrote, a JSON object of the sweep's "
                 "options (fields of search.options.SweepOptions; 'space' is required)")
CORRUPT = [
    (b"not json {", "is not JSON (Expecting value: line 1 column 1 (char 0))"),
    (b"", "is not JSON"),
    (b"\xff\xfe\x00\x01", "cannot read"),
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b'"space"', "holds a JSON str, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "is not JSON"),
    (b'{"space": "ce", "name": "s", "evil": 1}', "has unknown keys 'evil'"),
    (b'{"name": "s", "seed": 1}', "has no 'space'"),
    (b'{"space": "ce", "seed": "0"}', "'seed' is '0', which is not an integer"),
    (b'{"space": "ce", "seed": true}', "'seed' is True, which is not an integer"),
    (b'{"space": "ce", "num_samples": 2.5}', "'num_samples' is 2.5, which is not an integer"),
    (b'{"space": ["ce"]}', "'space' is ['ce'], which is not a string"),
    (b'{"space": "ce", "imbalance": "high"}', "'imbalance' is 'high', which is not a number "
                                              "or null"),
]


@pytest.mark.parametrize(("content", "fragment"), CORRUPT,
                         ids=[c[:24].decode("latin-1") for c, _ in CORRUPT])
def test_a_corrupt_sweep_file_is_one_line_naming_it(content, fragment, tmp_path, capsys) -> None:
    storage = tmp_path / "runs"
    saved = storage / "s" / SWEEP_FILE
    saved.parent.mkdir(parents=True)
    saved.write_bytes(content)
    message = _refused(["--resume", "--name", "s", "--storage", str(storage)], capsys)
    assert message.startswith(str(saved) if fragment != "cannot read" else
                              f"cannot read {saved}: ")
    assert fragment in message and message.endswith(ACCEPTED_FILE), message
    assert saved.read_bytes() == content
    assert sorted(p.name for p in storage.iterdir()) == ["s"]


@pytest.mark.parametrize(("content", "message"), [
    ({"space": "ce", "seed": -5}, "--seed -5 is out of range; accepted: an integer from 0 to "
                                  f"{SEED_MAX} (2**32 - 1)"),
    ({"space": "nope"}, "unknown space 'nope'; accepted: ce, dro_lt, wb, dro_wb"),
    ({"space": "ce", "experiment": "../x"}, "--experiment '../x' is not a valid MLflow "
                                            "experiment name"),
    ({"space": "ce", "num_samples": 0}, "--num-samples must be an integer >= 1; got 0"),
])
def test_a_sweep_file_with_values_out_of_range_is_refused(content, message, tmp_path,
                                                          capsys) -> None:
    storage = tmp_path / "runs"
    saved = storage / "s" / SWEEP_FILE
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps(content))
    assert _refused(["--resume", "--name", "s", "--storage", str(storage)],
                    capsys).startswith(f"{saved}: {message}")


def test_a_sweep_file_of_another_sweep_is_refused(tmp_path, capsys) -> None:
    """A renamed folder: the Optuna study and the MLflow runs carry the saved name."""
    storage = tmp_path / "runs"
    saved = _saved_sweep(storage)
    saved.parent.rename(storage / "renamed")
    message = _refused(["--resume", "--name", "renamed", "--storage", str(storage)], capsys)
    assert message.startswith(f"{storage / 'renamed' / SWEEP_FILE} is the sweep 's', not "
                              "'renamed'")


def test_a_corrupt_sweep_file_prints_no_traceback_from_the_command_line(tmp_path) -> None:
    storage = tmp_path / "runs"
    saved = storage / "s" / SWEEP_FILE
    saved.parent.mkdir(parents=True)
    saved.write_text("{truncated")
    proc = subprocess.run([sys.executable, "search/run.py", "--resume", "--name", "s",
                           "--storage", str(storage)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{PREFIX}{saved} is not JSON")
    assert proc.stdout == ""


# ---------------------------------------------------------------- two drivers, one new store
_INIT_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient
    from results.store import prepare_local_store

    uri, ready, go, name = sys.argv[1:5]
    Path(ready).touch()
    while not Path(go).exists():  # start together: both find the database empty
        time.sleep(0.005)
    prepare_local_store(uri)
    client = MlflowClient(uri)
    client.create_experiment(name)
    print(sorted(e.name for e in client.search_experiments()))
""")


def test_two_drivers_create_a_new_store_at_once(tmp_path) -> None:
    """Without the lock, the second of two drivers opening a new mlflow.db dies in Alembic's
    migration (table ... already exists, duplicate column, 0 rows updated in alembic_version)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(3):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        uri = local_tracking_uri(folder)
        go = folder / "go"
        children = [subprocess.Popen(
            [sys.executable, "-c", _INIT_CHILD, uri, str(folder / f"ready{i}"), str(go),
             f"driver{i}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for i in range(2)]
        deadline = time.monotonic() + 120
        while not all((folder / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(c.poll() is None for c in children)
            time.sleep(0.01)
        go.touch()
        for child in children:
            out, err = child.communicate(timeout=300)
            assert child.returncode == 0, err[-3000:]
        names = sorted(e.name for e in MlflowClient(uri).search_experiments())
        assert names == ["Default", "driver0", "driver1"]
        assert lock_path(folder / "mlflow.db").exists()


# ---------------------------------------------------------------- the leaderboard only reads
@pytest.mark.parametrize(("content", "fragment"), [
    (os.urandom(4096).replace(b"S", b"s"), "is not an SQLite database (it does not start with "
                                           "the SQLite header)"),
    (b"", "is empty (0 bytes)"),
    (SQLITE_HEADER + b"\x00\x01garbage" * 600, "cannot read MLflow at"),
], ids=["random-bytes", "empty", "header-then-garbage"])
def test_the_leaderboard_refuses_a_store_that_is_no_database_and_leaves_it(content, fragment,
                                                                          tmp_path,
                                                                          capsys) -> None:
    storage = tmp_path / "runs"
    storage.mkdir()
    database = storage / "mlflow.db"
    database.write_bytes(content)
    before = _digest(database)
    code = leaderboard.main(["--storage", str(storage)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err[-2000:]
    assert err.startswith("results/leaderboard.py: error: ") and fragment in err
    assert str(database) in err and "accepted: " in err
    assert _digest(database) == before  # byte for byte: no schema written into it
    assert sorted(p.name for p in storage.iterdir()) == ["mlflow.db"]
