"""Bad input, atomic output, reuse and rebuild, and the restricted task unpickler."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import data_prep.prepare_data as prepare_data
from data_prep.prepare_data import main, prepare
from data_prep.raw_io import DataError
from data_prep.task_io import load_task
from tests.data_helpers import ROOT, write_ml100k, write_ml1m

GOOD_RATINGS = [(u, 10 + k, 1 + (u + k) % 5, 1000 * u + k) for u in (1, 2, 3, 4) for k in range(4)]
TINY = {"support_size": 2, "query_size": 1}


def quiet_prepare(raw, out, **settings):
    return prepare("movielens", raw, out, log=lambda message: None, **{**TINY, **settings})


def leftovers(parent, out_name="out"):
    """Names in ``parent`` that belong to an output attempt (the output itself or temp siblings)."""
    return sorted(name for name in os.listdir(parent) if out_name in name)


def replace_line(path, number, text):
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


BAD_RATINGS_LINES = [
    ("wrong separator", "2,10,3,1000", "expected 4 fields"),
    ("truncated line", "2::10::3", "expected 4 fields"),
    ("non-numeric rating", "2::10::x::1000", "field rating = 'x', expected an integer in [1, 5]"),
    ("rating out of range", "2::10::6::1000", "field rating = '6', expected an integer in [1, 5]"),
    ("unknown user", "99::10::3::1000", "user 99 is not in the users file"),
]


@pytest.mark.parametrize("what, line, expectation", BAD_RATINGS_LINES, ids=[case[0] for case in BAD_RATINGS_LINES])
def test_bad_ratings_line_names_file_line_and_expectation(tmp_path, what, line, expectation):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    replace_line(raw / "ratings.dat", 3, line)
    with pytest.raises(DataError) as error:
        quiet_prepare(raw, tmp_path / "out")
    message = str(error.value)
    assert str(raw / "ratings.dat") in message and "line 3:" in message and expectation in message
    assert leftovers(tmp_path) == []


BAD_SIDE_LINES = [  # (format, file, edit: its lines -> (line number, new text), line named, message after it)
    ("movielens", "users.dat", lambda lines: (2, "2::X::25::2::12345"), 2,
     "field gender = 'X', expected one of ['F', 'M']"),
    ("movielens", "users.dat", lambda lines: (2, "2::F::26::2::12345"), 2,
     "field age = '26', expected one of ['1', '18', '25', '35', '45', '50', '56']"),
    ("movielens", "users.dat", lambda lines: (2, "2::F::25::21::12345"), 2,
     "field occupation = '21', expected an integer in [0, 20]"),
    ("movielens", "users.dat", lambda lines: (2, "1::M::25::1::12345"), 2, "user 1 appears twice, expected unique ids"),
    ("movielens-100k", "u.item", lambda lines: (1, lines[0][:-1] + "2"), 1,  # item 10's last genre flag
     "field flag_Western = '2', expected an integer in [0, 1]"),
    ("movielens-100k", "u.item", lambda lines: (1, lines[1]), 2,  # item 11's line also in place of item 10's
     "item 11 appears twice, expected unique ids"),
]


@pytest.mark.parametrize("dataset, name, edit, line, expectation", BAD_SIDE_LINES,
                         ids=[case[-1].split(",")[0] for case in BAD_SIDE_LINES])
def test_bad_user_or_item_line_names_file_line_and_expectation(tmp_path, dataset, name, edit, line, expectation):
    raw = (write_ml1m if dataset == "movielens" else write_ml100k)(tmp_path / "raw", GOOD_RATINGS)
    replace_line(raw / name, *edit((raw / name).read_text().splitlines()))
    with pytest.raises(DataError) as error:
        prepare(dataset, raw, tmp_path / "out", log=lambda message: None, **TINY)
    assert str(error.value) == f"{raw / name}: line {line}: {expectation}"
    assert leftovers(tmp_path) == []


DUPLICATE_CASES = [("same timestamp", 1001), ("other timestamp", 5)]


@pytest.mark.parametrize("what, timestamp", DUPLICATE_CASES, ids=[case[0] for case in DUPLICATE_CASES])
def test_repeated_user_item_pair_is_refused_in_ml1m_format(tmp_path, what, timestamp):
    # Users 1..4 rate items 10..13 at 1000u + k: line 2 is (1, 11, ., 1001); line 17 repeats the pair.
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS + [(1, 11, 4, timestamp)])
    with pytest.raises(DataError) as error:
        quiet_prepare(raw, tmp_path / "out")
    assert str(error.value) == (f"{raw / 'ratings.dat'}: line 17: user 1 rates item 11 again (first on line 2), "
                                "expected one rating per user and item")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("what, timestamp", DUPLICATE_CASES, ids=[case[0] for case in DUPLICATE_CASES])
def test_repeated_user_item_pair_is_refused_in_ml100k(tmp_path, what, timestamp):
    raw = write_ml100k(tmp_path / "raw", GOOD_RATINGS[:9] + [(1, 11, 2, timestamp)] + GOOD_RATINGS[9:])
    with pytest.raises(DataError, match=r"u\.data: line 10: user 1 rates item 11 again \(first on line 2\)"):
        prepare("movielens-100k", raw, tmp_path / "out", log=lambda message: None, **TINY)
    assert leftovers(tmp_path) == []


def test_ml100k_writer_gives_a_preparable_folder(tmp_path):
    manifest = prepare("movielens-100k", write_ml100k(tmp_path / "raw", GOOD_RATINGS), tmp_path / "out",
                       log=lambda message: None, **TINY)
    assert manifest["n_users"] == 4 and manifest["n_ratings"] == 12


def test_empty_file(tmp_path):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    (raw / "users.dat").write_text("")
    with pytest.raises(DataError, match=r"users\.dat: line 1: file is empty, expected at least one record"):
        quiet_prepare(raw, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_undecodable_bytes(tmp_path):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    data = (raw / "movies_extrainfos.dat").read_bytes().split(b"\r\n")
    data[1] = data[1].replace(b"Movie", b"Mov\xffie")
    (raw / "movies_extrainfos.dat").write_bytes(b"\r\n".join(data))
    with pytest.raises(DataError, match=r"movies_extrainfos\.dat: line 2: bytes that are not valid utf-8"):
        quiet_prepare(raw, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_missing_file_says_what_to_put_where(tmp_path):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    (raw / "users.dat").unlink()
    with pytest.raises(DataError) as error:
        quiet_prepare(raw, tmp_path / "out")
    message = str(error.value)
    assert str((raw / "users.dat").resolve()) in message
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in message and "--download" in message
    assert leftovers(tmp_path) == []


def test_cli_prints_error_and_exits_2_without_traceback(tmp_path):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    replace_line(raw / "ratings.dat", 2, "1::10::9::5")
    completed = subprocess.run(
        [sys.executable, "-m", "data_prep.prepare_data", "--dataset", "movielens", "--raw-dir", str(raw),
         "--out-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 2
    assert "line 2:" in completed.stderr and "Traceback" not in completed.stderr
    assert leftovers(tmp_path) == []


def test_interrupted_first_run_leaves_no_output(tmp_path, monkeypatch):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    written = []

    def write_then_fail(path, task):
        if written:
            raise KeyboardInterrupt
        written.append(path)

    monkeypatch.setattr(prepare_data, "write_task", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        quiet_prepare(raw, tmp_path / "out")
    assert written and leftovers(tmp_path) == []


def test_interrupted_rebuild_keeps_the_old_output(tmp_path, monkeypatch):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    quiet_prepare(raw, tmp_path / "out")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_data, "save_vocabularies", disk_full)
    with pytest.raises(OSError):
        quiet_prepare(raw, tmp_path / "out", random_state=7)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before and leftovers(tmp_path) == ["out"]


def test_rerun_with_same_inputs_reuses_output(tmp_path, monkeypatch):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    first = quiet_prepare(raw, tmp_path / "out")
    messages = []
    monkeypatch.setattr(prepare_data, "build_output", lambda *args: pytest.fail("output rebuilt"))
    again = prepare("movielens", raw, tmp_path / "out", log=messages.append, **TINY)
    assert again == first and "reusing" in messages[0]


def test_changed_settings_or_inputs_rebuild(tmp_path):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    first = quiet_prepare(raw, tmp_path / "out")
    bigger = quiet_prepare(raw, tmp_path / "out", support_size=3)
    assert bigger["protocol"]["support_size"] == 3 and bigger["n_ratings"] == 16 != first["n_ratings"]
    replace_line(raw / "ratings.dat", 1, "1::10::5::1000")
    changed = quiet_prepare(raw, tmp_path / "out", support_size=3)
    assert changed["checksums"]["ratings.dat"] != bigger["checksums"]["ratings.dat"]
    assert leftovers(tmp_path) == ["out"]


def test_refuses_to_replace_a_folder_that_is_not_output(tmp_path):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    with pytest.raises(DataError, match="not a processed-data folder"):
        quiet_prepare(raw, raw)


class RunsShellCommand:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [RunsShellCommand(), np.arange(3), {"fine": [np.int64(1)]}],
                         ids=["os.system", "numpy array", "numpy scalar inside dict"])
def test_task_loader_refuses_anything_but_plain_data(tmp_path, payload):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match=r"evil\.pkl: not a plain-data task pickle"):
        load_task(path)


def test_task_loader_reads_plain_data(tmp_path):
    task = {"user_id": 1, "support": {"ratings": [1, 2]}, "new": True, "x": 0.5, "s": "é"}
    path = tmp_path / "task.pkl"
    path.write_bytes(pickle.dumps(task))
    assert load_task(path) == task


def test_cli_main_runs(tmp_path, capsys):
    raw = write_ml1m(tmp_path / "raw", GOOD_RATINGS)
    assert main(["--dataset", "movielens", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"),
                 "--support-size", "2", "--query-size", "1"]) == 0
    assert "4 users" in capsys.readouterr().out
