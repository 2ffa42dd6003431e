"""The `tailtune` console command (pyproject.toml [project.scripts]): one entry point for the four
tools, installed by `pip install -e .`, with no sys.path edits.

    tailtune search --space la            # = python search/run.py --space la
    tailtune trial --method la --la-tau 1 # = python -m trainables.pipeline ...
    tailtune leaderboard --experiment tailtune
    tailtune report --experiment tailtune --output report.md
"""

from __future__ import annotations

import sys
from importlib import import_module

# command -> (module with main(argv) -> int, what it does). Imported on use only: each tool's own
# imports (Ray, torch, MLflow, pandas) take seconds, and `tailtune --help` needs none of them.
COMMANDS = {
    "search": ("search.run", "run a hyperparameter sweep (python search/run.py)"),
    "trial": ("trainables.cli", "train and evaluate one configuration, no Ray"),
    "leaderboard": ("results.leaderboard", "rank the trials of an experiment"),
    "report": ("results.report", "best measured accuracy beside the published numbers"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items())
    return f"usage: tailtune COMMAND [options]   (tailtune COMMAND --help)\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"tailtune: error: unknown command {command!r}; accepted: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return import_module(COMMANDS[command][0]).main(rest)
