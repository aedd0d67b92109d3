"""bench/heap_ab.py: the heap pad off and on, epoch by epoch, on two trainers that must end alike."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import GLIBC, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import heap_ab  # noqa: E402

SCRIPT = ROOT / "bench" / "heap_ab.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


@GLIBC
def test_pairs_of_epochs_are_timed_and_the_trainers_end_bit_identical(tmp_path, synthetic_dir):
    out = tmp_path / "heap.json"
    result = run("--data-dir", synthetic_dir, "--pairs", "2", "--threads", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["pads_bytes"] == {"default": 128 << 10, "padded": 64 << 20}
    assert len(record["pairs"]) == record["pairs_total"] == 2
    for pair in record["pairs"]:
        assert pair["ratio"] == pair["padded"]["seconds"] / pair["default"]["seconds"]
        assert pair["default"]["minor_page_faults"] >= 0 and pair["padded"]["minor_page_faults"] >= 0
    assert 0 <= record["padded_faster_in"] <= 2 and record["min_ratio"] <= record["median_ratio"] <= record["max_ratio"]
    assert record["bit_identical"] is True and record["trainers"] == 2
    assert record["environment"]["heap_top_pad_bytes"] == 64 << 20


@GLIBC
def test_one_trainer_alternates_the_pads_without_an_identity_check(tmp_path, synthetic_dir):
    out = tmp_path / "heap.json"
    result = run("--data-dir", synthetic_dir, "--pairs", "1", "--threads", "1", "--one-trainer", "--json", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["trainers"] == 1 and record["bit_identical"] is None and record["pairs_total"] == 1


def test_same_state_sees_one_changed_element():
    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    second.load_state_dict(first.state_dict())
    assert heap_ab.same_state(first, second)
    with torch.no_grad():
        second.bias[1] += 1e-7
    assert not heap_ab.same_state(first, second)


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "0"], "argument --pairs: expected an integer >= 1, got '0'"),
    ([], "holds no prepared data (manifest.json)"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, argv, message):
    result = run("--data-dir", tmp_path, *argv)
    assert result.returncode == 2 and result.stderr.startswith("heap_ab.py: error: ")
    assert message in result.stderr and result.stderr.count("\n") == 1
