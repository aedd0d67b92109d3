"""Synthetic raw data in the MovieLens-1M format, with planted, learnable structure.

Writes ``ratings.dat``, ``users.dat`` and ``movies_extrainfos.dat`` exactly as the real files look
(``::`` separators; the metadata file UTF-8 with CRLF, comma-separated genres and directors,
``(co-director)`` notes, ``N/A`` values, a few rated movies without a metadata row), so that they
go through the MovieLens-1M code path unchanged. Deterministic for a given ``(n_users, seed)``.

Planted structure:
- every user has one of ``N_TYPES`` preference types; gender, age and occupation depend on the
  type only partly, so the type is visible partly from features and partly only from ratings;
- every item's affinity for each type is a function of its features (genres, director, rate,
  year) plus a small item-specific part;
- rating = clip(round(3.6 + user bias + AFFINITY_SCALE * affinity[type, item] + noise), 1, 5),
  with noise ~ N(0, NOISE_STD): a model using features and the support ratings beats both the
  global mean and the user's support mean;
- item popularity has a long tail, so items with at most 10 kept ratings exist;
- about 20 % of users start rating after the other users' main period, so they fall after the
  80 % time split (new users); all four scenario codes occur.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Family",
          "Fantasy", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
RATES = ("G", "NC-17", "PG", "PG-13", "R", "UNRATED")
RATE_PROBABILITIES = (0.05, 0.01, 0.15, 0.15, 0.43, 0.21)
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)
N_OCCUPATIONS = 21
N_TYPES = 4
TYPE_PROBABILITIES = (0.3, 0.3, 0.2, 0.2)
MALE_PROBABILITY_BY_TYPE = (0.85, 0.3, 0.7, 0.5)
FEATURE_FOLLOWS_TYPE_PROBABILITY = 0.6
ITEMS_PER_USER = 3900 / 6040
LATE_USER_PROBABILITY = 0.18
AFFINITY_SCALE = 1.0
NOISE_STD = 0.6
FIRST_TIMESTAMP = 956_703_932  # 2000-04-25 23:05:32 UTC, the first ML-1M rating
DAY = 86_400


def draw_users(rng: np.random.Generator, n_users: int) -> dict[str, np.ndarray]:
    """Per user (arrays of length n_users): type, gender ('F'/'M'), age bucket, occupation, bias."""
    user_type = rng.choice(N_TYPES, size=n_users, p=TYPE_PROBABILITIES)
    follows_type = rng.random((3, n_users)) < FEATURE_FOLLOWS_TYPE_PROBABILITY
    male = rng.random(n_users) < np.asarray(MALE_PROBABILITY_BY_TYPE)[user_type]
    typical_age = rng.integers(0, len(AGE_BUCKETS), size=N_TYPES)
    age_index = np.where(follows_type[0], typical_age[user_type], rng.integers(0, len(AGE_BUCKETS), n_users))
    typical_occupations = rng.integers(0, N_OCCUPATIONS, size=(N_TYPES, 3))
    typical = typical_occupations[user_type, rng.integers(0, 3, n_users)]
    occupation = np.where(follows_type[1], typical, rng.integers(0, N_OCCUPATIONS, n_users))
    return {
        "type": user_type,
        "gender": np.where(male, "M", "F"),
        "age": np.asarray(AGE_BUCKETS)[age_index],
        "occupation": occupation,
        "bias": rng.normal(0.0, 0.3, n_users),
        "zip": rng.integers(10_000, 99_999, n_users),
    }


def draw_items(rng: np.random.Generator, n_items: int) -> dict:
    """Per item: genres (lists of indices), director indices, co-director, rate, year, affinity.

    affinity: float array (N_TYPES, n_items), each type's standardised liking of each item.
    """
    n_directors = max(5, n_items // 2)
    genre_popularity = rng.dirichlet(np.full(len(GENRES), 2.0))
    n_genres = rng.integers(1, 4, n_items)
    genres = [sorted(rng.choice(len(GENRES), size=k, replace=False, p=genre_popularity)) for k in n_genres]
    director = np.minimum(rng.zipf(1.6, n_items) - 1, n_directors - 1)
    director = rng.permutation(n_directors)[director]
    co_director = np.where(rng.random(n_items) < 0.08, rng.integers(0, n_directors, n_items), -1)
    rate = rng.choice(len(RATES), size=n_items, p=RATE_PROBABILITIES)
    year = np.clip(np.round(2000 - rng.gamma(1.5, 8.0, n_items)), 1919, 2000).astype(np.int64)

    genre_taste = rng.normal(0.0, 1.0, (N_TYPES, len(GENRES)))
    director_taste = rng.normal(0.0, 0.6, (N_TYPES, n_directors))
    rate_taste = rng.normal(0.0, 0.4, (N_TYPES, len(RATES)))
    year_taste = rng.normal(0.0, 0.4, N_TYPES)
    genre_part = np.stack([genre_taste[:, g].sum(axis=1) / np.sqrt(len(g)) for g in genres], axis=1)
    affinity = (genre_part + director_taste[:, director] + rate_taste[:, rate]
                + np.outer(year_taste, (year - 1990) / 10.0) + rng.normal(0.0, 0.2, (N_TYPES, n_items)))
    affinity = (affinity - affinity.mean()) / affinity.std()
    return {"genres": genres, "director": director, "co_director": co_director, "rate": rate,
            "year": year, "affinity": affinity, "popularity": rng.permutation(np.arange(1, n_items + 1) ** -0.9)}


def draw_ratings(rng: np.random.Generator, users: dict, items: dict) -> dict[str, np.ndarray]:
    """Rating events (user index, item index, rating 1..5, timestamp), grouped by user."""
    n_users, n_items = len(users["type"]), len(items["year"])
    counts = np.minimum(20 + np.floor(rng.lognormal(np.log(105), 1.0, n_users)), 0.6 * n_items).astype(np.int64)
    late = rng.random(n_users) < LATE_USER_PROBABILITY
    counts[late] = np.maximum(20, counts[late] // 3)
    popularity = items["popularity"] / items["popularity"].sum()
    item = np.concatenate([rng.choice(n_items, size=k, replace=False, p=popularity) for k in counts])
    user = np.repeat(np.arange(n_users), counts)
    score = (3.6 + users["bias"][user] + AFFINITY_SCALE * items["affinity"][users["type"][user], item]
             + rng.normal(0.0, NOISE_STD, len(user)))
    start = np.where(late, FIRST_TIMESTAMP + rng.integers(240 * DAY, 1000 * DAY, n_users),
                     FIRST_TIMESTAMP + rng.integers(0, 180 * DAY, n_users))
    gap_scale = np.exp(rng.uniform(np.log(5.0), np.log(DAY), n_users))
    gaps = np.floor(rng.exponential(gap_scale[user])).astype(np.int64)
    first_of_user = np.concatenate([[0], np.cumsum(counts)[:-1]])
    elapsed = np.cumsum(gaps)
    timestamp = start[user] + elapsed - np.repeat(elapsed[first_of_user], counts)
    file_order = np.lexsort((rng.random(len(user)), user))
    return {"user": user[file_order], "item": item[file_order],
            "rating": np.clip(np.round(score), 1, 5).astype(np.int64)[file_order],
            "timestamp": timestamp[file_order]}


def director_field(items: dict, index: int) -> str:
    """The director field of one item: ``Director 0007[, Director 0042(co-director)]`` or ``N/A``."""
    if index % 37 == 5:
        return "N/A"
    names = f"Director {items['director'][index]:04d}"
    if items["co_director"][index] >= 0:
        names += f", Director {items['co_director'][index]:04d}(co-director)"
    return names


def movie_line(items: dict, index: int, item_id: int) -> str:
    """One ``movies_extrainfos.dat`` record (11 ``::``-separated fields)."""
    year = "N/A" if index % 53 == 7 else str(items["year"][index])
    genre = "N/A" if index % 41 == 3 else ", ".join(GENRES[g] for g in items["genres"][index])
    title = f"Synthétique {item_id}" if index % 9 == 0 else f"Synthetic Movie {item_id}"
    fields = [str(item_id), title, year, RATES[items["rate"][index]], f"01 Jan {items['year'][index]}",
              genre, director_field(items, index), "N/A", "N/A", "A synthetic movie.", "N/A"]
    return "::".join(fields)


def items_without_metadata(n_items: int) -> set[int]:
    """Item indices that get ratings but no metadata row (as 860 and 1795 in ML-1M)."""
    return {n_items // 3, (2 * n_items) // 3}


def write_synthetic_movielens(raw_dir: Path, n_users: int = 6040, seed: int = 100) -> None:
    """Write ``ratings.dat``, ``users.dat``, ``movies_extrainfos.dat`` (ML-1M format) into ``raw_dir``."""
    if n_users < 10:
        raise ValueError(f"n_users = {n_users}, expected at least 10")
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_items = max(100, round(ITEMS_PER_USER * n_users))
    users = draw_users(rng, n_users)
    items = draw_items(rng, n_items)
    ratings = draw_ratings(rng, users, items)
    user_lines = [f"{u + 1}::{g}::{a}::{o}::{z}" for u, (g, a, o, z) in
                  enumerate(zip(users["gender"], users["age"].tolist(), users["occupation"].tolist(), users["zip"].tolist()))]
    (raw_dir / "users.dat").write_text("\n".join(user_lines) + "\n", encoding="latin-1")
    hidden = items_without_metadata(n_items)
    movie_lines = [movie_line(items, i, i + 1) for i in range(n_items) if i not in hidden]
    (raw_dir / "movies_extrainfos.dat").write_bytes(("\r\n".join(movie_lines) + "\r\n").encode("utf-8"))
    columns = zip((ratings["user"] + 1).tolist(), (ratings["item"] + 1).tolist(),
                  ratings["rating"].tolist(), ratings["timestamp"].tolist())
    rating_lines = [f"{u}::{i}::{r}::{t}" for u, i, r, t in columns]
    (raw_dir / "ratings.dat").write_text("\n".join(rating_lines) + "\n", encoding="latin-1")
