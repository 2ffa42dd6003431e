"""Run a hyperparameter sweep: python search/run.py --space dro_lt [options]

With no other option the sweep runs on the embedded digits_lt dataset (8 trials, ASHA) on the
local CPU in minutes. `--list-spaces` prints every space's dimensions and ranges. Bad input gives
one line on stderr and exit code 2, before any results folder or MLflow run exists.
Exit codes: 0 sweep completed, 1 interrupted or failed (--resume continues it), 2 bad input or an
environment the sweep cannot use (unwritable storage, no MLflow server or Ray cluster answering,
GPUs asked for where there are none); docs/bad_input.md lists the checks.
Ctrl-C and SIGTERM (a cluster scheduler ending the job) stop the sweep gracefully: the trials'
state is saved and the last line printed says how to resume.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the package, not the sibling modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from search.options import SWEEP_FILE, UsageError, parse_options, resume_hint  # noqa: E402

PROG = "search/run.py"


def list_spaces() -> str:
    from spaces import get_space, space_names
    from spaces.recipes import dataset_scale
    from trainables.data import dataset_names

    scales = ", ".join(f"{name}={dataset_scale(name)}" for name in dataset_names())
    blocks = [get_space(name).describe() for name in space_names()]
    return "\n\n".join([*blocks, f"dataset scales (which fixed plan applies): {scales}"])


def _input_errors() -> tuple[type[Exception], ...]:
    from search.environment import SetupError
    from search.ledger import LedgerError
    from search.scheduler import SchedulerError
    from spaces import SpaceError
    from trainables.config import ConfigError
    from trainables.data import DataError

    return UsageError, SpaceError, ConfigError, DataError, SchedulerError, SetupError, LedgerError


def _sigterm_as_interrupt():
    """SIGTERM (what a cluster scheduler sends before SIGKILL) stops the sweep like Ctrl-C.
    Returns the handler it replaced (None where signals cannot be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def _fail(message: object) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        options, only_list = parse_options(argv)
        if only_list:
            print(list_spaces())
            return 0
        from search.cluster import check_local_gpus
        from search.environment import check_storage, check_tracking
        from search.plan import plan_sweep

        plan = plan_sweep(options)
        check_local_gpus(options)
        check_storage(options.storage)
        check_tracking(plan.tracking_uri)
    except _input_errors() as exc:
        return _fail(exc)

    from search.plan import claim_sweep

    try:
        claim = claim_sweep(options)  # one driver per sweep, before Ray starts
    except _input_errors() as exc:
        return _fail(exc)
    try:
        plan.ledger.entries()  # a resumed sweep's ledger parses, or one line names the file
    except _input_errors() as exc:
        claim.abandon()
        return _fail(exc)
    previous = _sigterm_as_interrupt()
    try:
        return _run(options, plan, claim)
    except KeyboardInterrupt:  # before the sweep started, or after it ended
        started = (options.sweep_dir / SWEEP_FILE).exists()
        if not started:
            claim.abandon()  # nothing to resume: leave no folder
        print(f"{PROG}: interrupted" + (f"; {resume_hint(options)}" if started else ""),
              file=sys.stderr)
        return 1
    finally:
        claim.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(options, plan, claim) -> int:
    from search.cluster import connect, fit_resources

    try:
        cluster = connect(options.address)  # imports Ray: after the checks, for a quick refusal
    except _input_errors() as exc:
        claim.abandon()
        return _fail(exc)
    _sigterm_as_interrupt()  # again: ray.init replaced it with a plain exit (no records closed)
    import ray

    from search.report import final_report, header

    try:
        try:
            resources = fit_resources(options, cluster, fusable=plan.fusable)
        except UsageError as exc:
            claim.abandon()
            return _fail(exc)
        print(header(plan, resources), flush=True)
        from search.environment import SetupError
        from search.sweep import run_sweep

        try:
            outcome = run_sweep(plan, resources)
        except SetupError as exc:  # the study or MLflow refused the sweep's first record
            claim.abandon()
            return _fail(exc)
        print(final_report(plan, outcome), flush=True)
        return 0 if outcome.status == "completed" else 1
    finally:
        if options.address is None:
            ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
