"""End to end: prepare a small synthetic dataset, train, evaluate, resume (mamoRec.py)."""
import json

import pytest
import torch

import mamoRec
from tests.conftest import small_config
from utils import SUBSETS


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from data_prep.prepare_data import prepare

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare("synthetic", None, out, n_users=150, log=lambda *_: None)
    return out


def experiment(data_dir, run_dir, **overrides):
    cfg = small_config(dataset="synthetic", data_dir=str(data_dir), run_dir=str(run_dir), support_size=15,
                       query_size=5, batch_size=5, n_epoch=2, users_per_step=16, device="cpu", **overrides)
    return cfg


def test_run_writes_metrics_config_csv_and_checkpoint(synthetic_dir, tmp_path):
    cfg = experiment(synthetic_dir, tmp_path / "run", with_ablation=True)
    metrics = mamoRec.run(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["results"] == json.loads(json.dumps(metrics["results"]))
    assert set(saved["results"]) == {"mamo", "train_mean", "support_mean", "no_memory"}
    for table in saved["results"].values():
        assert set(table) == set(SUBSETS)
        assert table["all"]["n_ratings"] == 5 * table["all"]["n_users"]
        assert set(table["all"]) >= {"mae", "rmse", "ndcg@3", "n_ratings", "n_users"}
    assert [row["epoch"] for row in saved["epochs"]] == [1, 2]
    assert set(saved["epochs"][0]["results"]) == {"mamo", "no_memory"}
    assert saved["train_seconds"] > 0 and saved["eval_seconds"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_epoch"] == 2
    csv_lines = (tmp_path / "run" / "epochs.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,method,train_loss,existing_user_existing_item_mae")
    assert len(csv_lines) == 1 + 2 * 2
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and state["model"]["memories.task"] is not None


def test_same_seed_same_numbers_and_other_seed_differs(synthetic_dir, tmp_path):
    first = mamoRec.run(experiment(synthetic_dir, tmp_path / "a", seed=7))
    second = mamoRec.run(experiment(synthetic_dir, tmp_path / "b", seed=7))
    third = mamoRec.run(experiment(synthetic_dir, tmp_path / "c", seed=8))
    assert first["results"] == second["results"] and first["epochs"] == second["epochs"]
    assert first["results"]["mamo"] != third["results"]["mamo"]


def test_resume_after_an_interrupted_epoch_gives_the_uninterrupted_numbers(synthetic_dir, tmp_path, monkeypatch):
    uninterrupted = mamoRec.run(experiment(synthetic_dir, tmp_path / "full"))
    cfg = experiment(synthetic_dir, tmp_path / "cut")
    original = mamoRec.MAMRec.train_epoch

    def train_then_crash(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(mamoRec.MAMRec, "train_epoch", train_then_crash)
    with pytest.raises(KeyboardInterrupt):
        mamoRec.run(cfg)
    monkeypatch.setattr(mamoRec.MAMRec, "train_epoch", original)
    resumed = mamoRec.run(cfg, resume=True)
    assert resumed["results"] == uninterrupted["results"]
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in uninterrupted["epochs"]]


def test_command_line_flags_override_the_config(tmp_path):
    args = mamoRec.parse_args(["--dataset", "synthetic", "--epochs", "5", "--seed", "3", "--device", "cpu",
                               "--with-ablation"])
    cfg = mamoRec.build_config(args)
    assert (cfg["dataset"], cfg["n_epoch"], cfg["seed"], cfg["device"]) == ("synthetic", 5, 3, "cpu")
    assert cfg["with_ablation"] and cfg["data_dir"] == "data/processed/synthetic"


def test_missing_data_explains_how_to_get_it(tmp_path, capsys):
    code = mamoRec.main(["--dataset", "movielens", "--data-dir", str(tmp_path / "p"), "--raw-dir",
                         str(tmp_path / "raw"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--download" in err and "--dataset synthetic" in err
    assert not (tmp_path / "run").exists()
