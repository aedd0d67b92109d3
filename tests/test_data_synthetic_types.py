"""The planted-types dataset: determinism, types from profiles, opposite tastes, and that the
profile tells what 15 support ratings do not."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.ridge_references import ridge_references
from data_prep.synthetic import AFFINITY_SCALE
from data_prep.synthetic_types import TASTE_SCALE, draw_profiled_users, task_type, type_affinity, user_type
from tests.data_helpers import assert_seed_decides_the_bytes, generated_dataset

N_USERS = 1000


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(output folder, manifest, tasks) of a 1000-user synthetic-types dataset."""
    return generated_dataset(tmp_path_factory, "synthetic-types", N_USERS, 5)


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


def test_profile_tells_the_taste_that_15_support_ratings_do_not(planted):
    """Ridge references on the test users' query ratings (data_prep/ridge_references.py), the group
    being the planted type read from the profile. One regression for all training users (a shared
    start) is no better than the support mean: the tastes cancel. One per type is far better. One
    per user fitted on its 15 support ratings alone lies well behind the per-type one, and even
    when it only fits the user's coordinates in the space the per-type regressions span, it
    recovers less than 80 % of what the type gives."""
    out, manifest, tasks = planted
    vocabularies = json.loads((out / "vocabularies.json").read_text())["user"]
    score = {name: value["rmse"] for name, value in
             ridge_references(manifest, tasks, lambda task: task_type(task, vocabularies)).items()}
    assert abs(score["shared"] - score["support_mean"]) < 0.03, score
    assert score["per_group"] < score["shared"] - 0.2, score
    assert score["per_user"] < score["support_mean"] - 0.03, score
    assert score["per_group"] < score["per_user"] - 0.1, score
    recovered = (score["support_mean"] - score["per_user_in_space"]) / (score["support_mean"] - score["per_group"])
    assert recovered < 0.8, score
