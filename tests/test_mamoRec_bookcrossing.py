"""End to end on synthetic Book-Crossing data: prepare -> train -> metrics.json (mamoRec.run)."""
import json

import pytest

import mamoRec
from data_prep.prepare_data import prepare
from tests.conftest import small_config


@pytest.mark.slow
def test_synthetic_bookcrossing_trains_and_evaluates(tmp_path):
    data_dir = tmp_path / "data"
    prepare("synthetic-bookcrossing", tmp_path / "raw", data_dir, n_users=150, log=lambda *_: None)
    cfg = small_config(dataset="synthetic-bookcrossing", data_dir=str(data_dir), raw_dir=str(tmp_path / "raw"),
                       run_dir=str(tmp_path / "run"), support_size=15, query_size=5, batch_size=5, n_epoch=1,
                       users_per_step=16, device="cpu", ablation=False)
    mamoRec.run(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["dataset"] == "synthetic-bookcrossing"
    for method in ("mamo", "train_mean", "support_mean"):
        overall = saved["results"][method]["all"]
        assert overall["n_ratings"] == 5 * overall["n_users"] > 0
        assert 0 < overall["mae"] <= overall["rmse"] < 9  # ratings 1-10
