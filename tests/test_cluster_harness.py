"""The namespace cluster harness gives a real two-node Ray cluster and leaves nothing behind."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from netns_cluster import (
    ClusterError,
    NetnsCluster,
    list_namespaces,
    namespace_pids,
    netns_available,
    pid_alive,
    ray_netns_cluster,
)

NETNS_OK, NETNS_WHY = netns_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not NETNS_OK, reason=NETNS_WHY)]

# Runs in the head namespace: spread tasks, one task pinned to each node, and the node table.
# Each node has one CPU and each task holds it for a second, so a round of four tasks runs on
# one node only while the other is not (yet) schedulable.
DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=sys.argv[1], log_to_driver=False)

    @ray.remote(num_cpus=1)
    def where():
        time.sleep(1.0)
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    # Rounds until both nodes are seen: the head's raylet learns the worker's free CPU a little
    # after the worker registers, so a first round may all run on the head.
    spread, deadline = [], time.monotonic() + 60
    while len({ip for ip, _ in spread}) < 2 and time.monotonic() < deadline:
        spread += ray.get([where.options(scheduling_strategy="SPREAD").remote() for _ in range(4)])
    pinned = {
        node_id: ray.get(where.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote())
        for node_id in json.loads(sys.argv[2])
    }
    alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    print("RESULT=" + json.dumps({"spread": spread, "pinned": pinned, "alive": alive}))
    """
)


def _run_driver(cluster: NetnsCluster, script: Path, node_ids: list[str]) -> dict:
    done = cluster.run_in_head(
        [cluster.python, str(script), cluster.head_address, json.dumps(node_ids)], timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT="))
    return json.loads(line.removeprefix("RESULT="))


def _processes(cluster: NetnsCluster) -> set[int]:
    pids = {node.proc.pid for node in cluster.nodes if node.proc is not None}
    for ns in cluster.namespaces:
        pids.update(namespace_pids(ns))
    return pids


def test_two_nodes_run_tasks_and_teardown_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    with ray_netns_cluster(num_nodes=2, cpus_per_node=1) as cluster:
        head_ip, worker_ip = cluster.node_ips
        assert head_ip != worker_ip
        assert cluster.head_address == f"{head_ip}:6379"
        assert set(cluster.namespaces) <= list_namespaces()

        nodes = cluster.alive_nodes()
        assert sorted(nodes.values()) == sorted(cluster.node_ips)

        result = _run_driver(cluster, script, list(nodes))
        assert sorted(result["alive"]) == sorted(cluster.node_ips)
        assert {ip for ip, _ in result["spread"]} == {head_ip, worker_ip}
        # Each task pinned to a node id ran on the ip that alive_nodes() gave for that id.
        for node_id, (ip, ran_on) in result["pinned"].items():
            assert ran_on == node_id
            assert ip == nodes[node_id]

        started = _processes(cluster)
        assert len(started) > 2  # gcs, raylets, workers: not only the two `ray start`s
        namespaces = cluster.namespaces

        # A crashed worker (as a fault-tolerance test makes one) leaves nothing in its namespace,
        # and teardown copes with a node that is already gone.
        cluster.kill_node(1)
        assert namespace_pids(namespaces[1]) == []
        assert namespace_pids(namespaces[0]) != []

    assert not set(namespaces) & list_namespaces()
    assert [pid for pid in started if pid_alive(pid)] == []
    assert all(node.proc.returncode is not None for node in cluster.nodes)
    assert not cluster.root.exists()


def test_token_auth_cluster_refuses_a_driver_with_another_token() -> None:
    check = [
        "import ray; ray.init(address='auto', log_to_driver=False);"
        "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
    ]
    with ray_netns_cluster(num_nodes=2, auth="token") as cluster:
        assert cluster.env["RAY_AUTH_MODE"] == "token"
        assert Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).is_file()

        ok = cluster.run_in_head([cluster.python, "-c", *check], timeout=180)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert "ALIVE 2" in ok.stdout

        # RAY_AUTH_TOKEN takes precedence over the cluster's token file.
        wrong = cluster.run_in_head(
            [cluster.python, "-c", *check], env={"RAY_AUTH_TOKEN": "0" * 64}, timeout=180
        )
        assert wrong.returncode != 0
        assert "token" in wrong.stderr.lower()


def test_failed_start_cleans_up_and_shows_the_node_log() -> None:
    # Ray refuses an object store below 75 MB, so the head's `ray start` exits at once.
    with pytest.raises(ClusterError) as failure:
        with ray_netns_cluster(num_nodes=2, ray_args=["--object-store-memory", "1000"]):
            pytest.fail("the cluster should not have started")
    message = str(failure.value)
    assert "head node" in message
    assert "object store" in message.lower()
    namespace = re.search(r"ttray-\w+-n0", message)
    assert namespace is not None, message
    assert not {namespace[0], namespace[0][:-1] + "1"} & list_namespaces()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="num_nodes=0"):
        with ray_netns_cluster(num_nodes=0):
            pass
    with pytest.raises(ValueError, match="auth='tls'"):
        with ray_netns_cluster(auth="tls"):
            pass
