"""bench/epoch_ab.py: two checkouts timed side by side in fresh processes, and the refusals it shares
with bench/engine_ab.py."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "epoch_ab.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_two_checkouts_are_timed_round_by_round(tmp_path, synthetic_dir):
    out = tmp_path / "ab.json"
    result = run(ROOT, ROOT, "--data-dir", synthetic_dir, "--rounds", "2", "--epochs", "2", "--threads", "1",
                 "--json", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert len(record["rounds"]) == 2 and len(record["after_over_before_per_round"]) == 2
    for one_round in record["rounds"]:
        for label in ("before", "after"):
            epochs = one_round[label]
            assert len(epochs) == 2
            assert all(abs(e["seconds"] - e["train_seconds"] - e["eval_seconds"]) < 1e-9 for e in epochs)
    first = record["rounds"][0]
    # the median of two epochs is their mean: the ratio by hand
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    expected = mean([e["seconds"] for e in first["after"]]) / mean([e["seconds"] for e in first["before"]])
    assert abs(record["after_over_before_per_round"][0] - expected) < 1e-12
    assert record["environment"]["torch_threads"] == 1 and record["before"]["commit"] == record["after"]["commit"]


@pytest.mark.parametrize("script", ["epoch_ab.py", "engine_ab.py"])
def test_bad_arguments_are_refused_in_one_line(script, tmp_path, synthetic_dir):
    def run_script(*args):
        return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)],
                              capture_output=True, text=True)

    not_a_checkout = run_script(tmp_path, ROOT, "--data-dir", synthetic_dir)
    assert not_a_checkout.returncode == 2 and "is not a checkout of this repository" in not_a_checkout.stderr
    no_data = run_script(ROOT, ROOT, "--data-dir", tmp_path)
    assert no_data.returncode == 2 and "holds no prepared data" in no_data.stderr
    zero_rounds = run_script(ROOT, ROOT, "--data-dir", synthetic_dir, "--rounds", "0")
    assert zero_rounds.returncode == 2 and "at least 1" in zero_rounds.stderr
