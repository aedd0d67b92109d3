"""Damaged processed data: each case is refused by load_processed with one line naming the file."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest

from data_prep.prepare_data import prepare
from data_prep.raw_io import DataError
from data_prep.task_io import load_processed, load_vocabularies
from tests.data_helpers import write_ml1m

# Users 1..5 rate items 10..13 (4 ratings each, support 2 + query 1 kept); item 13 is never kept.
RATINGS = [(u, 10 + k, 1 + (u + k) % 5, 1000 * u + k) for u in (1, 2, 3, 4, 5) for k in range(4)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A valid prepared folder (copied by each test before damaging it)."""
    root = tmp_path_factory.mktemp("valid")
    raw = write_ml1m(root / "raw", RATINGS)
    prepare("movielens", raw, root / "out", support_size=2, query_size=1, log=lambda message: None)
    return root / "out"


@pytest.fixture
def data(prepared, tmp_path):
    """A fresh copy of the valid folder, and its manifest."""
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    return out, json.loads((out / "manifest.json").read_text())


def edit_manifest(out, change):
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def edit_task(out, user_id, change):
    path = out / "tasks" / f"{user_id}.pkl"
    task = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps(change(task)))


def item_field(manifest, name):
    return next(field for field in manifest["features"]["item"] if field["name"] == name)


def set_in(record, keys, value):
    """``record[k0][k1]... = value``; returns None (for use in lambdas)."""
    for key in keys[:-1]:
        record = record[key]
    record[keys[-1]] = value


def changed(task, keys, value):
    set_in(task, keys, value)
    return task


def leak_first_test_user(manifest):
    manifest["split"]["train"].append(manifest["split"]["test"][0])
    manifest["n_train_users"] += 1
    manifest["n_users"] += 1


def used_genre_codes(out, manifest):
    tasks = load_processed(out)[1]
    return [code for task in tasks.values() for part in ("support", "query")
            for codes in task[part]["item_features"]["genre"] for code in codes]


def shrink_genre_to_highest_code(out, manifest):
    """Manifest genre size = the highest code used, so that code is one past the end."""
    highest = max(used_genre_codes(out, manifest))
    edit_manifest(out, lambda m: set_in(item_field(m, "genre"), ["size"], highest))
    return highest


MANIFEST_CASES = [
    ("bad JSON", lambda out: (out / "manifest.json").write_text('{"format": "mamo-tasks-v1",'),
     "manifest.json: line 1 column 28: Expecting property name enclosed in double quotes"),
    ("not an object", lambda out: (out / "manifest.json").write_text("[1, 2]"),
     "manifest.json: a JSON list, expected the JSON manifest"),
    ("missing file", lambda out: (out / "manifest.json").unlink(), "manifest.json: not found, expected the JSON manifest"),
    ("other format", lambda out: edit_manifest(out, lambda m: set_in(m, ["format"], "mamo-tasks-v0")),
     "format 'mamo-tasks-v0', expected 'mamo-tasks-v1'"),
    ("missing split", lambda out: edit_manifest(out, lambda m: m.pop("split")), "missing key split, expected an object"),
    ("missing protocol key", lambda out: edit_manifest(out, lambda m: m["protocol"].pop("query_size")),
     "missing key protocol.query_size, expected an integer"),
    ("size as a string", lambda out: edit_manifest(out, lambda m: set_in(m, ["protocol", "support_size"], "2")),
     "protocol.support_size = '2', expected an integer"),
    ("bool as an integer", lambda out: edit_manifest(out, lambda m: set_in(m, ["rating_min"], True)),
     "rating_min = True, expected an integer"),
    ("split user as a string", lambda out: edit_manifest(out, lambda m: m["split"]["test"].append("7")),
     "split.test = ", "expected a list of integers"),
    ("train and test overlap", lambda out: edit_manifest(out, leak_first_test_user),
     "is in both split.train and split.test (1 users in both), expected disjoint train and test users"),
    ("user twice in train", lambda out: edit_manifest(out, lambda m: m["split"]["train"].append(m["split"]["train"][0])),
     "lists user", "twice, expected each user once"),
    ("user count", lambda out: edit_manifest(out, lambda m: set_in(m, ["n_test_users"], 3)),
     "n_test_users = 3, expected 1 (the users in split)"),
    ("class count", lambda out: edit_manifest(out, lambda m: set_in(m, ["n_rating_classes"], 10)),
     "n_rating_classes = 10 with ratings 1..5, expected rating_max - rating_min + 1 classes"),
    ("feature kind", lambda out: edit_manifest(out, lambda m: set_in(m["features"]["user"][0], ["kind"], "multi_hot")),
     "features.user[0].kind = 'multi_hot', expected one of ('categorical',)"),
    ("feature size zero", lambda out: edit_manifest(out, lambda m: set_in(m["features"]["item"][0], ["size"], 0)),
     "features.item[0].size = 0, expected at least 1"),
]

TASK_CASES = [
    ("task missing", lambda out, m: (out / "tasks" / f"{m['split']['test'][0]}.pkl").unlink(),
     "not found, expected the task of user", "(split.test of manifest.json)"),
    ("task is a list", lambda out, m: (out / "tasks" / "1.pkl").write_bytes(pickle.dumps([1, 2])),
     "1.pkl: a list, expected a task dict"),
    ("task truncated", lambda out, m: (out / "tasks" / "1.pkl").write_bytes((out / "tasks" / "1.pkl").read_bytes()[:40]),
     "1.pkl: not a plain-data task pickle"),
    ("task of another user", lambda out, m: edit_task(out, 1, lambda t: changed(t, ["user_id"], 2)),
     "1.pkl: user_id = 2, expected 1 (the file name)"),
    ("task in the other split", lambda out, m: edit_task(
        out, m["split"]["train"][0], lambda t: changed(t, ["split"], "test")), "split = 'test', expected 'train'"),
    ("ratings as strings", lambda out, m: edit_task(out, 1, lambda t: changed(t, ["support", "ratings"], ["4", "5"])),
     "1.pkl: support.ratings = ['4', '5'], expected a list of integers"),
    ("support longer than the protocol", lambda out, m: edit_manifest(
        out, lambda mm: set_in(mm, ["protocol", "support_size"], 3)),
     "support.item_ids has 2 values, expected 3 (protocol support_size)"),
    ("query shorter than the protocol", lambda out, m: edit_task(
        out, 1, lambda t: changed(t, ["query", "timestamps"], [])),
     "query.timestamps has 0 values, expected 1 (protocol query_size)"),
    ("rating above the classes", lambda out, m: edit_task(out, 1, lambda t: changed(t, ["query", "ratings"], [6])),
     "1.pkl: query.ratings[0] = 6, expected a rating in 1..5 (manifest rating_min, rating_max)"),
    ("rating below the classes", lambda out, m: edit_manifest(
        out, lambda mm: (set_in(mm, ["rating_min"], 3), set_in(mm, ["n_rating_classes"], 3))),
     "ratings[", "expected a rating in 3..5"),
    ("item code = vocabulary size", lambda out, m: shrink_genre_to_highest_code(out, m),
     "item_features.genre[", "expected a code in 0..", "(feature genre has size"),
    ("categorical code too large", lambda out, m: edit_task(
        out, 1, lambda t: changed(t, ["support", "item_features", "rate"], [0, item_field(m, "rate")["size"]])),
     "1.pkl: support.item_features.rate[1] = ", "expected a code in 0.."),
    ("item field missing", lambda out, m: edit_task(out, 1, lambda t: (t["query"]["item_features"].pop("director"), t)[1]),
     "1.pkl: missing key query.item_features.director, expected a list"),
    ("user code = vocabulary size", lambda out, m: edit_task(
        out, 1, lambda t: changed(t, ["user_features", 0], m["features"]["user"][0]["size"])),
     "1.pkl: user_features[0] = 2, expected a code in 0..1 (feature gender has size 2 in manifest.json)"),
    ("user codes missing", lambda out, m: edit_task(out, 1, lambda t: changed(t, ["user_features"], [0, 0])),
     "1.pkl: user_features has 2 codes, expected 3 (one per user field)"),
    ("scenario of the other user class", lambda out, m: edit_task(
        out, 1, lambda t: changed(t, ["query", "scenarios"], [3 - 2 * t["user_is_new"]])),
     "1.pkl: query.scenarios[0] = "),
]


def check_refused(out, expected_parts):
    with pytest.raises(DataError) as error:
        load_processed(out)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(out))
    for part in expected_parts:
        assert part in message


def cases(table):
    """(what, damage, expected message parts) per case of a table."""
    return pytest.mark.parametrize("what, damage, expected", [(c[0], c[1], c[2:]) for c in table],
                                   ids=[c[0] for c in table])


@cases(MANIFEST_CASES)
def test_damaged_manifest_is_refused(data, what, damage, expected):
    out, _ = data
    damage(out)
    check_refused(out, expected)


@cases(TASK_CASES)
def test_damaged_task_is_refused(data, what, damage, expected):
    out, manifest = data
    damage(out, manifest)
    check_refused(out, expected)


def test_valid_folder_loads(data):
    out, manifest = data
    loaded, tasks = load_processed(out)
    assert loaded == manifest and sorted(tasks) == [1, 2, 3, 4, 5]
    assert (manifest["n_train_users"], manifest["n_test_users"]) == (4, 1)


def test_vocabulary_sizes_must_match_the_manifest(data):
    out, manifest = data
    assert len(load_vocabularies(out, manifest)["item"]["genre"]) == item_field(manifest, "genre")["size"]
    vocabularies = json.loads((out / "vocabularies.json").read_text())
    vocabularies["item"]["genre"].pop()
    (out / "vocabularies.json").write_text(json.dumps(vocabularies))
    with pytest.raises(DataError, match=r"vocabularies\.json: item\.genre has 1 values, expected 2 \(its size in manifest\.json\)"):
        load_vocabularies(out, manifest)
