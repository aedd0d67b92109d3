"""End to end (mamoRec.py): a finished run's files, predictions.csv against metrics.json, the
ablation rows, seeds, and interrupt + resume giving the uninterrupted numbers."""
import csv
import json
import re
import shutil
from collections import defaultdict
from datetime import datetime

import pytest
import torch

import mamoRec
from configs import PRESETS
from data_prep.task_io import load_processed
from models import MAMO, MEM_WEIGHT
from tests.conftest import ON_GLIBC, run_config
from utils import SCENARIOS, SUBSETS, evaluation_table, seed_everything

pytestmark = pytest.mark.slow
METHODS = ["mamo", "train_mean", "support_mean", "no_memory", "no_memory_frozen"]
TRAINED = ["mamo", "no_memory", "no_memory_frozen"]


def read_json(path):
    return json.loads(path.read_text())


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_run_writes_every_output_into_its_own_folder(finished_run):
    run_dir = finished_run.run_dir
    assert finished_run.exit_code == 0
    assert re.fullmatch(r"\d{8}T\d{6}Z-seed5", run_dir.name)
    assert {path.name for path in run_dir.iterdir()} == {
        "config.json", "metrics.json", "epochs.csv", "predictions.csv", "inference.json", "checkpoint.pt",
        "no_memory", "no_memory_frozen"}
    metrics = read_json(run_dir / "metrics.json")
    assert list(metrics["results"]) == METHODS
    for table in metrics["results"].values():
        assert set(table) == set(SUBSETS) and table["all"]["n_ratings"] == 5 * table["all"]["n_users"] > 0
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert all(list(row["train_loss"]) == TRAINED and list(row["results"]) == METHODS for row in metrics["epochs"])
    assert set(metrics["train_seconds"]) == set(TRAINED) and min(metrics["train_seconds"].values()) > 0


def test_config_and_metrics_record_the_provenance(finished_run):
    saved = read_json(finished_run.run_dir / "config.json")
    metrics = read_json(finished_run.run_dir / "metrics.json")
    assert saved["config"]["seed"] == 5 and saved["config"]["n_epoch"] == 2
    assert saved["provenance"] == metrics["provenance"] and metrics["config"] == saved["config"]
    assert saved["provenance"]["data_checksum"] == finished_run.data_checksum
    (session,) = saved["provenance"]["sessions"]
    assert session["device"] == "cpu" and session["torch_threads"] == torch.get_num_threads()
    assert session["torch"] == torch.__version__ and session["resumed"] is False
    assert {"numpy", "python", "platform", "git_commit", "git_dirty"} <= set(session)
    assert session["heap_top_pad_bytes"] == (64 << 20 if ON_GLIBC else 0)
    started, ended = (datetime.fromisoformat(session[key]) for key in ("started_utc", "ended_utc"))
    assert started.utcoffset().total_seconds() == 0 and started <= ended


def test_console_prints_one_line_per_epoch_no_progress_bars_and_ends_with_the_run_folder(finished_run):
    epoch_lines = [line for line in finished_run.stderr.splitlines()
                   if " epoch " in line and not line.startswith("warning:")]
    assert len(epoch_lines) == 2 * len(TRAINED)
    assert re.fullmatch(r"mamo epoch 1/2: loss \d\.\d{4}, MAE \d\.\d{4}, RMSE \d\.\d{4}, NDCG@3 \d\.\d{4} .*",
                        epoch_lines[0])
    assert "\r" not in finished_run.stderr and "it/s" not in finished_run.stderr  # stderr is not a terminal
    assert finished_run.stdout.splitlines()[-1] == f"run folder: {mamoRec.Path('runs/synthetic') / finished_run.run_dir.name}"


def test_predictions_csv_recomputes_metrics_json_exactly(finished_run, synthetic_dir):
    rows = read_csv(finished_run.run_dir / "predictions.csv")
    assert list(rows[0]) == list(mamoRec.PREDICTION_COLUMNS)
    manifest, tasks = load_processed(synthetic_dir)
    n_test = len(manifest["split"]["test"])
    assert len(rows) == len(METHODS) * n_test * 5
    truth = {(task["user_id"], item): (SCENARIOS[scenario], rating) for task in tasks.values()
             for item, scenario, rating in zip(task["query"]["item_ids"], task["query"]["scenarios"],
                                               task["query"]["ratings"]) if task["split"] == "test"}
    by_method = defaultdict(list)
    for row in rows:
        key = (int(row["user_id"]), int(row["item_id"]))
        assert (row["scenario"], int(row["rating"])) == truth[key]  # raw ids, the query rows' own scenario codes
        by_method[row["method"]].append(row)
    results = read_json(finished_run.run_dir / "metrics.json")["results"]
    assert list(by_method) == METHODS
    for method, method_rows in by_method.items():
        assert len({(row["user_id"], row["item_id"]) for row in method_rows}) == n_test * 5
        table = evaluation_table(
            user_ids=[int(row["user_id"]) for row in method_rows],
            scenarios=[SCENARIOS.index(row["scenario"]) for row in method_rows],
            true_ratings=[float(row["rating"]) for row in method_rows],
            predicted_ratings=[float(row["prediction"]) for row in method_rows],
            ranking_scores=[float(row["ranking_score"]) for row in method_rows])
        assert table == results[method], method


def test_epochs_csv_gives_each_method_its_own_train_loss(finished_run):
    rows = read_csv(finished_run.run_dir / "epochs.csv")
    assert [(row["epoch"], row["method"]) for row in rows] == [(str(e), m) for e in (1, 2) for m in METHODS]
    for method in TRAINED:
        own = torch.load(mamoRec.method_dir(finished_run.run_dir, method) / "checkpoint.pt", weights_only=True)
        losses = [float(row["train_loss"]) for row in rows if row["method"] == method]
        assert losses == [epoch["train_loss"] for epoch in own["epochs"]], method
    assert all(row["train_loss"] == "" for row in rows if row["method"] in ("train_mean", "support_mean"))
    mamo = [row["train_loss"] for row in rows if row["method"] == "mamo"]
    assert mamo != [row["train_loss"] for row in rows if row["method"] == "no_memory"]


def test_memory_diagnostics_are_recorded_for_mamo_after_every_epoch(finished_run):
    metrics = read_json(finished_run.run_dir / "metrics.json")
    assert all(list(row["memory"]) == ["mamo"] for row in metrics["epochs"])
    rows = read_csv(finished_run.run_dir / "epochs.csv")
    for row in rows:
        if row["method"] != "mamo":
            assert all(value == "" for name, value in row.items() if name.startswith("memory_"))
            continue
        memory = metrics["epochs"][int(row["epoch"]) - 1]["memory"]["mamo"]
        assert float(row["memory_attention_spread"]) == memory["attention_spread"]
        assert [float(row[f"memory_slot_usage_{k + 1}"]) for k in range(3)] == memory["slot_usage"]
        assert float(row["memory_task_read_norm"]) == memory["task_read_norm"] > 0
    collapsed = [row["epoch"] for row in metrics["epochs"] if row["memory"]["mamo"]["attention_spread"] < 1e-3]
    warnings = [line for line in finished_run.stderr.splitlines() if line.startswith("warning:")]
    assert collapsed and len(warnings) == 1  # the published memories collapse here too (docs/results.md)
    assert warnings[0].startswith(f"warning: mamo epoch {collapsed[0]}: the memory attention has collapsed")


def test_ablations_have_no_memories_and_the_frozen_one_keeps_its_initial_mem_layer(finished_run, synthetic_dir):
    cfg = read_json(finished_run.run_dir / "config.json")["config"]
    manifest, _ = load_processed(synthetic_dir)
    states = {method: torch.load(mamoRec.method_dir(finished_run.run_dir, method) / "checkpoint.pt",
                                 weights_only=True) for method in TRAINED}
    assert states["mamo"]["model"]["memories.task"] is not None
    for method in ("no_memory", "no_memory_frozen"):
        assert not any(key.startswith("memories.") for key in states[method]["model"])
        assert not states[method]["config"]["feature_memory"] and not states[method]["config"]["task_memory"]
    initial = MAMO(manifest["features"], manifest["n_rating_classes"], manifest["rating_min"],
                   mamoRec.method_config(cfg, "no_memory_frozen"), seed_everything(cfg["seed"]))  # as MAMRec
    key = f"theta_net.{MEM_WEIGHT}"
    assert torch.equal(states["no_memory_frozen"]["model"][key], initial.state_dict()[key])
    assert not torch.equal(states["no_memory"]["model"][key], initial.state_dict()[key])
    other = f"theta_net.{MEM_WEIGHT.replace('weight', 'bias')}"
    assert not torch.equal(states["no_memory_frozen"]["model"][other], initial.state_dict()[other])


def test_same_seed_same_numbers_and_other_seed_differs(synthetic_dir, tmp_path):
    def run(seed, name):
        return mamoRec.run(run_config(data_dir=str(synthetic_dir), run_dir=str(tmp_path / name), seed=seed,
                                      ablation=False))
    first, second, third = run(7, "a"), run(7, "b"), run(8, "c")
    assert first["results"] == second["results"] and first["epochs"] == second["epochs"]
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
    assert first["results"]["mamo"] != third["results"]["mamo"]


def test_extend_interrupt_and_resume_give_the_uninterrupted_numbers(finished_run, synthetic_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """A 1-epoch run, extended to 2 epochs and interrupted inside the no_memory ablation's second
    epoch, then resumed: the same numbers as the uninterrupted 2-epoch run."""
    monkeypatch.setattr(mamoRec, "config_settings", run_config())
    run_dir = tmp_path / "cut"
    flags = ["--data-dir", str(synthetic_dir), "--seed", "5", "--quiet"]
    assert mamoRec.main([*flags, "--run-dir", str(run_dir), "--epochs", "1"]) == 0
    original = mamoRec.MAMRec.train_epoch

    def interrupted_in_no_memory(self, epoch):
        if self.method == "no_memory" and epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(mamoRec.MAMRec, "train_epoch", interrupted_in_no_memory)
    capsys.readouterr()
    assert mamoRec.main(["--resume", str(run_dir), "--epochs", "2"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"interrupted; continue with: python mamoRec.py --resume {run_dir}"
    assert "Traceback" not in err
    monkeypatch.setattr(mamoRec.MAMRec, "train_epoch", original)
    assert mamoRec.main(["--resume", str(run_dir)]) == 0
    resumed, uninterrupted = (read_json(path / "metrics.json") for path in (run_dir, finished_run.run_dir))
    assert resumed["results"] == uninterrupted["results"]
    assert [row["train_loss"] for row in resumed["epochs"]] == [row["train_loss"] for row in uninterrupted["epochs"]]
    assert (run_dir / "predictions.csv").read_bytes() == (finished_run.run_dir / "predictions.csv").read_bytes()
    sessions = resumed["provenance"]["sessions"]
    assert [session["resumed"] for session in sessions] == [False, True, True]
    assert sessions[1]["ended_utc"] is None and sessions[2]["ended_utc"] is not None


def test_overwrite_replaces_an_earlier_run(synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = run_config(data_dir=str(synthetic_dir), run_dir=str(run_dir), n_epoch=1, ablation=False)
    mamoRec.run(cfg)
    (run_dir / "notes.txt").write_text("from the earlier run")
    metrics = mamoRec.run(dict(cfg, seed=9), overwrite=True)
    assert not (run_dir / "notes.txt").exists() and metrics["config"]["seed"] == 9
    assert read_json(run_dir / "config.json")["config"]["seed"] == 9


def test_command_line_flags_override_the_config():
    args = mamoRec.parse_args(["--dataset", "synthetic", "--epochs", "5", "--seed", "3", "--device", "cpu",
                               "--no-ablation", "--no-download"])
    cfg = mamoRec.build_config(args)
    assert (cfg["dataset"], cfg["n_epoch"], cfg["seed"], cfg["device"]) == ("synthetic", 5, 3, "cpu")
    assert cfg["ablation"] is False and cfg["download"] is False
    defaults = mamoRec.build_config(mamoRec.parse_args([]))
    assert defaults["ablation"] is True and defaults["download"] is True
    assert defaults["run_dir"] == "runs/{dataset}/{timestamp}-seed{seed}"


def test_a_preset_sets_its_settings_and_nothing_else():
    cfg = mamoRec.build_config(mamoRec.parse_args(["--preset", "best_departures", "--seed", "3"]))
    assert {key: cfg[key] for key in PRESETS["best_departures"]} == PRESETS["best_departures"]
    assert cfg["attention_temperature"] == 0.05 and cfg["seed"] == 3
    assert {key: cfg[key] for key, value in cfg.items() if key not in PRESETS["best_departures"]} == {
        key: value for key, value in mamoRec.build_config(mamoRec.parse_args(["--seed", "3"])).items()
        if key not in PRESETS["best_departures"]}
    with pytest.raises(SystemExit):
        mamoRec.parse_args(["--preset", "no_such_preset"])


def test_copied_run_folder_still_resumes(finished_run, synthetic_dir, tmp_path, monkeypatch):
    """A finished run resumed with nothing left to train rewrites the same numbers; its data folder
    was deleted, another folder with the same data passes the checksum."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, run_dir)
    saved = read_json(run_dir / "config.json")
    saved["config"]["data_dir"] = str(synthetic_dir)
    (run_dir / "config.json").write_text(json.dumps(saved))
    before = read_json(run_dir / "metrics.json")
    monkeypatch.setattr(mamoRec, "config_settings", run_config())
    assert mamoRec.main(["--resume", str(run_dir)]) == 0
    assert read_json(run_dir / "metrics.json")["results"] == before["results"]
