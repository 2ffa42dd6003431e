"""Compare named trial configurations over seeds on one dataset, in-process, as a Markdown table.

Each row is a named config dict; every (row, seed) goes through `trainables.pipeline.run_trial`.
Rows sharing a stage-1 configuration share its training through the stage-1 cache (identical
weights, so the comparison after stage 1 is paired across rows). Output, per row: validation and
test accuracy (all / many / medium / few) as mean ± sample std over seeds, the classifier row-norm
spread max/min after stage 1 and at the end, and the mean radius for DRO runs. For DRO rows it
also measures whether eps is on the scale of the features (see `feature_geometry`).

    nice -n 10 .venv/bin/python benchmarks/compare_methods.py --study all --seeds 0 1 2 3 4 \
        --extra-eps 10 --wb-lr 0.05 0.1 --out benchmarks/results/digits_methods.md

The results file is rewritten after every finished row, so a partial run leaves partial results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from trainables.centroids import compute_centroids  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.data import build_dataset  # noqa: E402
from trainables.losses import dro_loss  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.pipeline import run_trial  # noqa: E402
from trainables.stage1_cache import stage1_cache_key  # noqa: E402

GROUPS = ("all", "many", "medium", "few")
# Shared radii at which the geometry probe evaluates the DRO loss.
PROBE_EPS = (1.0, 3.0, 10.0, 30.0)

Row = tuple[str, dict[str, Any]]


# ---------------------------------------------------------------------------- the studies
@dataclass
class Study:
    title: str
    rows: list[Row]
    reference: str  # paired differences are taken against this row


def dro_lt_study(extra_eps: float | None = None) -> Study:
    """Issue "DRO-LT": CE, CE + cRT, the same pipeline with lam 0, DRO-LT per radius."""
    stage1 = {"dataset": "digits_lt", "epochs": 30}
    dro = {**stage1, "method": "dro_lt", "dro_epochs": 15, "cls_epochs": 10,
           "lam": 0.5, "eps": 1.0, "temperature": 1.0}
    rows: list[Row] = [
        ("CE", {**stage1, "method": "ce"}),
        ("CE + cRT", {**stage1, "method": "ce", "classifier": "retrain",
                      "cls_sampler": "class_balanced", "cls_epochs": 10, "dro_epochs": 0}),
        # equal budget and phases, DRO weight 0: separates the DRO loss from the extra
        # 15 epochs of low-lr training it comes with
        ("DRO-LT pipeline, lam 0", {**dro, "radius": "erm", "lam": 0.0}),
    ]
    rows += [(f"DRO-LT {radius}", {**dro, "radius": radius})
             for radius in ("erm", "shared", "count", "learned")]
    if extra_eps is not None:
        rows.append((f"DRO-LT shared, eps {extra_eps:g}",
                     {**dro, "radius": "shared", "eps": extra_eps}))
    return Study("DRO-LT", rows, reference="DRO-LT pipeline, lam 0")


def weight_balancing_study(lr: float = 0.05) -> Study:
    """Issue "Weight Balancing": the paper's ladder at equal stage-1 budgets and one lr."""
    stage1 = {"dataset": "digits_lt", "method": "ce", "epochs": 30, "schedule": "cosine",
              "lr": lr}
    wd = {**stage1, "weight_decay": 5e-3}
    cb = {**wd, "classifier": "retrain", "cls_loss": "cb", "cls_weight_decay": 0.1,
          "cls_epochs": 10, "maxnorm": "off"}
    rows = [
        ("naive CE", {**stage1, "weight_decay": 2e-4}),
        ("WD", wd),
        ("WD + tau-norm", {**wd, "classifier": "tau_norm", "tau": 1.0}),
        ("WD, then WD + CB", cb),
        ("WD, then WD + CB + MaxNorm", {**cb, "maxnorm": "step", "maxnorm_t": 0.1}),
    ]
    return Study(f"Weight Balancing, stage-1 lr {lr:g}", rows, reference="WD")


STUDY_NAMES = ("dro_lt", "weight_balancing")


# ---------------------------------------------------------------------------- DRO eps scale
@torch.no_grad()
def feature_geometry(model_state: dict[str, Any], config: TrialConfig,
                     probe_eps: tuple[float, ...] = PROBE_EPS) -> dict[str, float]:
    """How eps compares with the feature scale, for the model in `model_state`.

    Medians of: distances between centroids (and their minimum), the distance from a clean
    training image to its own centroid and to the nearest other centroid, the feature norm.
    `effect@eps` is (L_DRO(eps) - L_DRO(0)) / eps with a shared radius, over training batches:
    the loss changes by log(P + Q e^eps), with P, Q the own-class / other-class softmax mass,
    so the ratio lies in [0, 1]: near 0 the radius barely changes the loss or its gradients
    (eps too small for the feature scale), near 1 it fully applies.
    """
    dataset = build_dataset(config.data.dataset, imbalance=config.data.imbalance,
                            profile=config.data.profile, protocol=config.data.protocol,
                            data_dir=config.data.data_dir, split_seed=config.data.split_seed)
    in_channels = dataset.splits["train"].images.shape[1]
    model = create_model(config.stage1.model or dataset.default_model, dataset.num_classes,
                         in_channels)
    model.load_state_dict(model_state)
    model.eval()
    device = torch.device("cpu")
    clean = dataset.loader("train", batch_size=512, device=device)
    centroids = compute_centroids(model, clean, dataset.num_classes, model.feature_dim, device)
    features, labels = [], []
    for images, batch_labels in clean:
        features.append(model.features(images).float())
        labels.append(batch_labels.long())
    z, y = torch.cat(features), torch.cat(labels)
    to_centroids = torch.cdist(z, centroids)  # (N, C)
    own = to_centroids.gather(1, y[:, None]).squeeze(1)
    other = to_centroids.scatter(1, y[:, None], math.inf).min(1).values
    between = torch.cdist(centroids, centroids)
    between = between[~torch.eye(len(centroids), dtype=torch.bool)]
    report = {
        "centroid_gap_median": float(between.median()),
        "centroid_gap_min": float(between.min()),
        "own_distance_median": float(own.median()),
        "other_distance_median": float(other.median()),
        "feature_norm_median": float(z.norm(dim=1).median()),
    }
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(y), generator=generator)[:config.dro.batch_size]
               for _ in range(8)]
    zero = torch.zeros(dataset.num_classes)

    def loss(radii: torch.Tensor) -> float:
        return sum(float(dro_loss(z[b], y[b], centroids, radii, config.dro.temperature))
                   for b in batches) / len(batches)

    base = loss(zero)
    report["L_DRO@0"] = base
    for eps in probe_eps:
        report[f"effect@{eps:g}"] = (loss(zero + eps) - base) / eps
    return report


# ---------------------------------------------------------------------------- running
@dataclass
class RunRecord:
    row: str
    seed: int
    seconds: float
    result: dict[str, Any]
    geometry: dict[str, dict[str, float]] = field(default_factory=dict)


class GeometryProbe:
    """on_epoch hook: feature geometry after stage 1 (when trained live) and after the DRO phase.

    A stage-1 cache hit replays epochs without weights, so the stage-1 geometry is kept per
    stage-1 key and looked up by every row that shares it.
    """

    def __init__(self) -> None:
        self.stage1: dict[str, dict[str, float]] = {}
        self.current: dict[str, dict[str, float]] = {}
        self.config: TrialConfig | None = None

    def start(self, config: TrialConfig) -> None:
        self.config, self.current = config, {}

    def __call__(self, metrics: dict[str, Any], snapshot: Callable[[], dict[str, Any]]) -> None:
        config = self.config
        if config is None or metrics["replayed"]:
            return
        last = {"stage1": config.stage1.epochs, "dro": config.dro.epochs}.get(metrics["phase"])
        if metrics["phase_epoch"] != last:
            return
        geometry = feature_geometry(snapshot()["model"], config)
        if metrics["phase"] == "stage1":
            self.stage1[stage1_cache_key(config.stage1_key())] = geometry
        else:
            self.current["dro_end"] = geometry

    def finish(self) -> dict[str, dict[str, float]]:
        assert self.config is not None
        if self.config.dro.epochs == 0:
            return {}
        found = self.stage1.get(stage1_cache_key(self.config.stage1_key()))
        return {**({"stage1_end": found} if found else {}), **self.current}


def run_row(name: str, values: dict[str, Any], seeds: list[int], device: str,
            cache_dir: str, probe: GeometryProbe, log: Callable[[str], None]) -> list[RunRecord]:
    records = []
    for seed in seeds:
        config = TrialConfig.from_dict({**values, "seed": seed, "device": device})
        probe.start(config)
        started = time.perf_counter()
        result = run_trial(config, on_epoch=probe, cache_dir=cache_dir)
        seconds = time.perf_counter() - started
        if result["status"] != "completed":
            log(f"  {name} seed {seed}: status {result['status']}")
        records.append(RunRecord(name, seed, seconds, result, probe.finish()))
        log(f"  {name} seed {seed}: val {_pct(result['val']['all'])} "
            f"test {_pct(result['test']['all'])} ({seconds:.0f} s)")
    return records


# ---------------------------------------------------------------------------- summarising
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    present = [scale * v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"


def norm_spread(norms: list[float] | None) -> float | None:
    if not norms:
        return None
    return max(norms) / max(min(norms), 1e-12)


def row_summary(records: list[RunRecord]) -> list[str]:
    cells = [records[0].row, str(len(records))]
    for split in ("val", "test"):
        cells += [mean_std([r.result[split][g] for r in records], 100) for g in GROUPS]
    norms = [r.result["diagnostics"]["weight_norms"] for r in records]
    cells.append(mean_std([norm_spread(n["stage1"]) for n in norms], digits=2))
    cells.append(mean_std([norm_spread(n["final"]) for n in norms], digits=2))
    radii = [r.result["diagnostics"]["radii"] for r in records]
    cells.append(mean_std([statistics.mean(x) if x else None for x in radii], digits=3))
    return cells


RESULT_HEADER = ["method", "seeds", "val all", "val many", "val med", "val few", "test all",
                 "test many", "test med", "test few", "spread s1", "spread end", "mean radius"]
GEOMETRY_KEYS = ("centroid_gap_median", "centroid_gap_min", "own_distance_median",
                 "other_distance_median", "feature_norm_median", "L_DRO@0",
                 *(f"effect@{eps:g}" for eps in PROBE_EPS))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def geometry_rows(records_by_row: dict[str, list[RunRecord]]) -> list[list[str]]:
    """Geometry after stage 1 (once per distinct stage 1) and after each row's DRO phase."""
    rows, seen = [], set()
    for name, records in records_by_row.items():
        for moment in ("stage1_end", "dro_end"):
            found = [r.geometry[moment] for r in records if moment in r.geometry]
            if not found:
                continue
            cells = [mean_std([g[key] for g in found], digits=2) for key in GEOMETRY_KEYS]
            if moment == "stage1_end" and tuple(cells) in seen:
                continue  # rows sharing a stage 1 share its geometry
            seen.add(tuple(cells))
            rows.append([name, moment.replace("_", " "), str(len(found)), *cells])
    return rows


def radii_rows(records_by_row: dict[str, list[RunRecord]]) -> list[list[str]]:
    """Per-class radii at the end (mean over seeds), for the radius variants that vary."""
    rows = []
    for name, records in records_by_row.items():
        radii = [r.result["diagnostics"]["radii"] for r in records]
        if not radii[0] or len(set(radii[0])) == 1 and "learned" not in name:
            continue
        per_class = [statistics.mean(column) for column in zip(*radii, strict=True)]
        rows.append([name] + [f"{value:.3f}" for value in per_class])
    return rows


# ---------------------------------------------------------------------------- the report
def environment() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dirty = git("status", "--porcelain", "--", "trainables")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {torch.get_num_threads()} torch thread(s), "
                   f"python {platform.python_version()}, torch {torch.__version__}",
        "commit": git("rev-parse", "--short", "HEAD")
                  + (" (trainables/ has uncommitted changes)" if dirty else ""),
    }


def paired_rows(records_by_row: dict[str, list[RunRecord]], reference: str) -> list[list[str]]:
    """Per-seed differences against the reference row (same seed, and often the same stage 1)."""
    base = {r.seed: r.result for r in records_by_row.get(reference, [])}
    rows = []
    for name, records in records_by_row.items():
        pairs = [(r.result, base[r.seed]) for r in records if r.seed in base]
        if name == reference or not pairs:
            continue
        cells = [name, str(len(pairs))]
        for split, group in (("val", "all"), ("test", "all"), ("val", "few"), ("test", "few")):
            diffs = [mine[split][group] - ref[split][group] for mine, ref in pairs]
            better = sum(d > 0 for d in diffs)
            worse = sum(d < 0 for d in diffs)
            cells.append(f"{mean_std(diffs, 100)} ({better}+/{worse}-)")
        rows.append(cells)
    return rows


PAIRED_HEADER = ["method", "seeds", "Δ val all", "Δ test all", "Δ val few", "Δ test few"]


def study_section(study: Study, records_by_row: dict[str, list[RunRecord]]) -> list[str]:
    """The Markdown of one study: results, paired differences, eps scale, radii."""
    parts = ["", f"## {study.title}", "",
             markdown_table(RESULT_HEADER, [row_summary(r) for r in records_by_row.values()])]
    paired = paired_rows(records_by_row, study.reference)
    if paired:
        parts += ["", f"Paired differences against `{study.reference}` (points, mean ± std "
                  "over seeds; in brackets: seeds better / worse):", "",
                  markdown_table(PAIRED_HEADER, paired)]
    geometry = geometry_rows(records_by_row)
    if geometry:
        parts += ["", "Feature scale vs eps (median distances over training images; "
                  "`effect@e` = (L_DRO(e) - L_DRO(0)) / e in [0, 1]: 0 means a shared radius e "
                  "changes nothing):", "",
                  markdown_table(["row", "when", "n", *GEOMETRY_KEYS], geometry)]
    radii = radii_rows(records_by_row)
    if radii:
        counts = next(iter(records_by_row.values()))[0].result["class_counts"]
        parts += ["", "Radii per class at the end (mean over seeds; columns: training count):",
                  "", markdown_table(["row", *map(str, counts)], radii)]
    return parts


def write_report(path: Path, command: str, env: dict[str, str], studies: dict[str, Study],
                 done: dict[str, dict[str, list[RunRecord]]], seeds: list[int], elapsed: float,
                 finished: bool) -> None:
    parts = [
        "# Methods on digits_lt",
        "",
        f"- status: {'complete' if finished else 'PARTIAL (run in progress or interrupted)'}",
        f"- date: {env['date']}; code: commit {env['commit']}",
        f"- machine: {env['machine']}",
        f"- command: `{command}`",
        f"- seeds: {', '.join(map(str, seeds))}; wall time so far: {elapsed / 60:.1f} min",
        "",
        "Accuracies in %, mean ± sample std over seeds (seed changes init, batch order and "
        "augmentation; the data split is fixed: split_seed 0). Validation and test are balanced, "
        "300 images each (30 per class); Many = 1 class (30 images), Medium = 6, Few = 3 classes "
        "(90 images), so one image is 3.3 points of Many and 1.1 points of Few. "
        "`spread` is max/min of the classifier row norms after stage 1 and at the end; "
        "`mean radius` is the mean over classes of the DRO radii at the end.",
    ]
    for title, study in studies.items():
        records_by_row = done.get(title, {})
        if not records_by_row:
            continue
        parts += study_section(study, records_by_row)
        seconds = sum(r.seconds for recs in records_by_row.values() for r in recs)
        parts += ["", f"Trial wall time for this study: {seconds / 60:.1f} min.", "",
                  "Configs (plus `seed` and `device`; every other field at its TrialConfig "
                  "default, after the method's registered defaults (trainables/methods)):", ""]
        parts += [f"- {name}: `{json.dumps(values)}`" for name, values in study.rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", nargs="+", default=["all"],
                        choices=[*STUDY_NAMES, "all"], help="which studies to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--rows", nargs="+", help="only the rows with these names")
    parser.add_argument("--extra-eps", type=float,
                        help="DRO-LT study: add a shared-radius row with this eps")
    parser.add_argument("--wb-lr", nargs="+", type=float, default=[0.05],
                        help="Weight Balancing study: one table per stage-1 learning rate")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--cache-dir", help="stage-1 cache (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="Markdown file, rewritten after every row")
    parser.add_argument("--raw", type=Path, help="JSON lines of every run's result")
    parser.add_argument("--override", default="{}",
                        help="JSON dict merged into every config (e.g. short smoke runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        override = json.loads(args.override)
        if not isinstance(override, dict):
            raise ValueError
    except ValueError:
        print(f"error: --override must be a JSON object; got {args.override!r}", file=sys.stderr)
        return 2
    names = STUDY_NAMES if "all" in args.study else tuple(dict.fromkeys(args.study))
    chosen = [dro_lt_study(args.extra_eps)] if "dro_lt" in names else []
    if "weight_balancing" in names:
        chosen += [weight_balancing_study(lr) for lr in dict.fromkeys(args.wb_lr)]
    known = {row for study in chosen for row, _ in study.rows}
    unknown = sorted(set(args.rows or ()) - known)
    if unknown:
        print(f"error: unknown row {unknown[0]!r}; accepted: {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    studies: dict[str, Study] = {}
    for study in chosen:
        study.rows = [(row, {**values, **override}) for row, values in study.rows
                      if not args.rows or row in args.rows]
        if study.rows:
            studies[study.title] = study
    command = "nice -n 10 " + shlex.join([".venv/bin/python", "benchmarks/compare_methods.py",
                                          *(argv if argv is not None else sys.argv[1:])])
    env = environment()
    started = time.perf_counter()
    done: dict[str, dict[str, list[RunRecord]]] = {}
    probe = GeometryProbe()
    with tempfile.TemporaryDirectory(prefix="stage1-cache-") as scratch:
        cache_dir = args.cache_dir or scratch
        for study, spec in studies.items():
            print(f"## {study}", flush=True)
            for name, values in spec.rows:
                records = run_row(name, values, args.seeds, args.device, cache_dir, probe,
                                  lambda line: print(line, flush=True))
                done.setdefault(study, {})[name] = records
                if args.raw:
                    with args.raw.open("a") as raw:
                        for r in records:
                            slim = {k: v for k, v in r.result.items() if k != "history"}
                            raw.write(json.dumps({"study": study, "row": name, "seed": r.seed,
                                                  "seconds": r.seconds, "geometry": r.geometry,
                                                  "result": slim}) + "\n")
                if args.out:
                    write_report(args.out, command, env, studies, done, args.seeds,
                                 time.perf_counter() - started, finished=False)
    elapsed = time.perf_counter() - started
    for title, study in studies.items():
        print("\n".join(study_section(study, done.get(title, {}))))
    print(f"\ntotal wall time {elapsed / 60:.1f} min")
    if args.out:
        write_report(args.out, command, env, studies, done, args.seeds, elapsed, finished=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
