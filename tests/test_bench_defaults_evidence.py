"""bench/defaults_evidence.py runs end to end on a tiny synthetic dataset, and its rows are what they claim."""
import json
import sys

from configs import config_settings
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import defaults_evidence  # noqa: E402


def test_evidence_rows_and_provenance(tmp_path, synthetic_dir):
    out = tmp_path / "evidence.json"
    defaults_evidence.main(["--dataset", "synthetic", "--data-dir", str(synthetic_dir), "--seed", "3",
                            "--run-dir", str(tmp_path / "run"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["dataset"] == "synthetic" and result["seed"] == 3
    assert set(result["prediction"]) == {"argmax", "expected", "expected, no local update (rho = 0)"}
    assert set(result["global_step"]) == {"sgd lambda=0.05", "adam lambda=0.05", "adam lambda=0.005"}
    assert config_settings["meta_optimizer"] == "adam" and config_settings["lambda"] == 0.005
    default = result["global_step"]["adam lambda=0.005"]  # the default model, trained again with the same seed
    assert {key: default[key] for key in ("mae", "rmse", "ndcg@3")} == result["prediction"]["expected"]
    assert len(default["train_loss_per_epoch"]) == config_settings["n_epoch"]
    assert result["prediction"]["argmax"]["mae"] != result["prediction"]["expected"]["mae"]
    assert "git_commit" in result["environment"]
