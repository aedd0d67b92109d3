"""bench/batching_study.py runs end to end on a tiny synthetic dataset and records what produced each run."""
import json
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import batching_study  # noqa: E402


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The study sets torch's thread count for the whole process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_run_is_recorded_with_mamos_own_numbers_and_its_provenance(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "study.json"
    argv = ["--dataset", "synthetic", "--data-dir", str(synthetic_dir), "--rules", "sde", "--users-per-step", "16",
            "--seeds", "1", "--json", str(out), "--scratch", str(tmp_path / "runs")]
    batching_study.main(argv)
    record = json.loads(out.read_text())["runs"]["sde/users_per_step=16/seed=1"]
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert set(metrics["results"]) == {"mamo", "train_mean", "support_mean"}  # MAMO alone, no ablation rows
    assert record["mae"] == metrics["results"]["mamo"]["all"]["mae"]
    assert record["train_loss_per_epoch"] == [round(row["train_loss"]["mamo"], 5) for row in metrics["epochs"]]
    assert record["environment"]["torch_threads"] == 1 and "git_commit" in record["environment"]
    batching_study.main(argv)  # a finished run is skipped, not trained again
    assert len(list((tmp_path / "runs").rglob("metrics.json"))) == 1
    assert "| sde | 16 |" in capsys.readouterr().out
