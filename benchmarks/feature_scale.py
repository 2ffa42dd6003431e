"""Is the DRO-LT radius on the scale of real features? The probe behind the `eps` range.

Trains (or takes from the stage-1 cache) the stage-1 model a `dro_lt` sweep starts from under a
benchmark's protocol, then measures on its clean training features: the distances between class
centroids, from an image to its own and to the nearest other centroid, the feature norm, and
`effect@eps` = (L_DRO(eps) - L_DRO(0)) / eps with a shared radius, at several temperatures.
The loss changes by log(P + Q e^(eps/T)), P and Q the own-class and other-class softmax mass of
a row, so the effect lies in [0, 1/T]: near 0 the own class already holds the mass (eps must
grow before it acts); near 1/T the other classes hold it and eps shifts the loss by a constant,
which moves the gradients little either. The radius changes the gradients most where it moves
the own-class mass P / (P + Q e^(eps/T)) through 1/2.

    python benchmarks/feature_scale.py --cifar-dir /path/to/cifar10-jpg \
        --cache-dir benchmarks/results/real_data/runs/stage1_cache

With the cache folder of the real-data benchmark's sweeps, the model trained here is the one
their `dro_lt` sweep then reuses (same stage-1 key), so the probe costs no extra training there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:  # runnable as a plain script from anywhere
        sys.path.insert(0, str(path))

from compare_methods import environment, feature_geometry  # noqa: E402
from real_data import BENCHMARKS  # noqa: E402

from spaces import fixed_settings, get_space  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.pipeline import run_trial  # noqa: E402
from trainables.stage1_cache import Stage1Cache  # noqa: E402

PROBE_EPS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
TEMPERATURES = (0.1, 1.0, 5.0)


def sweep_stage1_config(bench_key: str, data_dir: str) -> TrialConfig:
    """The stage-1 configuration of the benchmark's `dro_lt` sweep (as search/sweep.plan_sweep
    builds it), with the later phases off: same stage-1 key, so the same cache entry."""
    bench = BENCHMARKS[bench_key]
    space = get_space("dro_lt")
    fixed = fixed_settings(space, bench.dataset, bench.budget)
    data = bench.data
    fixed.update(imbalance=data["imbalance"], protocol="holdout", data_dir=data_dir,
                 download=False, n_max=data["n_max"], val_per_class=data["val_per_class"],
                 image_size=None, seed=0, model=data["model"])
    config = TrialConfig.from_dict(space.to_config({}, fixed))
    return config.replace(dro_epochs=0, classifier="none", device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="cifar", choices=sorted(BENCHMARKS))
    parser.add_argument("--cifar-dir", help="the extracted CIFAR-10 JPEG tree")
    parser.add_argument("--cache-dir", required=True, help="stage-1 cache folder")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "feature_scale.md"))
    args = parser.parse_args(argv)
    data_dir = args.cifar_dir if args.benchmark == "cifar" else "/usr/share/datasets/fashion-mnist"
    config = sweep_stage1_config(args.benchmark, str(Path(data_dir).resolve()))
    result = run_trial(config, cache_dir=args.cache_dir)
    payload = torch.load(Stage1Cache(args.cache_dir).entry_path(config.stage1_key()),
                         map_location="cpu", weights_only=True)
    lines = [f"# Feature scale against the DRO-LT radius ({config.data.dataset}, CPU protocol)", "",
             f"{environment()['date']}; {environment()['machine']}.",
             f"Stage 1 of the `dro_lt` sweep: {config.stage1.model}, "
             f"{config.stage1.epochs} epochs, "
             f"n_max {config.data.n_max}, IF {config.data.imbalance:g}; its validation accuracy "
             f"{100 * result['val']['all']:.1f}%.", ""]
    header = None
    for temperature in TEMPERATURES:
        probe = feature_geometry(payload["model"], config.replace(temperature=temperature),
                                 PROBE_EPS)
        if header is None:
            lines += ["| quantity | median |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in probe.items() if not k.startswith(
                ("effect", "L_DRO"))]
            header = ["T", "L_DRO@0", *(f"effect@{e:g}" for e in PROBE_EPS)]
            lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines.append(f"| {temperature:g} | {probe['L_DRO@0']:.3f} | "
                     + " | ".join(f"{probe[f'effect@{e:g}']:.3f}" for e in PROBE_EPS) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
