"""The single-trial command: one configuration through every phase, without Ray.

    python -m trainables.pipeline --dataset digits_lt --epochs 30
    python -m trainables.pipeline --method dro_lt --radius learned --lam 0.5
    python -m trainables.pipeline --method wb --wd 5e-3 --maxnorm 0.1
    python -m trainables.pipeline --preset wb_paper --dataset cifar100_lt --data-dir data --download

Every TrialConfig field is a flag by its flat name (`--cls-lr`, `--dro-epochs`, ...), listed in
`--help` under its section (data, stage 1, DRO-LT phase, classifier phase, runtime), and so is
every option a registered method owns (`--la-tau`, listed under its method). Bad input prints one
line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trainables.config import (
    KNOBS,
    MAXNORM_MODES,
    PRESETS,
    SECTIONS,
    ConfigError,
    TrialConfig,
)
from trainables.data import DataError, dataset_names
from trainables.methods import METHODS
from trainables.pipeline import run_trial


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(annotation: str):
    if "bool" in annotation:
        return _parse_bool
    if "int" in annotation and "float" not in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainables.pipeline",
        description="Train and evaluate one long-tailed configuration (no Ray).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the authors' recipe")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--cache-dir", help="stage-1 cache folder (reuse identical stage-1 runs)")
    # one argument group a section, titled by it; top-level fields (--method) stay in the main one
    groups = {name: parser.add_argument_group(section.TITLE, section.__doc__)
              for name, section in SECTIONS.items()}
    for flat, entry in KNOBS.items():
        where = parser if entry.section is None else groups[entry.section]
        if flat == "maxnorm":
            where.add_argument(
                "--maxnorm",
                metavar="T|off|step|epoch",
                help="MaxNorm: a number is the relative radius t (projection every step); "
                     "or a mode",
            )
            continue
        where.add_argument(_flag(flat), dest=flat, type=_field_type(str(entry.spec.type)),
                           default=None)
    groups["stage1"].add_argument("--wd", dest="weight_decay", type=float,
                                  help="alias of --weight-decay")
    groups["dro"].add_argument("--lambda", dest="lam", type=float, help="alias of --lam")
    for method in METHODS.values():
        if not method.options:
            continue
        group = parser.add_argument_group(f"method {method.name}", method.summary)
        for option in method.options:
            kind = str if option.choices else float
            group.add_argument(_flag(option.name), dest=option.name, type=kind,
                               choices=option.choices or None, default=None, help=option.help)
    return parser


def _flag(flat: str) -> str:
    return "--" + flat.replace("_", "-")


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    names = [flat for flat in KNOBS if flat != "maxnorm"]
    names += [option.name for method in METHODS.values() for option in method.options]
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if args.maxnorm is not None:
        if args.maxnorm in MAXNORM_MODES:
            values["maxnorm"] = args.maxnorm
        else:
            try:
                values["maxnorm_t"] = float(args.maxnorm)
            except ValueError:
                raise ConfigError(
                    "--maxnorm must be a number (relative radius t) or off/step/epoch; "
                    f"got {args.maxnorm!r}"
                ) from None
            values["maxnorm"] = "step"
    dataset = values.get("dataset", "digits_lt")
    if dataset not in dataset_names():
        raise DataError(f"unknown dataset {dataset!r}; accepted: {', '.join(dataset_names())}")
    return TrialConfig.from_dict(values)


def _fmt(value: Any) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def print_epoch(metrics: dict[str, Any], _snapshot: Any) -> None:
    tag = " (cached)" if metrics.get("replayed") else ""
    line = (
        f"[{metrics['phase']:<10} {metrics['phase_epoch']:>3}] epoch {metrics['epoch']:>3}  "
        f"loss {metrics['train_loss']:.4f}  lr {metrics['lr']:.4g}"
        f"  val all {_fmt(metrics['val_all'])}"
        f"  many {_fmt(metrics['val_many'])}  med {_fmt(metrics['val_medium'])}"
        f"  few {_fmt(metrics['val_few'])}  {metrics['images_per_second']:.0f} img/s{tag}"
    )
    if "ncm_all" in metrics:
        line += f"  ncm {_fmt(metrics['ncm_all'])}"
    print(line, flush=True)


def print_summary(result: dict[str, Any]) -> None:
    protocol = result["protocol"]
    label = (
        "paper protocol: validation IS the test set"
        if protocol == "paper"
        else "held-out validation"
    )
    data = result["dataset"]
    sizes = "/".join(str(data["sizes"][split]) for split in ("train", "val", "test"))
    print(f"data: {data['dataset']} from {data.get('source', 'the embedded copy')}, imbalance "
          f"{data.get('imbalance', '-')}, train/val/test {sizes}")
    print(f"status: {result['status']}   protocol: {protocol} ({label})")
    print(f"{'split':<6} {'all':>6} {'many':>6} {'medium':>6} {'few':>6}")
    for split in ("val", "test"):
        report = result[split]
        print(
            f"{split:<6} "
            + " ".join(f"{_fmt(report[k]):>6}" for k in ("all", "many", "medium", "few"))
        )
    diagnostics = result["diagnostics"]
    norms = diagnostics["weight_norms"]
    for stage in ("stage1", "final"):
        if norms.get(stage):
            values = norms[stage]
            print(
                f"classifier row norms ({stage}): min {min(values):.3f}  max {max(values):.3f}  "
                f"spread (max/min) {max(values) / max(min(values), 1e-12):.2f}"
            )
    if diagnostics.get("radii") is not None:
        radii = ", ".join(f"{value:.3f}" for value in diagnostics["radii"])
        print(f"radii per class (counts {result['class_counts']}): {radii}")
    if diagnostics.get("ncm_val"):
        print(f"nearest-class-mean val accuracy: {_fmt(diagnostics['ncm_val']['all'])}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        result = run_trial(
            config, on_epoch=None if args.json else print_epoch, cache_dir=args.cache_dir
        )
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print_summary(result)
    return 0
