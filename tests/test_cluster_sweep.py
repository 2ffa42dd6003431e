"""A sweep on a real multi-node Ray cluster: `search/run.py --address auto` from the head.

Two nodes, each a host of its own in a network namespace (tests/netns_cluster.py: a veth pair,
`ray start` with an explicit --node-ip-address per node), one CPU each, token authentication on
with one token for the nodes and the driver. MLflow goes through a real `mlflow server` in the
head's namespace, bound to the head's address; the results storage is a folder both nodes see
at the same path (they share this machine's file system).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from netns_cluster import netns_available, ray_netns_cluster

NETNS_OK, NETNS_WHY = netns_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not NETNS_OK, reason=NETNS_WHY)]
MLFLOW = str(Path(sys.executable).parent / "mlflow")
PORT = 5000  # the head's namespace is private: nothing else listens there
EPOCHS, TRIALS = 4, 4

# Run in the head's namespace (the test's own cannot reach the namespaces' addresses).
WAIT_HEALTHY = textwrap.dedent(
    """
    import sys, time, urllib.request
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(sys.argv[1] + "/health", timeout=2) as answer:
                if answer.status == 200:
                    sys.exit(0)
        except OSError:
            time.sleep(0.5)
    sys.exit(1)
    """
)


def test_a_sweep_on_two_nodes_reaches_mlflow_through_a_server(tmp_path: Path) -> None:
    storage, name = tmp_path / "runs", "two-nodes"
    with ray_netns_cluster(num_nodes=2, cpus_per_node=1, auth="token") as cluster:
        url = f"http://{cluster.head_ip}:{PORT}"
        server_log = tmp_path / "mlflow.log"
        server = cluster.popen_in_head(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--host", cluster.head_ip, "--port", str(PORT), "--workers", "1",
             "--serve-artifacts", "--artifacts-destination", str(tmp_path / "mlartifacts")],
            server_log,
            # the tracking API and the artifact proxy only: no job runner, no telemetry
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        healthy = cluster.run_in_head([cluster.python, "-c", WAIT_HEALTHY, url], timeout=240)
        assert healthy.returncode == 0, server_log.read_text()[-3000:]
        nodes = cluster.alive_nodes()

        sweep = cluster.run_in_head(
            [cluster.python, "search/run.py", "--address", "auto", "--space", "ce",
             "--epochs", str(EPOCHS), "--num-samples", str(TRIALS), "--scheduler", "none",
             "--storage", str(storage), "--mlflow-uri", url, "--name", name],
            timeout=600,
        )
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        assert server.poll() is None  # the server served the whole sweep

        # A driver with another token is refused in one line, before anything is written.
        refused = cluster.run_in_head(
            [cluster.python, "search/run.py", "--address", "auto", "--space", "ce",
             "--storage", str(tmp_path / "refused"), "--mlflow-uri", url],
            env={"RAY_AUTH_TOKEN": "0" * 64}, timeout=300,
        )

    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"search/run.py: error: --address auto: the Ray cluster at {cluster.head_address} "
        "refused this driver's authentication token; accepted: RAY_AUTH_MODE=token with the "
        "cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (see docs/cluster.md)"]
    assert not (tmp_path / "refused").exists()

    assert "2 at a time, 1 CPU" in sweep.stdout  # one trial per node at once
    # The server's own store, read after the cluster is gone: every trial reached MLflow.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tailtune")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # through the server
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["tailtune.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["tailtune.role"] == "trial"]
    assert parent.data.tags["tailtune.status"] == "completed"
    assert len(children) == TRIALS
    for child in children:
        tags = child.data.tags
        assert (child.info.status, tags["tailtune.status"]) == ("FINISHED", "completed")
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert nodes[tags["tailtune.node_id"]] == tags["tailtune.node_ip"]  # as Ray reports it
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_all")]
        assert sorted(steps) == list(range(1, EPOCHS + 1))
    # trials ran on both nodes
    assert {c.data.tags["tailtune.node_ip"] for c in children} == set(cluster.node_ips)

    # Artifacts went through the server into its artifact store: each trial's results and
    # plots, and the sweep's plots on the parent run.
    artifacts = tmp_path / "mlartifacts"
    assert len(list(artifacts.rglob("per_class.csv"))) == TRIALS
    assert len(list(artifacts.rglob("plots/per_class_accuracy.png"))) == TRIALS
    assert list(artifacts.rglob(f"{parent.info.run_id}/artifacts/plots/*.html"))

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * TRIALS
    keys = {t.user_attrs["tune_trial_id"] for t in study.trials}
    assert keys == {c.data.tags["tailtune.trial_id"] for c in children}
