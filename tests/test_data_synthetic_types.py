"""The planted-types dataset: determinism, types from profiles, opposite tastes, and that the
profile tells what 15 support ratings do not."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.synthetic import AFFINITY_SCALE
from data_prep.synthetic_types import TASTE_SCALE, draw_profiled_users, type_affinity, user_type
from data_prep.task_io import load_processed
from tests.data_helpers import assert_seed_decides_the_bytes, item_design, prepare_generated, ridge_weights, rmse

N_USERS = 1000


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(output folder, manifest, tasks) of a 1000-user synthetic-types dataset."""
    out = tmp_path_factory.mktemp("types") / "out"
    prepare_generated("synthetic-types", out, N_USERS, 5)
    manifest, tasks = load_processed(out)
    return out, manifest, tasks


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, planted):
    assert_seed_decides_the_bytes("synthetic-types", planted[0], N_USERS, 5, tmp_path)


def test_type_is_twice_female_plus_older():
    genders = ["M", "M", "F", "F", "M", "F", "M"]
    ages = [1, 35, 25, 56, 25, 45, 18]
    assert user_type(genders, ages).tolist() == [0, 1, 2, 3, 0, 3, 0]


def test_drawn_types_follow_profiles_and_are_equally_common():
    users = draw_profiled_users(np.random.default_rng(0), 8000)
    assert (users["type"] == user_type(users["gender"], users["age"])).all()
    shares = np.bincount(users["type"], minlength=4) / 8000
    assert np.abs(shares - 0.25).max() < 0.02


def test_each_appeal_splits_the_types_two_against_two():
    appeals = np.array([[1.0, 0.0, 0.0, 2.0],    # appeal 1 of four items
                        [0.0, 1.0, 0.0, -1.0],   # appeal 2
                        [0.0, 0.0, 1.0, 1.0]])   # appeal 3
    expected = np.array([[1, 1, 1, 2],       # young men: + + +
                         [1, -1, -1, 2],     # older men: + - -
                         [-1, 1, -1, -4],    # young women: - + -
                         [-1, -1, 1, 0]]) / np.sqrt(3.0)  # older women: - - +
    np.testing.assert_allclose(type_affinity(appeals) * AFFINITY_SCALE, TASTE_SCALE * expected)
    assert np.abs(type_affinity(appeals).sum(axis=0)).max() < 1e-12  # the mean taste is zero


def task_type(task, vocabularies):
    """The planted type of a processed task's user, decoded from its (gender, age, occupation) codes."""
    gender, age, _ = task["user_features"]
    return int(user_type(vocabularies["gender"][gender], int(vocabularies["age"][age])))


def test_profile_tells_the_taste_that_15_support_ratings_do_not(planted):
    """Query RMSE on the test users, every prediction = support mean + a ridge regression on item
    features (genres, rate). One regression for all training users (a shared start) is no better
    than the support mean: the tastes cancel. One per type, the type read from the profile, is far
    better. One per user fitted on its 15 support ratings alone lies well behind the per-type one,
    and still behind it when it only fits the user's coordinates in the space that the four
    per-type regressions span (the support used with the shared structure known)."""
    out, manifest, tasks = planted
    sizes = {field["name"]: field["size"] for field in manifest["features"]["item"]}
    vocabularies = json.loads((out / "vocabularies.json").read_text())["user"]
    designs, targets, types = [], [], []
    for task in (t for t in tasks.values() if t["split"] == "train"):
        mean = np.mean(task["support"]["ratings"])
        for part in ("support", "query"):
            designs.append(item_design(task[part], sizes))
            targets.append(np.asarray(task[part]["ratings"]) - mean)
            types += [task_type(task, vocabularies)] * len(task[part]["ratings"])
    design, target, types = np.vstack(designs), np.concatenate(targets), np.asarray(types)
    shared = ridge_weights(design, target, 1.0)
    per_type = [ridge_weights(design[types == k], target[types == k], 1.0) for k in range(4)]
    taste_space = np.linalg.svd(np.stack(per_type), full_matrices=False)[2][:3].T  # (n_features, 3)

    errors = {"support_mean": [], "shared": [], "per_type": [], "per_user": [], "per_user_in_space": []}
    for task in (t for t in tasks.values() if t["split"] == "test"):
        support, query = task["support"], task["query"]
        mean, truth = np.mean(support["ratings"]), np.asarray(query["ratings"])
        support_design, query_design = item_design(support, sizes), item_design(query, sizes)
        support_targets = np.asarray(support["ratings"]) - mean
        own = ridge_weights(support_design, support_targets, 3.0)
        in_space = taste_space @ ridge_weights(support_design @ taste_space, support_targets, 0.3)
        for name, weights in (("shared", shared), ("per_type", per_type[task_type(task, vocabularies)]),
                              ("per_user", own), ("per_user_in_space", in_space)):
            errors[name] += list(truth - np.clip(mean + query_design @ weights, 1, 5))
        errors["support_mean"] += list(truth - mean)
    score = {name: rmse(values) for name, values in errors.items()}
    assert abs(score["shared"] - score["support_mean"]) < 0.03, score
    assert score["per_type"] < score["shared"] - 0.2, score
    assert score["per_user"] < score["support_mean"] - 0.03, score
    assert score["per_type"] < score["per_user"] - 0.1, score
    recovered = (score["support_mean"] - score["per_user_in_space"]) / (score["support_mean"] - score["per_type"])
    assert recovered < 0.8, score  # the support recovers less than 80 % of what the profile gives
