"""bench/memory_study.py: the statistics by hand, the grid's models, resuming, the cell locks, the
tables without matplotlib, and a tiny end-to-end grid (slow)."""
import builtins
import json
import math
import os
import subprocess
import sys

import pytest

from bench import memory_study
from configs import PRESETS
from bench.memory_study import CellLock, cell_path, grid_models, model_overrides, paired_difference, paired_text
from tests.data_helpers import ROOT, random_ratings, write_ml1m


def test_paired_difference_by_hand():
    model = {1: 0.90, 2: 0.80, 3: 0.85, 4: 0.70}
    baseline = {1: 0.95, 2: 0.80, 3: 0.90}  # seed 4 has no baseline: left out
    # differences -0.05, 0, -0.05: mean -1/30, deviations (-1/60, 1/30, -1/60), sd = sqrt((6/3600) / 2)
    lower = paired_difference(model, baseline, lower_is_better=True)
    assert lower["n"] == 3 and lower["mean"] == pytest.approx(-1 / 30)
    assert lower["sd"] == pytest.approx(math.sqrt(6 / 3600 / 2))
    assert lower["t"] == pytest.approx(-2.0)  # -1/30 / (sd / sqrt(3)) = -1/30 / (1/60)
    assert lower["better"] == 2  # the tie on seed 2 is not better
    assert paired_difference(model, baseline, lower_is_better=False)["better"] == 0
    assert lower["measurable"]  # |mean| 0.0333 > sd 0.0289
    assert paired_text(lower) == "**-0.0333 ± 0.0289** (t -2.0, 2/3)"


def test_a_difference_within_its_spread_is_not_measurable():
    """Ahead on most seeds but |mean| below the sd of the differences: no measurable difference."""
    # differences -0.02, -0.02, -0.02, +0.05: mean -0.0025, sd 0.035 (by hand: deviations -0.0175 x3, +0.0525)
    stats = paired_difference({1: 0.88, 2: 0.88, 3: 0.88, 4: 0.95}, {1: 0.90, 2: 0.90, 3: 0.90, 4: 0.90}, True)
    assert stats["better"] == 3 and stats["mean"] == pytest.approx(-0.0025) and stats["sd"] == pytest.approx(0.035)
    assert stats["measurable"] is False and not paired_text(stats).startswith("**")


def test_paired_difference_edge_cases():
    assert paired_difference({1: 1.0}, {2: 1.0}, True) is None
    one = paired_difference({1: 1.0}, {1: 0.5}, True)
    assert one["t"] is None and one["sd"] == 0.0 and one["better"] == 0
    assert one["measurable"] is None  # one seed has no spread
    constant = paired_difference({1: 1.0, 2: 2.0}, {1: 0.5, 2: 1.5}, False)
    assert constant["t"] == math.inf and constant["better"] == 2 and constant["measurable"]


def test_memory_free_models_are_shared_unless_a_variant_changes_them():
    assert grid_models(["mamo", "temperature_0.05", "best_departures"]) == [
        "mamo", "temperature_0.05", "best_departures", "no_memory", "no_memory_frozen"]
    assert grid_models(["clip_query_grad_5"]) == [
        "clip_query_grad_5", "no_memory[clip_query_grad=5.0]", "no_memory_frozen[clip_query_grad=5.0]"]
    assert model_overrides("no_memory_frozen[clip_query_grad=5.0]") == {
        "clip_query_grad": 5.0, "feature_memory": False, "task_memory": False, "freeze_mem_layer": True}
    assert model_overrides("best_departures") == {"attention_temperature": 0.05, "task_memory_write": "increment",
                                                  "task_memory_init": "phi"}
    assert memory_study.comparisons("phi_init") == {"no_memory": "no_memory", "no_memory_frozen": "no_memory_frozen",
                                                    "mamo": "mamo"}
    assert memory_study.comparisons("clip_query_grad_5") == {
        "no_memory": "no_memory[clip_query_grad=5.0]", "no_memory_frozen": "no_memory_frozen[clip_query_grad=5.0]",
        "mamo": "mamo"}
    assert memory_study.comparisons("mamo") == {"no_memory": "no_memory", "no_memory_frozen": "no_memory_frozen"}
    assert list(memory_study.comparisons("best_departures")) == ["no_memory", "no_memory_frozen", "mamo",
                                                                 "increment_phi"]
    assert memory_study.comparisons("no_memory") == {}
    with pytest.raises(ValueError, match="unknown model"):
        model_overrides("no_memory[alpha=1]")


class FakeData:
    name = "fake"


@pytest.fixture
def recorded_cells(monkeypatch):
    """run_cell replaced by a recorder: [(model, seed)] of the cells run."""
    calls = []

    def fake_run_cell(data, model, seed, epochs, scratch):
        calls.append((model, seed))
        return {"results": {"all": {"mae": 1.0}}, "wall_seconds": 0.0}

    monkeypatch.setattr(memory_study, "run_cell", fake_run_cell)
    return calls


def test_type_separation_by_hand():
    assert memory_study.type_separation({"0": [0.5, 0.5, 0.0], "1": [0.5, 0.5, 0.0]}) == 0.0
    # types 0 and 2 differ most: |0.9 - 0.1| + |0.1 - 0.8| + |0 - 0.1| = 1.6, half of it 0.8
    assert memory_study.type_separation({"0": [0.9, 0.1, 0.0], "1": [0.5, 0.5, 0.0],
                                         "2": [0.1, 0.8, 0.1]}) == pytest.approx(0.8)


def test_finished_cells_are_not_run_again(tmp_path, recorded_cells):
    done = cell_path(tmp_path, "fake", "mamo", 2)
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    ran = memory_study.run_grid([FakeData()], ["mamo"], [1, 2, 3], 1, tmp_path, tmp_path, log=lambda line: None)
    assert recorded_cells == [("mamo", 1), ("mamo", 3)] and len(ran) == 2
    assert done.read_text() == "{}"
    assert json.loads(cell_path(tmp_path, "fake", "mamo", 3).read_text())["results"]["all"]["mae"] == 1.0
    assert not list(tmp_path.rglob("*.lock"))  # locks are removed once the cell is written
    assert memory_study.run_grid([FakeData()], ["mamo"], [1, 2, 3], 1, tmp_path, tmp_path, lambda line: None) == []


def test_a_held_lock_is_skipped_and_a_stale_one_taken(tmp_path, recorded_cells):
    held = CellLock(cell_path(tmp_path, "fake", "mamo", 1))
    assert held.acquire()
    assert not CellLock(cell_path(tmp_path, "fake", "mamo", 1)).acquire()  # another open file: the flock is taken
    stale = CellLock(cell_path(tmp_path, "fake", "mamo", 2)).path
    stale.write_text("otherhost 4242 0\n")  # its process died: nobody holds a flock on it
    lines = []
    memory_study.run_grid([FakeData()], ["mamo"], [1, 2], 1, tmp_path, tmp_path, log=lines.append)
    assert recorded_cells == [("mamo", 2)]
    assert lines[0] == "fake/mamo/seed1: held by another process, skipped"
    assert not cell_path(tmp_path, "fake", "mamo", 1).exists() and not stale.exists()
    held.release()
    assert not held.path.exists()


def test_a_lock_being_created_is_not_taken(tmp_path):
    """An empty lock file is one another process has just created and not yet written: held."""
    lock = CellLock(cell_path(tmp_path, "fake", "mamo", 1))
    lock.path.parent.mkdir(parents=True)
    lock.path.touch()
    assert not lock.acquire() and lock.path.exists()
    old = lock.path.stat().st_mtime - 2 * memory_study.STALE_CREATING_SECONDS
    os.utime(lock.path, (old, old))  # left empty long ago: its creator died
    assert lock.acquire()
    lock.release()


def fake_study_cells(out):
    """Two seeds of mamo and no_memory on one dataset, written as cells, and its dataset record."""
    table = {subset: {"mae": None, "rmse": None, "ndcg@3": None} for subset in memory_study.SUBSETS}
    memory = {"attention_max_mean": 0.4, "attention_spread": 0.01, "slot_usage": [0.3, 0.3, 0.4],
              "profile_slot_spread": 1.0, "task_slot_spread": 1.0, "task_read_norm": 2.0,
              "phi_mem_weight_norm": 4.0, "task_read_ratio": 0.5, "bias_term_ratio": 0.01}
    for model, mae in (("mamo", 0.9), ("no_memory", 1.0)):
        for seed in (1, 2):
            results = {**table, "all": {"mae": mae + seed / 100, "rmse": 1.0, "ndcg@3": 0.5}}
            record = {"dataset": "fake", "model": model, "seed": seed, "n_epoch": 1, "threads": 1,
                      "data_checksum": "x", "results": results, "train_seconds": 1.0, "wall_seconds": 2.0,
                      "phi_mem_weight_norm": 3.0, "memory_at_start": memory if model == "mamo" else None,
                      "critical_temperature": {"start": 0.25, "end": 0.2 + seed / 100},
                      "epochs": [{"epoch": 1, "memory": memory if model == "mamo" else None}]}
            path = cell_path(out, "fake", model, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
    (out / "datasets").mkdir()
    (out / "datasets" / "fake.json").write_text(json.dumps({
        "dataset": "fake", "n_train_users": 8, "n_test_users": 2,
        "references": {name: {**table, "all": {"mae": 1.1, "rmse": 1.2, "ndcg@3": 0.4}}
                       for name in memory_study.REFERENCES}}))


def test_tables_and_json_without_matplotlib(tmp_path, monkeypatch):
    fake_study_cells(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    lines = []
    study = memory_study.write_study(tmp_path, 1, 1, figures=True, log=lines.append)
    assert lines == ["matplotlib is not installed: no figures (pip install -r requirements-extra.txt)"]
    assert not list(tmp_path.glob("*.png"))
    paired = study["summary"]["fake"]["mamo"]["paired"]["no_memory"]["all"]["mae"]
    assert paired["mean"] == pytest.approx(-0.1) and paired["better"] == 2 and paired["n"] == 2
    assert json.loads((tmp_path / "study.json").read_text())["summary"]["fake"]["mamo"]["seeds"] == [1, 2]
    markdown = (tmp_path / "study.md").read_text()
    assert "| mamo | 2 | 0.9150 ± 0.0071 | 1.0000 ± 0.0000 | 0.5000 ± 0.0000 |" in markdown
    assert "| mamo | no_memory | **-0.1000 ± 0.0000** (t -inf, 2/2) |" in markdown  # bold: measurable
    assert "| support_mean | - | 1.1000 | 1.2000 | 0.4000 |" in markdown
    assert "| mamo | attention_spread | 0.01, 0.01 |" in markdown  # before training and after epoch 1
    assert "| no_memory | 0.250 ± 0.000 | 0.215 ± 0.007 | 3.00 ± 0.00 |" in markdown
    assert study["summary"]["fake"]["no_memory"]["memory_by_epoch"] is None


def test_figures_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    fake_study_cells(tmp_path)
    memory_study.write_study(tmp_path, 1, 1, figures=True, log=lambda line: None)
    pngs = sorted(path.name for path in tmp_path.glob("*.png"))
    assert pngs == ["fake_memory_over_epochs.png", "fake_scenarios.png"]
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in pngs)


def test_training_and_the_study_module_do_not_import_matplotlib():
    """matplotlib is an optional extra: only write_figures imports it."""
    code = "import sys, mamoRec, bench.memory_study; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.slow
def test_tiny_grid_end_to_end_agrees_with_mamoRec_and_resumes(tmp_path, capsys):
    """Planted types (150 users) and a fake MovieLens-1M folder, 2 variants, 2 seeds, 1 epoch."""
    import mamoRec

    ml1m = write_ml1m(tmp_path / "ml1m", random_ratings(range(1, 41), range(1, 31), seed=3))
    flags = ["--datasets", "planted", "ml1m", "--ml1m-raw", str(ml1m), "--planted-users", "150",
             "--variants", "mamo", "best_departures", "--seeds", "1", "2", "--epochs", "1", "--out",
             str(tmp_path / "out"), "--data-root", str(tmp_path / "data"), "--scratch", str(tmp_path / "scratch"),
             "--no-figures"]
    memory_study.main(flags)
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    assert set(study["summary"]) == {"planted", "ml1m"}
    for per_model in study["summary"].values():
        assert list(per_model) == ["mamo", "best_departures", "no_memory", "no_memory_frozen"]
        assert per_model["best_departures"]["paired"]["no_memory_frozen"]["all"]["mae"]["n"] == 2
    assert set(study["per_seed"]["ml1m/no_memory"]) == {"1", "2"}
    cell = json.loads(cell_path(tmp_path / "out", "planted", "mamo", 1).read_text())
    assert cell["epochs"][0]["memory"]["attention_spread"] >= 0 and cell["memory_at_start"] is not None
    assert set(cell["attention_by_type"]) <= {"0", "1", "2", "3"} and cell["critical_temperature"]["start"] > 0
    best = json.loads(cell_path(tmp_path / "out", "planted", "best_departures", 1).read_text())
    assert best["overrides"] == PRESETS["best_departures"] and best["results"] != cell["results"]
    assert best["epochs"][0]["memory"]["task_read_ratio"] == pytest.approx(1.0, abs=0.1)  # starts at phi's weight
    # a cell is what mamoRec.run gives for the same settings and seed
    data_dir = study["datasets"]["planted"]["data_dir"]
    run = mamoRec.run(dict(mamoRec.config_settings, dataset="synthetic-types", data_dir=data_dir, seed=1, n_epoch=1,
                           device="cpu", ablation=False, run_dir=str(tmp_path / "run")))
    assert run["results"]["mamo"] == cell["results"]
    capsys.readouterr()
    memory_study.main(flags)
    assert "0 cells run; 16 in" in capsys.readouterr().err
