"""Bad flags, run folders, resumes and checkpoints: one line on stderr, exit status 2, nothing
written (mamoRec.main). No test here reaches the network: base URLs point at a local port."""
import ast
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import mamoRec
from tests.conftest import ROOT, run_config

DEAD_URL = "http://127.0.0.1:9/"  # the discard port: connection refused


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """configs.py shrunk for tests, and every download base URL at a port that refuses connections."""
    monkeypatch.setattr(mamoRec, "config_settings", run_config())
    for variable in ("MAMO_GROUPLENS_BASE_URL", "MAMO_MELU_BASE_URL", "MAMO_BOOKCROSSING_BASE_URL"):
        monkeypatch.setenv(variable, DEAD_URL)


def snapshot(folder):
    """{relative path: bytes} of every file under folder ({} when it does not exist)."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def refused(argv, capsys, *fragments):
    """main(argv) exits 2 with one line 'error: ...' holding every fragment; returns that line."""
    capsys.readouterr()
    assert mamoRec.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    for fragment in fragments:
        assert fragment in err[-1], (fragment, err[-1])
    return err[-1]


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run (its data folder no longer exists)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    return run_dir


@pytest.mark.parametrize("flags, fragment", [
    (["--epochs", "0"], "--epochs (n_epoch) must be an integer >= 1, got 0"),
    (["--epochs", "-2"], "--epochs (n_epoch) must be an integer >= 1, got -2"),
    (["--users-per-step", "0"], "--users-per-step (users_per_step) must be an integer >= 1, got 0"),
])
def test_bad_numbers_are_refused_before_anything_is_written(synthetic_dir, flags, fragment, tmp_path, capsys):
    refused(["--data-dir", str(synthetic_dir), "--run-dir", str(tmp_path / "run"), *flags], capsys, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(synthetic_dir, tmp_path, capsys):
    refused(["--data-dir", str(synthetic_dir), "--run-dir", str(tmp_path / "run"), "--device", "cuda"], capsys,
            "--device", "torch.cuda.is_available() is False")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_graphs_without_a_gpu_are_refused(synthetic_dir, tmp_path, capsys):
    refused(["--data-dir", str(synthetic_dir), "--run-dir", str(tmp_path / "run"), "--compile", "cuda-graphs"], capsys,
            "compile='cuda-graphs' needs the batched engine on a CUDA device")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_run_dir_is_refused(synthetic_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    refused(["--data-dir", str(synthetic_dir), "--run-dir", str(tmp_path / "a_file" / "run")], capsys,
            "cannot be created", "a_file is not a writable folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.slow  # uses the finished run
def test_a_run_folder_that_holds_files_is_left_byte_identical(synthetic_dir, run_copy, capsys):
    before = snapshot(run_copy)
    refused(["--data-dir", str(synthetic_dir), "--run-dir", str(run_copy)], capsys,
            "already holds files", f"--resume {run_copy}", "--overwrite")
    assert snapshot(run_copy) == before


def test_overwrite_only_replaces_a_run_folder(synthetic_dir, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    refused(["--data-dir", str(synthetic_dir), "--run-dir", str(notes), "--overwrite"], capsys,
            "no config.json", "--overwrite only replaces a run's folder")
    assert snapshot(notes) == {"thesis.tex": b"precious"}


@pytest.mark.parametrize("make", ["missing", "empty", "other files", "bad json", "old format"])
def test_resume_of_a_folder_without_a_run(make, tmp_path, capsys):
    folder = tmp_path / "run"
    if make != "missing":
        folder.mkdir()
    if make == "other files":
        (folder / "notes.txt").write_text("x")
    if make == "bad json":
        (folder / "config.json").write_text("{not json")
    if make == "old format":
        (folder / "config.json").write_text(json.dumps(run_config()))
    before = snapshot(folder)
    message = refused(["--resume", str(folder)], capsys)
    expected = {"missing": "holds no run (no config.json)", "empty": "holds no run (no config.json)",
                "other files": "holds no run (no config.json)", "bad json": "not valid JSON",
                "old format": "not a run's config.json"}[make]
    assert expected in message
    assert snapshot(folder) == before


@pytest.mark.slow  # uses the finished run
def test_resume_refuses_flags_that_change_results_naming_them(run_copy, capsys):
    before = snapshot(run_copy)
    message = refused(["--resume", str(run_copy), "--seed", "9", "--users-per-step", "8", "--device", "cpu"], capsys,
                      "--seed 9 (the run has seed=5)", "--users-per-step 8 (the run has users_per_step=16)")
    assert "--device" not in message.split("refused:")[1].split(".")[0]
    refused(["--resume", str(run_copy), "--no-ablation"], capsys, "--no-ablation (the run has ablation=True)")
    refused(["--resume", str(run_copy), "--preset", "best_departures"], capsys,
            "--preset best_departures (the run has attention_temperature=1.0)")
    refused(["--resume", str(run_copy), "--data-dir", "elsewhere"], capsys, "--data-dir elsewhere (the run has data_dir=")
    refused(["--resume", str(run_copy), "--run-dir", "elsewhere"], capsys, "--run-dir elsewhere (resuming")
    refused(["--resume", str(run_copy), "--epochs", "1"], capsys, "would shorten", "can only extend")
    refused(["--resume", str(run_copy), "--overwrite"], capsys, "--overwrite cannot be combined with --resume")
    assert snapshot(run_copy) == before


def point_at_data(run_dir, data_dir):
    """Edit the run's config.json to use another data folder (as after moving the data)."""
    saved = json.loads((run_dir / "config.json").read_text())
    saved["config"]["data_dir"] = str(data_dir)
    (run_dir / "config.json").write_text(json.dumps(saved))


@pytest.mark.slow  # uses the finished run
@pytest.mark.parametrize("checkpoints, message", [
    (True, "differs from the run's data"),  # each checkpoint's own check
    (False, "differs from the data of run"),  # stopped before its first checkpoint: config.json's check
])
def test_resume_refuses_changed_data(checkpoints, message, run_copy, synthetic_dir, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(synthetic_dir, changed)
    task_file = sorted((changed / "tasks").glob("*.pkl"))[0]
    task = pickle.loads(task_file.read_bytes())
    task["support"]["ratings"][0] = 1 + task["support"]["ratings"][0] % 5
    task_file.write_bytes(pickle.dumps(task, protocol=4))
    point_at_data(run_copy, changed)
    if not checkpoints:
        for path in run_copy.rglob("checkpoint.pt"):
            path.unlink()
    before = snapshot(run_copy)
    refused(["--resume", str(run_copy)], capsys, message)
    assert snapshot(run_copy) == before


class Payload:
    """Unpickling this runs `Path(target).touch()`: what a crafted checkpoint would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return Path.touch, (Path(self.target),)


@pytest.mark.slow  # uses the finished run
@pytest.mark.parametrize("damage", ["truncated", "crafted torch.save", "crafted pickle", "empty", "foreign dict"])
def test_damaged_or_crafted_checkpoint_runs_nothing_and_changes_nothing(damage, run_copy, synthetic_dir,
                                                                         tmp_path, capsys):
    point_at_data(run_copy, synthetic_dir)
    checkpoint = run_copy / "no_memory" / "checkpoint.pt"
    marker = tmp_path / "payload_ran"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif damage == "crafted torch.save":
        torch.save({"epoch": Payload(marker)}, checkpoint)
    elif damage == "crafted pickle":
        checkpoint.write_bytes(pickle.dumps(Payload(marker)))
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    else:
        torch.save({"model": {}}, checkpoint)
    before = snapshot(run_copy)
    message = refused(["--resume", str(run_copy)], capsys, str(checkpoint))
    expected = {"truncated": "truncated or damaged", "crafted torch.save": "it asks to load getattr",
                "crafted pickle": "it holds more than tensors and plain data", "empty": "truncated or damaged",
                "foreign dict": "not a MAMO checkpoint (missing epoch"}[damage]
    assert expected in message and "weights_only" not in message
    assert not marker.exists()
    assert snapshot(run_copy) == before


@pytest.mark.slow  # uses the finished run
def test_checkpoint_of_other_settings_is_refused(run_copy, synthetic_dir, capsys):
    point_at_data(run_copy, synthetic_dir)
    state = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    state["config"]["seed"] = 6
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (run_copy / "checkpoint.pt").write_bytes(buffer.getvalue())
    before = snapshot(run_copy)
    refused(["--resume", str(run_copy)], capsys, "made with other settings than config.json (differing: seed)")
    assert snapshot(run_copy) == before


@pytest.mark.slow  # uses the finished run
def test_checkpoints_hold_only_tensors_and_plain_data(finished_run):
    for method in ("mamo", "no_memory", "no_memory_frozen"):
        state = torch.load(mamoRec.method_dir(finished_run.run_dir, method) / "checkpoint.pt", weights_only=True)
        assert set(state) == set(mamoRec.CHECKPOINT_KEYS)
        assert set(state["rng"]) == {"torch"}


def test_the_project_loads_checkpoints_only_with_weights_only_true():
    """Every torch.load call in the project's Python files (bench and tests included) passes
    weights_only=True."""
    calls = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((path.name, node.lineno, safe))
    assert calls and all(safe for _, _, safe in calls), calls


def test_missing_raw_files_without_download_is_one_line(tmp_path, capsys):
    message = refused(["--dataset", "movielens", "--data-dir", str(tmp_path / "p"), "--raw-dir", str(tmp_path / "raw"),
                       "--run-dir", str(tmp_path / "run"), "--no-download"], capsys, "missing raw files", "ratings.dat")
    assert "--download" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


def test_missing_raw_files_are_downloaded_by_default(tmp_path, capsys, server, monkeypatch):
    """The default run downloads: a local server holds a wrong ml-1m.zip, and the md5 check
    refuses it (the download was tried); nothing reaches the network."""
    site, url = server
    with zipfile.ZipFile(site / "ml-1m.zip", "w") as archive:
        archive.writestr("ml-1m/ratings.dat", "1::1::5::1\n")
    monkeypatch.setenv("MAMO_GROUPLENS_BASE_URL", url)
    refused(["--dataset", "movielens", "--data-dir", str(tmp_path / "p"), "--raw-dir", str(tmp_path / "raw"),
             "--run-dir", str(tmp_path / "run")], capsys, f"{url}ml-1m.zip: md5")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_before_the_run_folder_exists_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(mamoRec, "prepared_tasks", interrupted)
    assert mamoRec.main(["--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted before the run folder was written; nothing to resume"
    assert list(tmp_path.iterdir()) == []
