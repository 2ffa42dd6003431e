"""The `tailtune` console command dispatches to the four tools with their own arguments."""

from __future__ import annotations

import json
import tomllib
from importlib import import_module
from pathlib import Path

from search.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_the_console_script_is_this_dispatcher() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["tailtune"].partition(":")
    assert getattr(import_module(module), function) is main
    for target, _ in COMMANDS.values():
        assert callable(import_module(target).main), target


def test_help_and_unknown_commands(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == ("tailtune: error: unknown command 'serve'; "
                                               "accepted: search, trial, leaderboard, report")
    assert main([]) == 2


def test_search_and_trial_run_through_it(capsys) -> None:
    assert main(["search", "--list-spaces"]) == 0
    assert "la  (method la)" in capsys.readouterr().out
    assert main(["trial", "--method", "la", "--la-tau", "0.5", "--epochs", "1",
                 "--warmup-epochs", "0", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "completed" and result["config"]["la_tau"] == 0.5
