"""Synthetic users of four types with opposite tastes, each user's type readable from the profile.

A dataset built so that a personal starting point should pay: written in the MovieLens-1M format
(``data_prep/synthetic.py`` draws the items, rating counts and times, and writes the files).

- type = 2 * (gender is F) + (age bucket >= 35): young men, older men, young women, older women.
  Gender and age bucket are drawn so that the four types are equally common; occupation is noise.
- every item has three appeals, functions of its features only (each a weighted sum over its
  genres plus a term for its MPAA rate, standardised over the items).
- on each appeal two types like the items that have it and the other two dislike them, by the same
  amount (TASTE_SIGNS): gender decides the first appeal, age group the second, and whether gender
  and age group "agree" (young man or older woman) the third, which neither field alone predicts.
  The average taste over users is zero: one shared starting point predicts nothing beyond a
  user's mean, for every user.
- rating = clip(round(3.6 + user bias + TASTE_SCALE * taste + noise), 1, 5), with
  taste = sum_j sign[type, j] * appeal_j / sqrt(3) and noise ~ N(0, NOISE_STD). With this noise,
  15 support ratings tell a user's taste only roughly (a user's three coordinates fitted on them
  recover about three quarters of what the type gives), while the profile tells it exactly.

Deterministic for a given ``(n_users, seed)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.preprocess_MovieLens import AGE_BUCKETS
from data_prep.synthetic import (AFFINITY_SCALE, GENRES, N_OCCUPATIONS, RATES, check_n_users, draw_items, draw_ratings,
                                 movielens_files, movielens_item_count, write_generated)

OLDER_FROM_AGE = 35  # age buckets from here on are "older"
TASTE_SCALE = 1.0  # rating units per standard deviation of taste
NOISE_STD = 1.0  # rating units
USER_BIAS_STD = 0.3  # rating units
TASTE_SIGNS = np.array([(1, 1, 1),     # young men
                        (1, -1, -1),   # older men
                        (-1, 1, -1),   # young women
                        (-1, -1, 1)])  # older women; columns: the three appeals
N_APPEALS = TASTE_SIGNS.shape[1]


def user_type(gender: np.ndarray, age: np.ndarray) -> np.ndarray:
    """The planted type (0..3) of users with gender 'F'/'M' and age bucket: 2 * female + older."""
    return 2 * (np.asarray(gender) == "F") + (np.asarray(age) >= OLDER_FROM_AGE)


def task_type(task: dict, user_vocabularies: dict) -> int:
    """The planted type of a prepared task's user, decoded from its (gender, age, occupation) codes
    with the prepared data's user vocabularies (vocabularies.json["user"])."""
    gender, age, _ = task["user_features"]
    return int(user_type(user_vocabularies["gender"][gender], int(user_vocabularies["age"][age])))


def draw_profiled_users(rng: np.random.Generator, n_users: int) -> dict[str, np.ndarray]:
    """Per user: gender, age bucket, occupation, zip, bias, and the type they imply."""
    older = rng.random(n_users) < 0.5
    young_buckets = [a for a in AGE_BUCKETS if a < OLDER_FROM_AGE]
    older_buckets = [a for a in AGE_BUCKETS if a >= OLDER_FROM_AGE]
    age = np.where(older, rng.choice(older_buckets, n_users), rng.choice(young_buckets, n_users))
    gender = np.where(rng.random(n_users) < 0.5, "F", "M")
    return {
        "type": user_type(gender, age),
        "gender": gender,
        "age": age,
        "occupation": rng.integers(0, N_OCCUPATIONS, n_users),
        "bias": rng.normal(0.0, USER_BIAS_STD, n_users),
        "zip": rng.integers(10_000, 99_999, n_users),
    }


def item_appeals(rng: np.random.Generator, items: dict) -> np.ndarray:
    """(N_APPEALS, n_items): each a weighted sum over the item's genres plus a term for its MPAA
    rate, standardised over the items."""
    genre_weights = rng.normal(0.0, 1.0, (N_APPEALS, len(GENRES)))
    rate_weights = rng.normal(0.0, 1.0, (N_APPEALS, len(RATES)))
    genre_sums = np.stack([genre_weights[:, g].sum(axis=1) / np.sqrt(len(g)) for g in items["genres"]], axis=1)
    appeals = genre_sums + rate_weights[:, items["rate"]]
    return (appeals - appeals.mean(axis=1, keepdims=True)) / appeals.std(axis=1, keepdims=True)


def type_affinity(appeals: np.ndarray) -> np.ndarray:
    """(4, n_items) taste of each type for each item, in units of draw_ratings' AFFINITY_SCALE."""
    return (TASTE_SCALE / AFFINITY_SCALE) * (TASTE_SIGNS @ appeals) / np.sqrt(N_APPEALS)


def write_synthetic_types(raw_dir: Path, n_users: int = 6040, seed: int = 100) -> None:
    """Write ``ratings.dat``, ``users.dat``, ``movies_extrainfos.dat`` (ML-1M format) into ``raw_dir``."""
    check_n_users(n_users)
    rng = np.random.default_rng(seed)
    users = draw_profiled_users(rng, n_users)
    items = draw_items(rng, movielens_item_count(n_users))
    items["affinity"] = type_affinity(item_appeals(rng, items))
    write_generated(raw_dir, movielens_files(users, items, draw_ratings(rng, users, items, noise_std=NOISE_STD)),
                    {"dataset": "synthetic-types", "n_users": n_users, "seed": seed})
