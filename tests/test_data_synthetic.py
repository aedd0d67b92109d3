"""The synthetic generator: ML-1M format, determinism, cold-start coverage, learnable signal."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.ridge_references import item_design, ridge_weights, rmse
from tests.data_helpers import assert_seed_decides_the_bytes, generated_dataset

N_USERS = 600


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(output folder, manifest, tasks) of a 600-user synthetic dataset."""
    return generated_dataset(tmp_path_factory, "synthetic", N_USERS, 3)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, synthetic):
    assert_seed_decides_the_bytes("synthetic", synthetic[0], N_USERS, 3, tmp_path)


def test_raw_files_look_like_movielens_1m(synthetic):
    out, _, _ = synthetic
    movies = (out / "raw" / "movies_extrainfos.dat").read_bytes()
    assert movies.count(b"\r\n") == movies.count(b"\n") and b"(co-director)" in movies and b"N/A" in movies
    first = movies.split(b"\r\n")[0].decode("utf-8").split("::")
    assert len(first) == 11
    assert all(len(line.split("::")) == 4 for line in (out / "raw" / "ratings.dat").read_text().splitlines()[:50])


def test_cold_start_coverage(synthetic):
    _, manifest, tasks = synthetic
    assert 0.15 <= manifest["n_cold_users"] / manifest["n_users"] <= 0.25
    assert manifest["n_cold_items"] > 0 and manifest["n_ratings_without_metadata"] > 0
    test_codes = {code for task in tasks.values() if task["split"] == "test"
                  for part in ("support", "query") for code in task[part]["scenarios"]}
    assert test_codes == {0, 1, 2, 3}
    assert all(count > 0 for count in manifest["test_query_scenario_counts"].values())


def test_features_plus_support_beat_support_mean(synthetic):
    """A per-user ridge regression on item features, fitted on the 15 support ratings only, beats
    the support mean and the global mean of all support ratings on the query: the planted signal is
    learnable from features + support."""
    _, manifest, tasks = synthetic
    sizes = {field["name"]: field["size"] for field in manifest["features"]["item"]}
    global_mean = np.mean([rating for task in tasks.values() for rating in task["support"]["ratings"]])
    global_errors = [rating - global_mean for task in tasks.values() for rating in task["query"]["ratings"]]
    mean_errors, adapted_errors = [], []
    for task in tasks.values():
        support, query = task["support"], task["query"]
        design, ratings = item_design(support, sizes), np.asarray(support["ratings"], dtype=float)
        weights = ridge_weights(design, ratings - ratings.mean(), 3.0)
        predicted = np.clip(ratings.mean() + item_design(query, sizes) @ weights, 1, 5)
        mean_errors += list(np.asarray(query["ratings"]) - ratings.mean())
        adapted_errors += list(np.asarray(query["ratings"]) - predicted)
    assert rmse(adapted_errors) < rmse(mean_errors) - 0.03
    assert rmse(adapted_errors) < rmse(global_errors) - 0.03
