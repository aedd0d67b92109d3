"""Tests of the non-metric utilities: seeding, device resolution, atomic file writes, the heap pad."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from tests.conftest import GLIBC
from utils import atomic_write_json, atomic_write_text, resolve_device, seed_everything

# --- seed_everything -----------------------------------------------------------------------------


def _draw(generator):
    explicit = torch.rand(1, generator=generator).item()
    return random.random(), np.random.rand(), torch.rand(1).item(), explicit


def test_seed_everything_is_reproducible():
    first = _draw(seed_everything(123))
    second = _draw(seed_everything(123))
    assert first == second
    assert _draw(seed_everything(124)) != first


def test_seed_everything_returns_generator_seeded_with_seed():
    generator = seed_everything(7)
    assert isinstance(generator, torch.Generator)
    assert generator.initial_seed() == 7
    assert torch.rand(3, generator=generator).tolist() == torch.rand(
        3, generator=torch.Generator().manual_seed(7)
    ).tolist()


# --- resolve_device ------------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_resolve_device_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError) as error:
            resolve_device(name)
        assert str(error.value) == (
            f"config device={name!r} but torch.cuda.is_available() is False; use 'cpu' or 'auto'"
        )


def test_resolve_device_with_cuda(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "", None])
def test_resolve_device_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device(name)


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_text(str(target), "second\n")
    assert target.read_text() == "second\n"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary file left behind


def test_atomic_write_json_round_trip(tmp_path):
    target = tmp_path / "results.json"
    obj = {"all": {"mae": 0.75, "ndcg@3": None, "n_users": 3}}
    atomic_write_json(target, obj)
    assert json.loads(target.read_text()) == obj
    assert target.read_text().endswith("\n")
    assert os.listdir(tmp_path) == ["results.json"]


def test_atomic_write_json_unserialisable_leaves_nothing(tmp_path):
    target = tmp_path / "results.json"
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert os.listdir(tmp_path) == []  # no partial file, no temporary file
    atomic_write_json(target, {"good": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"good": 2, "bad": {1, 2}})
    assert json.loads(target.read_text()) == {"good": 1}  # old content intact
    assert os.listdir(tmp_path) == ["results.json"]


def test_atomic_write_failure_during_replace_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(utils.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_syncs_a_hidden_temporary_file_beside_the_target_then_renames_it(tmp_path, monkeypatch):
    """The temporary file sits in the target's folder (a rename across file systems fails) and is on
    disk (fsync) before the rename makes it the target."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(utils.os, "fsync", lambda fd: calls.append(("fsync",)) or real_fsync(fd))
    monkeypatch.setattr(utils.os, "replace", lambda src, dst: calls.append(("replace", src, dst)) or real_replace(src, dst))
    target = tmp_path / "out.txt"
    atomic_write_text(target, "new")
    assert [call[0] for call in calls] == ["fsync", "replace"]
    source = Path(calls[1][1])
    assert source.parent == tmp_path and source.name.startswith(".out.txt.") and Path(calls[1][2]) == target
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "out.txt", "x")
    assert os.listdir(tmp_path) == []


def test_tasks_to_batch_stacks_support_then_query_and_pads_multi_hot():
    from utils import select_users, tasks_to_batch

    manifest = {"features": {"user": [{"name": "gender", "kind": "categorical", "size": 2}],
                             "item": [{"name": "year", "kind": "categorical", "size": 3},
                                      {"name": "genre", "kind": "multi_hot", "size": 4}]}}

    def task(user, ratings, genres):
        def part(rows):
            return {"item_ids": [20 + i for i in rows], "ratings": [ratings[i] for i in rows], "scenarios": [i % 4 for i in rows],
                    "item_features": {"year": [i % 3 for i in rows], "genre": [genres[i] for i in rows]}}
        return {"user_id": 10 + user, "user_features": [user], "support": part([0, 1]), "query": part([2])}

    batch = tasks_to_batch(manifest, [task(1, [5, 4, 3], [[0], [1, 2], []]), task(0, [1, 2, 3], [[3], [0], [2]])])
    assert batch.support_size == 2
    assert batch.user_codes.tolist() == [[1], [0]]
    assert batch.ratings.tolist() == [[5, 4, 3], [1, 2, 3]]
    assert batch.item_features["year"].tolist() == [[0, 1, 2], [0, 1, 2]]
    # widest row has 2 genres; padding index = vocabulary size 4
    assert batch.item_features["genre"].tolist() == [[[0, 4], [1, 2], [4, 4]], [[3, 4], [0, 4], [2, 4]]]
    assert batch.user_ids.tolist() == [11, 10] and batch.item_ids.tolist() == [[20, 21, 22], [20, 21, 22]]
    second = select_users(batch, torch.tensor([1]))
    assert second.ratings.tolist() == [[1, 2, 3]] and second.support_size == 2 and second.user_ids.tolist() == [10]


# --- keep_freed_heap -----------------------------------------------------------------------------

# Tensors made and freed in rounds; the page faults of rounds 2-6 -> printed. 400 of 100 kB (heap
# blocks: below glibc's initial size for taking a block straight from the system): glibc gives the
# heap's 40 MB top back after each round and the next round faults its ~10,000 pages in again,
# unless it keeps a pad. 160 of 256 kB after a freed 4 MB one: no faults after the first round by
# default (measured), and the pad must add none.
CHURN = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import utils
if {keep}:
    assert utils.keep_freed_heap() == utils.HEAP_TOP_PAD_BYTES
torch.ones(4 << 20, dtype=torch.uint8)  # made and freed at once
for size, count in ((100_000, 400), (256 << 10, 160)):
    for round_ in range(6):
        if round_ == 1:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensors = [torch.ones(size, dtype=torch.uint8) for _ in range(count)]
        del tensors
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def churn_faults(keep):
    """The page faults of the two patterns' counted rounds, in a fresh process."""
    code = CHURN.format(root=str(Path(utils.__file__).parent), keep=keep)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return [int(line) for line in result.stdout.split()]


@GLIBC
def test_keeping_freed_heap_stops_the_page_faults_of_repeated_allocations():
    (small_without, large_without), (small_with, large_with) = churn_faults(False), churn_faults(True)
    assert small_without > 5 * 7_000  # each of the 5 counted rounds faults most of its 40 MB in again
    assert small_with < small_without / 20
    assert large_with <= large_without + 500


def test_keep_freed_heap_is_idempotent():
    assert utils.keep_freed_heap() == utils.keep_freed_heap() == 64 << 20


@GLIBC
def test_the_environment_reports_the_pad_only_once_it_is_set(monkeypatch):
    monkeypatch.setitem(utils.heap_top_pad, "bytes", 0)
    assert utils.environment(torch.device("cpu"))["heap_top_pad_bytes"] == 0
    utils.keep_freed_heap()
    assert utils.environment(torch.device("cpu"))["heap_top_pad_bytes"] == 64 << 20


def test_keep_freed_heap_without_mallopt_is_a_no_op(monkeypatch):
    monkeypatch.setattr(utils.ctypes, "CDLL", lambda name: object())
    assert utils.keep_freed_heap() == 0
