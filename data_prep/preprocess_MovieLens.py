"""Read MovieLens raw files (ML-1M with ``movies_extrainfos.dat``, ML-100K) into a :class:`RawDataset`.

Ratings stay in file order with their 1-based line numbers; user and item features stay strings
(vocabularies and codes are built later, in ``prepare_list``). The protocol itself is
``data_prep.protocol``; the file formats and every check are described in ``docs/data.md``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.protocol import RawDataset, check_known_users
from data_prep.raw_io import Table, choice_column, int_column, read_table, unique_ids

MISSING = "nan"
"""The category of a missing value (``N/A`` or empty), as in the released genre/director lists."""

AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)
ML1M_FILES = ("ratings.dat", "users.dat", "movies_extrainfos.dat")
ML100K_FILES = ("u.data", "u.user", "u.item")
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
RATING_RANGE = (1, 5)
#: The user fields of both MovieLens releases (ML-100K's ages are bucketed as ML-1M's), with their kinds.
USER_FIELDS = [("gender", "categorical"), ("age", "categorical"), ("occupation", "categorical")]
_PARENTHETICAL_NOTE = re.compile(r"\s*\([^)]*\)")


def missing_to_category(value: str) -> str:
    """A stripped field value, with ``N/A`` and empty mapped to :data:`MISSING`."""
    value = value.strip()
    return MISSING if value in ("", "N/A") else value


def split_multi_value(text: str, strip_notes: bool = False) -> tuple[str, ...]:
    """Comma-separated values, stripped, de-duplicated in order; notes like ``(co-director)`` removed."""
    if strip_notes:
        text = _PARENTHETICAL_NOTE.sub("", text)
    return tuple(dict.fromkeys(missing_to_category(value) for value in text.split(",")))


def check_one_rating_per_pair(table: Table, ratings: pd.DataFrame) -> None:
    """Refuse the first line that rates a (user, item) pair again, whatever its timestamp.

    GroupLens files never repeat a pair, so a repeat is damage (a file concatenated twice, an
    edit): which of the two ratings to keep, and whether it may land in both support and query,
    is not the reader's to guess.
    """
    repeated = ratings.duplicated(["user", "item"]).to_numpy()
    if repeated.any():
        k = int(repeated.argmax())
        user, item = int(ratings["user"].iat[k]), int(ratings["item"].iat[k])
        same_pair = (ratings["user"].to_numpy() == user) & (ratings["item"].to_numpy() == item)
        first_line = int(table.line_numbers[np.flatnonzero(same_pair)[0]])
        raise table.error(k, f"user {user} rates item {item} again (first on line {first_line}), "
                             "expected one rating per user and item")


def parse_ratings(table: Table, users: pd.DataFrame) -> pd.DataFrame:
    """Ratings table -> DataFrame [user, item, rating, timestamp, line]; users known, pairs unique."""
    ratings = pd.DataFrame({
        "user": int_column(table, "user", low=1),
        "item": int_column(table, "item", low=1),
        "rating": int_column(table, "rating", *RATING_RANGE),
        "timestamp": int_column(table, "timestamp", low=0),
        "line": table.line_numbers,
    })
    check_known_users(table, ratings["user"].to_numpy(), users)
    check_one_rating_per_pair(table, ratings)
    return ratings


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Ages in years (int array) -> ML-1M age bucket codes (1, 18, 25, 35, 45, 50, 56)."""
    buckets = np.asarray(AGE_BUCKETS)
    return buckets[np.maximum(np.searchsorted(buckets, age, side="right") - 1, 0)]


def load_movielens_1m(raw_dir: Path) -> RawDataset:
    """Read ML-1M ``ratings.dat``, ``users.dat`` and ``movies_extrainfos.dat`` from ``raw_dir``."""
    raw_dir = Path(raw_dir)
    user_table = read_table(raw_dir / "users.dat", "::", ["user", "gender", "age", "occupation", "zip"], "latin-1")
    users = pd.DataFrame({
        "gender": choice_column(user_table, "gender", {"F", "M"}),
        "age": choice_column(user_table, "age", {str(age) for age in AGE_BUCKETS}),
        "occupation": [str(code) for code in int_column(user_table, "occupation", 0, 20)],
    }, index=pd.Index(unique_ids(user_table, "user"), name="user"))
    item_table = read_table(
        raw_dir / "movies_extrainfos.dat", "::",
        ["item", "title", "year", "rate", "released", "genre", "director", "writer", "actors", "plot", "poster"],
        "utf-8",
    )
    items = pd.DataFrame({
        "rate": [missing_to_category(value) for value in item_table.columns["rate"]],
        "year": [missing_to_category(value) for value in item_table.columns["year"]],
        "genre": [split_multi_value(value) for value in item_table.columns["genre"]],
        "director": [split_multi_value(value, strip_notes=True) for value in item_table.columns["director"]],
    }, index=pd.Index(unique_ids(item_table, "item"), name="item"))
    rating_table = read_table(raw_dir / "ratings.dat", "::", ["user", "item", "rating", "timestamp"], "latin-1")
    return RawDataset(
        ratings=parse_ratings(rating_table, users),
        users=users,
        items=items,
        user_fields=USER_FIELDS,
        item_fields=[("rate", "categorical"), ("year", "categorical"), ("genre", "multi_hot"),
                     ("director", "multi_hot")],
        rating_range=RATING_RANGE,
        files=[raw_dir / name for name in ML1M_FILES],
    )


def release_year(date: str) -> str:
    """ML-100K release date ``dd-Mon-yyyy`` -> ``yyyy``; empty -> :data:`MISSING`."""
    date = date.strip()
    return date[-4:] if date else MISSING


def item_genres(flags: list[list[str]]) -> list[tuple[str, ...]]:
    """Per item, the names of its set genre flags (``MISSING`` when none is set)."""
    matrix = np.asarray(flags, dtype="U1") == "1"
    return [tuple(ML100K_GENRES[j] for j in np.flatnonzero(row)) or (MISSING,) for row in matrix]


def load_movielens_100k(raw_dir: Path) -> RawDataset:
    """Read ML-100K ``u.data``, ``u.user`` and ``u.item`` from ``raw_dir``."""
    raw_dir = Path(raw_dir)
    user_table = read_table(raw_dir / "u.user", "|", ["user", "age", "gender", "occupation", "zip"], "latin-1")
    users = pd.DataFrame({
        "gender": choice_column(user_table, "gender", {"F", "M"}),
        "age": [str(bucket) for bucket in age_bucket(int_column(user_table, "age", 0, 150))],
        "occupation": [value.strip() for value in user_table.columns["occupation"]],
    }, index=pd.Index(unique_ids(user_table, "user"), name="user"))
    flag_names = [f"flag_{genre}" for genre in ML100K_GENRES]
    item_table = read_table(
        raw_dir / "u.item", "|", ["item", "title", "release_date", "video_release_date", "url", *flag_names], "latin-1"
    )
    for name in flag_names:
        int_column(item_table, name, 0, 1)
    flags = [list(row) for row in zip(*(item_table.columns[name] for name in flag_names))]
    items = pd.DataFrame({
        "year": [release_year(date) for date in item_table.columns["release_date"]],
        "genre": item_genres(flags),
    }, index=pd.Index(unique_ids(item_table, "item"), name="item"))
    rating_table = read_table(raw_dir / "u.data", "\t", ["user", "item", "rating", "timestamp"], "latin-1")
    return RawDataset(
        ratings=parse_ratings(rating_table, users),
        users=users,
        items=items,
        user_fields=USER_FIELDS,
        item_fields=[("year", "categorical"), ("genre", "multi_hot")],
        rating_range=RATING_RANGE,
        files=[raw_dir / name for name in ML100K_FILES],
    )


LOADERS = {"movielens": load_movielens_1m, "movielens-100k": load_movielens_100k, "synthetic": load_movielens_1m,
           "synthetic-types": load_movielens_1m}
RAW_FILES = {"movielens": ML1M_FILES, "movielens-100k": ML100K_FILES, "synthetic": ML1M_FILES,
             "synthetic-types": ML1M_FILES}
