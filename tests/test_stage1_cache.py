"""The stage-1 disk cache: hits, misses, real multi-process races, failures and corrupt entries."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from trainables.stage1_cache import Stage1Cache, stage1_cache_key

KEY = {"dataset": "digits_lt", "imbalance": None, "epochs": 3, "lr": 0.1, "seed": 0, "amp": True}


def trained_payload(seed: int) -> dict:
    """What a stage-1 run returns: a real (tiny) trained model's state_dict plus its history."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    history = []
    for epoch in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        history.append({"epoch": epoch, "train_loss": loss.item(), "note": None})
    return {"state_dict": model.state_dict(), "history": history, "seconds": 1.5}


class CountingTrainer:
    def __init__(self, seed: int = 0) -> None:
        self.calls = 0
        self.seed = seed

    def __call__(self) -> dict:
        self.calls += 1
        return trained_payload(self.seed)


def assert_same_payload(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    assert a["history"] == b["history"] and a["seconds"] == b["seconds"]


def test_second_call_is_a_hit_with_the_same_tensors(tmp_path: Path) -> None:
    cache, trainer = Stage1Cache(tmp_path / "cache"), CountingTrainer()
    first, hit = cache.get_or_train(KEY, trainer)
    assert not hit and trainer.calls == 1
    assert_same_payload(first, trained_payload(0))
    second, hit = cache.get_or_train(dict(reversed(list(KEY.items()))), trainer)
    assert hit and trainer.calls == 1
    assert_same_payload(first, second)
    # a fresh cache object on the same folder (another trial process) hits too
    third, hit = Stage1Cache(tmp_path / "cache").get_or_train(KEY, trainer)
    assert hit and trainer.calls == 1
    assert_same_payload(first, third)
    entry = cache.entry_path(KEY)
    assert json.loads(entry.with_suffix(".json").read_text()) == KEY
    assert not list(entry.parent.glob("*.tmp"))


def test_a_different_key_trains_again(tmp_path: Path) -> None:
    cache = Stage1Cache(tmp_path)
    trainer_a, trainer_b = CountingTrainer(0), CountingTrainer(1)
    payload_a, _ = cache.get_or_train(KEY, trainer_a)
    payload_b, hit = cache.get_or_train({**KEY, "lr": 0.05}, trainer_b)
    assert not hit and trainer_b.calls == 1
    assert not torch.equal(payload_a["state_dict"]["0.weight"], payload_b["state_dict"]["0.weight"])
    again, hit = cache.get_or_train(KEY, trainer_b)
    assert hit and trainer_b.calls == 1
    assert_same_payload(again, payload_a)


def test_key_hash_is_canonical() -> None:
    assert stage1_cache_key(KEY) == stage1_cache_key(dict(sorted(KEY.items())))
    assert stage1_cache_key({**KEY, "epochs": 3.0}) == stage1_cache_key(KEY)  # same value
    assert stage1_cache_key({**KEY, "epochs": 4}) != stage1_cache_key(KEY)
    assert stage1_cache_key({**KEY, "amp": False}) != stage1_cache_key(KEY)
    assert stage1_cache_key({**KEY, "imbalance": 100}) != stage1_cache_key(KEY)
    with pytest.raises(TypeError, match="stage-1 key"):
        stage1_cache_key({"model": object()})


def _race_worker(root: str, counter: str, barrier, results) -> None:
    def train() -> dict:
        with open(counter, "a") as file:  # one line per training that actually ran
            file.write("trained\n")
        time.sleep(0.5)  # hold the lock while the other processes arrive
        return trained_payload(0)

    barrier.wait()
    payload, hit = Stage1Cache(root).get_or_train(KEY, train)
    state = payload["state_dict"]
    results.put((hit, {name: tensor.tolist() for name, tensor in state.items()},
                 payload["history"]))


def test_concurrent_processes_train_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = 3
    barrier, results = context.Barrier(workers), context.Queue()
    counter = tmp_path / "counter.txt"
    processes = [context.Process(target=_race_worker,
                                 args=(str(tmp_path / "cache"), str(counter), barrier, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in range(workers)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert counter.read_text().splitlines() == ["trained"]
    assert sorted(hit for hit, _, _ in outcomes) == [False] + [True] * (workers - 1)
    assert all(state == outcomes[0][1] and history == outcomes[0][2]
               for _, state, history in outcomes)
    expected = trained_payload(0)["state_dict"]
    # trained in another process (other thread count), so equal up to float summation order
    assert outcomes[0][1].keys() == expected.keys()
    for name, tensor in expected.items():
        got = torch.tensor(outcomes[0][1][name], dtype=torch.float64)
        assert torch.allclose(got, tensor.double(), atol=1e-5), name


def test_a_failed_training_leaves_nothing_and_releases_the_lock(tmp_path: Path) -> None:
    cache = Stage1Cache(tmp_path)

    def crash() -> dict:
        raise RuntimeError("out of memory in epoch 2")

    with pytest.raises(RuntimeError, match="epoch 2"):
        cache.get_or_train(KEY, crash)
    entry = cache.entry_path(KEY)
    assert not entry.exists() and not entry.with_suffix(".json").exists()
    with FileLock(str(entry.with_suffix(".lock")), timeout=0):  # free, not held by anyone
        pass
    trainer = CountingTrainer()
    _, hit = cache.get_or_train(KEY, trainer)
    assert not hit and trainer.calls == 1 and entry.exists()


def test_a_payload_torch_cannot_load_safely_is_refused(tmp_path: Path) -> None:
    cache = Stage1Cache(tmp_path)
    with pytest.raises(TypeError, match="only tensors.*Unsupported global"):
        cache.get_or_train(KEY, lambda: {"state_dict": {}, "clock": time.struct_time(range(9))})
    assert not cache.entry_path(KEY).exists() and not list(tmp_path.glob("*.tmp"))


def test_a_corrupt_entry_is_retrained(tmp_path: Path) -> None:
    cache, trainer = Stage1Cache(tmp_path), CountingTrainer()
    cache.get_or_train(KEY, trainer)
    entry = cache.entry_path(KEY)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as after a full disk
    payload, hit = cache.get_or_train(KEY, trainer)
    assert not hit and trainer.calls == 2
    assert_same_payload(payload, trained_payload(0))
    entry.write_bytes(b"not a torch file")
    _, hit = cache.get_or_train(KEY, trainer)
    assert not hit and trainer.calls == 3
    _, hit = cache.get_or_train(KEY, trainer)
    assert hit and trainer.calls == 3
