"""The real side files in ../shared/data (skipped when absent): ML-1M side files and ML-100K."""
from __future__ import annotations

import shutil

import pytest

from data_prep.prepare_data import prepare
from data_prep.preprocess_MovieLens import load_movielens_1m
from data_prep.prepare_list import build_vocabularies
from data_prep.raw_io import read_table
from data_prep.task_io import load_processed
from tests.data_helpers import ML100K, ML1M_SIDE, random_ratings

needs_ml1m_side = pytest.mark.skipif(not (ML1M_SIDE / "movies_extrainfos.dat").is_file(),
                                     reason=f"real ML-1M side files not found in {ML1M_SIDE}")
needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"real ML-100K not found in {ML100K}")


def real_side_raw_dir(tmp_path, n_users=300, seed=0):
    """Real users.dat and movies_extrainfos.dat plus a generated ratings.dat over their ids."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("users.dat", "movies_extrainfos.dat"):
        shutil.copy(ML1M_SIDE / name, raw / name)
    users = read_table(raw / "users.dat", "::", ["user", "gender", "age", "occupation", "zip"], "latin-1")
    user_ids = [int(u) for u in users.columns["user"][:n_users]]
    movie_ids = list(range(1, 3953))  # every ML-1M movie id, including 860 and 1795 (no metadata)
    ratings = random_ratings(user_ids, movie_ids, seed=seed, per_user=(22, 60))  # >= 20 after dropping 860, 1795
    (raw / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
    return raw


def read_list(name):
    return set((ML1M_SIDE / name).read_text(encoding="utf-8").splitlines())


@needs_ml1m_side
def test_real_side_files_parse_completely_into_the_vocabularies(tmp_path):
    raw = load_movielens_1m(real_side_raw_dir(tmp_path, n_users=30))
    vocabularies = build_vocabularies(raw)["item"]
    assert len(raw.items) == 3881 and 860 not in raw.items.index and 1795 not in raw.items.index
    assert len(raw.users) == 6040
    assert vocabularies["rate"] == ["G", "NC-17", "PG", "PG-13", "R", "UNRATED"]
    assert set(vocabularies["genre"]) == read_list("List_genre.txt") and len(vocabularies["genre"]) == 25
    assert set(vocabularies["director"]) == read_list("List_director.txt") and len(vocabularies["director"]) == 2186
    assert not any("(" in name for name in vocabularies["director"])
    assert ("John Lasseter", "Andrew Stanton") in set(raw.items["director"])  # "Andrew Stanton(co-director)"


@needs_ml1m_side
def test_real_side_files_through_the_full_pipeline(tmp_path):
    prepare("movielens", real_side_raw_dir(tmp_path), tmp_path / "out", log=lambda m: None)
    manifest, tasks = load_processed(tmp_path / "out")
    assert manifest["n_users"] == 300 and len(tasks) == 300
    assert manifest["n_ratings_without_metadata"] > 0
    sizes = {f["name"]: f["size"] for f in manifest["features"]["user"] + manifest["features"]["item"]}
    assert sizes == {"gender": 2, "age": 7, "occupation": 21, "rate": 6, "year": 81, "genre": 25, "director": 2186}
    kept_items = {i for task in tasks.values() for part in ("support", "query") for i in task[part]["item_ids"]}
    assert not kept_items & {860, 1795}
    task = next(iter(tasks.values()))
    assert len(task["support"]["item_features"]["director"]) == 15
    assert all(0 <= code < 2186 for codes in task["support"]["item_features"]["director"] for code in codes)


@needs_ml100k
def test_movielens_100k_end_to_end(tmp_path):
    manifest = prepare("movielens-100k", ML100K, tmp_path / "out", log=lambda m: None)
    assert manifest["checksums"]["u.data"] == "6e47046882bad158b0efbb84cd5cb987"
    assert manifest["n_users"] == 943  # every ML-100K user has at least 20 ratings
    assert manifest["n_ratings"] == 943 * 20
    assert manifest["n_train_users"] == 754 and manifest["n_test_users"] == 189
    assert 500 < manifest["n_items"] < 1682
    assert manifest["n_warm_users"] + manifest["n_cold_users"] == 943 and manifest["n_cold_users"] > 0
    assert manifest["n_warm_items"] > 0 and manifest["n_cold_items"] > 0
    assert all(count > 0 for count in manifest["scenario_counts"].values())
    sizes = {f["name"]: f["size"] for f in manifest["features"]["user"] + manifest["features"]["item"]}
    assert sizes["gender"] == 2 and sizes["age"] == 7 and sizes["occupation"] == 21 and sizes["genre"] == 19
