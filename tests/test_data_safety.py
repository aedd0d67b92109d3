"""Safe data: raw data never overwritten by the generators, stale work folders removed, folder
permissions from the umask, prepared folders used only with their own settings, the data checksum."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest

import data_prep.prepare_data as prepare_data
from configs import config_settings
from data_prep.prepare_data import (WORK_MARKER, ensure_prepared, main, prepare, protocol_from_config,
                                    settings_dir)
from data_prep.protocol import DEFAULT_PROTOCOL
from data_prep.raw_io import DataError
from data_prep.synthetic import GENERATED_MARKER, write_synthetic_bookcrossing, write_synthetic_movielens
from data_prep.synthetic_types import write_synthetic_types
from data_prep.task_io import data_checksum, load_processed
from tests.data_helpers import ROOT, folder_bytes, write_ml1m

# Users 1..6 rate items 10..13 at 1000u + k; with support 2 + query 1, every user is kept.
RATINGS = [(u, 10 + k, 1 + (u + k) % 5, 1000 * u + k) for u in range(1, 7) for k in range(4)]
TINY = {"support_size": 2, "query_size": 1}


def quiet(message):
    pass


# --- the synthetic generators never overwrite raw data they did not write ------------------------

GENERATORS = [("synthetic", write_synthetic_movielens, "users.dat"),
              ("synthetic-types", write_synthetic_types, "users.dat"),
              ("synthetic-bookcrossing", write_synthetic_bookcrossing, "BX-Users.csv")]


@pytest.mark.parametrize("dataset, writer, name", GENERATORS, ids=[g[0] for g in GENERATORS])
def test_generator_refuses_a_folder_with_files_it_did_not_write(tmp_path, dataset, writer, name):
    raw = write_ml1m(tmp_path / "raw", RATINGS)  # real-looking files, no marker
    before = folder_bytes(raw)
    with pytest.raises(DataError, match="holds files the synthetic generator did not write"):
        prepare(dataset, raw, tmp_path / "out", n_users=20, log=quiet)
    with pytest.raises(DataError, match="holds files the synthetic generator did not write"):
        writer(raw, n_users=20)
    assert folder_bytes(raw) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset, writer, name", GENERATORS, ids=[g[0] for g in GENERATORS])
def test_generator_rewrites_its_own_folder_but_not_a_changed_or_added_file(tmp_path, dataset, writer, name):
    raw = tmp_path / "raw"
    writer(raw, n_users=20, seed=1)
    marker = json.loads((raw / GENERATED_MARKER).read_text())
    assert marker["settings"] == {"dataset": dataset, "n_users": 20, "seed": 1}
    assert marker["files"][name] == hashlib.md5((raw / name).read_bytes()).hexdigest()
    writer(raw, n_users=20, seed=2)  # its own files: replaced
    assert json.loads((raw / GENERATED_MARKER).read_text())["settings"]["seed"] == 2
    (raw / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"notes\.txt: not written by the synthetic generator"):
        writer(raw, n_users=20, seed=3)
    (raw / "notes.txt").unlink()
    (raw / name).write_bytes((raw / name).read_bytes() + b"\n")
    edited = folder_bytes(raw)
    with pytest.raises(DataError, match=f"{name}: changed since the synthetic generator wrote it"):
        writer(raw, n_users=20, seed=3)
    assert folder_bytes(raw) == edited


def test_interrupted_generation_is_recognised_and_another_dataset_replaces_its_files(tmp_path):
    raw = tmp_path / "raw"
    write_synthetic_movielens(raw, n_users=20)
    marker = json.loads((raw / GENERATED_MARKER).read_text())
    marker["files"]["ratings.dat"] = None  # as written before the file, by a run killed while writing it
    (raw / GENERATED_MARKER).write_text(json.dumps(marker))
    (raw / "ratings.dat").write_bytes(b"1::1::")
    write_synthetic_movielens(raw, n_users=20)
    assert (raw / "ratings.dat").read_bytes().count(b"\n") > 20
    write_synthetic_bookcrossing(raw, n_users=20)
    assert sorted(p.name for p in raw.iterdir()) == [GENERATED_MARKER, "BX-Book-Ratings.csv", "BX-Books.csv",
                                                      "BX-Users.csv"]
    write_synthetic_movielens(raw, n_users=20)  # the Book-Crossing files are its own: accepted


def test_command_line_refuses_a_raw_folder_it_did_not_write(tmp_path):
    raw = write_ml1m(tmp_path / "raw", RATINGS)
    completed = subprocess.run(
        [sys.executable, "-m", "data_prep.prepare_data", "--dataset", "synthetic", "--raw-dir", str(raw),
         "--out-dir", str(tmp_path / "out"), "--n-users", "20"], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1
    assert completed.stderr.startswith(f"error: {raw}: holds files the synthetic generator did not write")


# --- work folders of killed preparations; folder permissions -------------------------------------

KILLED_PREPARATION = """
import os, signal, sys
import data_prep.prepare_data as prepare_data
from data_prep.prepare_data import prepare
from data_prep.task_io import write_task
def write_then_die(path, task):
    write_task(path, task)
    os.kill(os.getpid(), signal.SIGKILL)
prepare_data.write_task = write_then_die
prepare("movielens", sys.argv[1], sys.argv[2], support_size=2, query_size=1)
"""


def work_dirs(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out.tmp-"))


def test_work_folder_of_a_killed_preparation_is_removed_by_the_next(tmp_path):
    raw = write_ml1m(tmp_path / "raw", RATINGS)
    killed = subprocess.Popen([sys.executable, "-c", KILLED_PREPARATION, str(raw), str(tmp_path / "out")], cwd=ROOT)
    assert killed.wait() == -9
    left = work_dirs(tmp_path)
    assert len(left) == 1 and not (tmp_path / "out").exists()
    owner = json.loads((tmp_path / left[0] / WORK_MARKER).read_text())
    assert owner == {"pid": killed.pid, "host": socket.gethostname()}
    messages = []
    prepare("movielens", raw, tmp_path / "out", log=messages.append, **TINY)
    assert work_dirs(tmp_path) == [] and (tmp_path / "out" / "manifest.json").is_file()
    assert messages[0] == f"{tmp_path / left[0]}: removed, the work folder of an interrupted preparation"


def test_work_folders_not_known_to_be_stale_are_left_alone(tmp_path):
    raw = write_ml1m(tmp_path / "raw", RATINGS)
    owners = {".out.tmp-no-marker": None,
              ".out.tmp-running": {"pid": os.getppid(), "host": socket.gethostname()},
              ".out.tmp-other-host": {"pid": 2**22 + 12345, "host": socket.gethostname() + "-elsewhere"},
              ".out.tmp-bad-marker": "{not json",
              ".outside.tmp-dead": {"pid": 2**22 + 12345, "host": socket.gethostname()}}
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep").write_text("x")
        if owner is not None:
            (tmp_path / name / WORK_MARKER).write_text(owner if isinstance(owner, str) else json.dumps(owner))
    prepare("movielens", raw, tmp_path / "out", log=quiet, **TINY)
    assert all((tmp_path / name / "keep").is_file() for name in owners)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_output_folders_follow_the_umask(tmp_path, umask, mode):
    raw = write_ml1m(tmp_path / "raw", RATINGS)
    previous = os.umask(umask)
    try:
        prepare("movielens", raw, tmp_path / "out", log=quiet, **TINY)
        prepare("synthetic", None, tmp_path / "syn", n_users=20, log=quiet)
    finally:
        os.umask(previous)
    for folder in (tmp_path / "out", tmp_path / "out" / "tasks", tmp_path / "syn", tmp_path / "syn" / "raw"):
        assert folder.stat().st_mode & 0o777 == mode
    assert (tmp_path / "out" / "manifest.json").stat().st_mode & 0o777 == mode & 0o666


# --- ensure_prepared: a prepared folder is used only with its own settings ------------------------

OTHER_VALUES = {"support_size": 1, "query_size": 2, "time_split_ratio": 0.5, "train_ratio": 0.5,
                "item_cold_max_ratings": 3, "random_state": 7}


def test_other_values_cover_every_protocol_setting():
    assert set(OTHER_VALUES) == set(DEFAULT_PROTOCOL)


@pytest.fixture
def raw(tmp_path):
    return write_ml1m(tmp_path / "raw", RATINGS)


BAD_SETTINGS = [("support_size", 0, "an integer >= 1"), ("query_size", 2.0, "an integer >= 1"),
                ("time_split_ratio", 1.5, "a number in [0, 1]"), ("train_ratio", -0.1, "a number in [0, 1]"),
                ("train_ratio", True, "a number in [0, 1]"), ("item_cold_max_ratings", -1, "an integer >= 0"),
                ("random_state", -3, "an integer >= 0")]


@pytest.mark.parametrize("key, value, expected", BAD_SETTINGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_SETTINGS])
def test_bad_protocol_setting_is_refused_before_anything_is_written(tmp_path, raw, key, value, expected):
    with pytest.raises(DataError) as error:
        ensure_prepared("movielens", raw, tmp_path / "data", {key: value}, log=quiet)
    assert str(error.value) == f"protocol setting {key} = {value!r}, expected {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_command_line_bad_setting_exits_2_with_one_line(tmp_path, raw, capsys):
    assert main(["--dataset", "movielens", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"),
                 "--support-size", "0"]) == 2
    assert capsys.readouterr().err == "error: protocol setting support_size = 0, expected an integer >= 1\n"


def test_prepares_once_then_reuses(tmp_path, raw, monkeypatch):
    first = ensure_prepared("movielens", raw, tmp_path / "data", TINY, log=quiet)
    assert (first.data_dir, first.reused) == (tmp_path / "data", False)
    monkeypatch.setattr(prepare_data, "build_output", lambda *args: pytest.fail("prepared again"))
    again = ensure_prepared("movielens", raw, tmp_path / "data", TINY, log=quiet)
    assert (again.data_dir, again.reused, again.manifest) == (tmp_path / "data", True, first.manifest)


@pytest.mark.parametrize("key", sorted(OTHER_VALUES))
def test_any_differing_setting_is_refused_and_the_folder_left_alone(tmp_path, raw, key):
    ensure_prepared("movielens", raw, tmp_path / "data", TINY, log=quiet)
    before = folder_bytes(tmp_path / "data")
    with pytest.raises(DataError) as error:
        ensure_prepared("movielens", raw, tmp_path / "data", {**TINY, key: OTHER_VALUES[key]}, log=quiet)
    prepared_value = {**DEFAULT_PROTOCOL, **TINY}[key]
    assert str(error.value) == (
        f"{tmp_path / 'data' / 'manifest.json'}: prepared with other settings ({key}: prepared {prepared_value}, "
        f"asked {OTHER_VALUES[key]}), expected the asked settings; use another data folder, or delete this one "
        "to prepare it again")
    assert folder_bytes(tmp_path / "data") == before


def test_other_settings_go_to_a_folder_named_for_them(tmp_path, raw):
    base = ensure_prepared("movielens", raw, tmp_path / "data", TINY, log=quiet)
    before = folder_bytes(tmp_path / "data")
    asked = {**TINY, "train_ratio": 0.5}
    other = ensure_prepared("movielens", raw, tmp_path / "data", asked, on_mismatch="new-folder", log=quiet)
    expected_dir = settings_dir(tmp_path / "data", {"format": "mamo-tasks-v1", "dataset": "movielens",
                                                    **DEFAULT_PROTOCOL, **asked})
    assert other.data_dir == expected_dir != base.data_dir and not other.reused
    assert (other.manifest["n_train_users"], base.manifest["n_train_users"]) == (3, 5)  # 0.5 / 0.8 of 6 users
    assert folder_bytes(tmp_path / "data") == before
    again = ensure_prepared("movielens", raw, tmp_path / "data", asked, on_mismatch="new-folder", log=quiet)
    assert (again.data_dir, again.reused) == (expected_dir, True)
    assert expected_dir.name.startswith("data-") and len(expected_dir.name) == len("data-") + 10


def test_changed_raw_file_is_a_difference(tmp_path, raw):
    ensure_prepared("movielens", raw, tmp_path / "data", TINY, log=quiet)
    write_ml1m(raw, RATINGS[:-1])
    with pytest.raises(DataError, match=r"\(ratings\.dat: prepared from md5 [0-9a-f]{32}, raw file now [0-9a-f]{32}\)"):
        ensure_prepared("movielens", raw, tmp_path / "data", TINY, log=quiet)


def test_folder_without_raw_files_is_reused_on_settings(tmp_path, raw):
    ensure_prepared("movielens", raw, tmp_path / "data", TINY, log=quiet)
    assert ensure_prepared("movielens", tmp_path / "gone", tmp_path / "data", TINY, log=quiet).reused


def test_synthetic_size_is_compared_only_when_asked(tmp_path):
    ensure_prepared("synthetic", None, tmp_path / "data", n_users=20, log=quiet)
    assert ensure_prepared("synthetic", None, tmp_path / "data", log=quiet).reused
    with pytest.raises(DataError, match=r"synthetic\.n_users: prepared 20, asked 30"):
        ensure_prepared("synthetic", None, tmp_path / "data", n_users=30, log=quiet)
    with pytest.raises(DataError, match=r"random_state: prepared 100, asked 5; synthetic\.seed: prepared 100, asked 5"):
        ensure_prepared("synthetic", None, tmp_path / "data", {"random_state": 5}, log=quiet)


def test_training_config_holds_every_protocol_setting_with_its_default():
    assert protocol_from_config(config_settings) == DEFAULT_PROTOCOL
    assert "split_ratio" not in config_settings
    bookcrossing = protocol_from_config({**config_settings, "dataset": "bookcrossing", "bx_user_rule": "random"})
    assert bookcrossing == {**DEFAULT_PROTOCOL, "bx_user_rule": "random"}


def test_trainer_data_follow_the_config_train_ratio(tmp_path, raw):
    import mamoRec

    prepare("movielens", raw, tmp_path / "data", log=quiet, **TINY)
    cfg = {**config_settings, "dataset": "movielens", "raw_dir": str(raw), "data_dir": str(tmp_path / "data"),
           **TINY, "train_ratio": 0.5}
    manifest, train, test = mamoRec.load_data(cfg)
    assert cfg["data_dir"] != str(tmp_path / "data") and manifest["protocol"]["train_ratio"] == 0.5
    assert (train.ratings.shape[0], test.ratings.shape[0]) == (3, 3)


def test_command_line_sets_every_protocol_setting(tmp_path, raw):
    assert main(["--dataset", "movielens", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"),
                 "--support-size", "2", "--query-size", "1", "--train-ratio", "0.5", "--time-split-ratio", "0.5",
                 "--item-cold-max-ratings", "3", "--seed", "7"]) == 0
    manifest = load_processed(tmp_path / "out")[0]
    assert {key: manifest["protocol"][key] for key in DEFAULT_PROTOCOL} == {
        "support_size": 2, "query_size": 1, "train_ratio": 0.5, "time_split_ratio": 0.5,
        "item_cold_max_ratings": 3, "random_state": 7}
    with pytest.raises(SystemExit):
        main(["--dataset", "movielens", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "x"),
              "--bx-min-author-books", "2"])


# --- the data checksum ----------------------------------------------------------------------------

def test_data_checksum_is_md5_of_named_files_in_user_id_order(tmp_path):
    # Users 2, 10 and 30: numeric order 2, 10, 30 differs from text order "10", "2", "30".
    ratings = [(u, 10 + k, 3, 1000 * u + k) for u in (30, 2, 10) for k in range(3)]
    out = tmp_path / "out"
    prepare("movielens", write_ml1m(tmp_path / "raw", ratings), out, log=quiet, **TINY)
    stream = b""
    for name in ("manifest.json", "vocabularies.json", "tasks/2.pkl", "tasks/10.pkl", "tasks/30.pkl"):
        content = (out / name).read_bytes()
        stream += name.encode() + b"\0" + str(len(content)).encode() + b"\0" + content
    assert data_checksum(out) == hashlib.md5(stream).hexdigest()


def test_data_checksum_follows_content_not_location(tmp_path):
    raw = write_ml1m(tmp_path / "raw", RATINGS)
    prepare("movielens", raw, tmp_path / "a", log=quiet, **TINY)
    prepare("movielens", raw, tmp_path / "b", log=quiet, **TINY)
    assert data_checksum(tmp_path / "a") == data_checksum(tmp_path / "b")
    task = pickle.loads((tmp_path / "b" / "tasks" / "1.pkl").read_bytes())
    task["query"]["ratings"] = [5 if task["query"]["ratings"][0] != 5 else 4]
    (tmp_path / "b" / "tasks" / "1.pkl").write_bytes(pickle.dumps(task))
    assert data_checksum(tmp_path / "a") != data_checksum(tmp_path / "b")
    with_item_keys = prepare("synthetic-bookcrossing", None, tmp_path / "bx", n_users=20, log=quiet)
    (tmp_path / "bx" / "item_keys.json").write_text("{}")
    changed = data_checksum(tmp_path / "bx")
    prepare("synthetic-bookcrossing", None, tmp_path / "bx2", n_users=20, log=quiet)
    assert with_item_keys and data_checksum(tmp_path / "bx2") != changed
