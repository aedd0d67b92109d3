"""Read MovieLens raw files and apply the data protocol (SPEC section 1).

Readers turn raw files into a :class:`RawDataset` (ratings in file order, user and item features
as strings). :func:`apply_protocol` then applies the protocol's rules, vectorised:

1. drop ratings of items without a metadata row, before anything else;
2. order each user's ratings by (timestamp, file line): ties keep file order; timestamps stay
   integer seconds since the epoch (UTC), never converted through local time;
3. ``split_time`` = ``sorted_timestamps[min(floor(time_split_ratio * N + 0.5), N - 1)]`` over all
   N ratings left after rule 1 (0-based index, round half up);
4. keep users with at least ``support_size + query_size`` ratings, and only their first
   ``support_size + query_size`` ratings in time order;
5. a user is new iff their first rating's timestamp >= ``split_time`` (the dataset's
   ``user_rule``: Book-Crossing, without time, brings its own);
6. an item is new iff it has at most ``item_cold_max_ratings`` (10) kept ratings;
7. scenario = 2 * user_is_new + item_is_new (0..3);
8. support = first ``support_size`` kept ratings, query = the rest (later in time);
9. users split at random: ``numpy.random.default_rng(random_state).permutation(sorted user ids)``,
   the first ``floor(train_ratio * n_users + 0.5)`` are train users.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data_prep.raw_io import DataError, Table, choice_column, int_column, read_table, unique_ids

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
_PARENTHETICAL_NOTE = re.compile(r"\s*\([^)]*\)")


@dataclass
class RawDataset:
    """Raw data of one dataset, before the protocol.

    ratings: DataFrame [user, item, rating, timestamp, line] (int64, file order; line is 1-based).
    users: DataFrame indexed by user id, one str column per user field.
    items: DataFrame indexed by item id; categorical fields are str, multi-hot fields tuples of str.
    user_fields / item_fields: ``[(name, "categorical" | "multi_hot"), ...]`` in output order.
    user_rule: classes kept users existing/new (default: first rating at or after split_time).
    rating_range: (lowest, highest) rating.
    repairs: ``{kind of damage: count}`` repaired or dropped while reading (reported in the manifest).
    item_keys: ``{item id: the raw file's key}`` where raw keys are not integers (Book-Crossing ISBNs).
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_fields: list[tuple[str, str]]
    item_fields: list[tuple[str, str]]
    files: list[Path] = field(default_factory=list)
    user_rule: Callable[[pd.DataFrame, pd.DataFrame, dict], "UserClasses"] = None
    rating_range: tuple[int, int] = RATING_RANGE
    repairs: dict[str, int] = field(default_factory=dict)
    item_keys: dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.user_rule is None:
            self.user_rule = new_users_by_first_time


@dataclass
class UserClasses:
    """A user rule's answer: ``is_new`` per kept rating row, the split time (None without time)
    and the manifest's one-line descriptions of the rules (``split_time_rule``, ``user_rule``)."""

    is_new: np.ndarray
    split_time: int | None
    rules: dict[str, str]


@dataclass
class ProtocolResult:
    """Kept ratings after the protocol.

    kept: DataFrame [user, item, rating, timestamp, user_is_new, item_is_new, scenario], sorted by
    user then time, exactly ``support_size + query_size`` rows per user.
    rules: the user rule's descriptions for the manifest (see :class:`UserClasses`).
    """

    kept: pd.DataFrame
    split_time: int | None
    rules: dict[str, str]
    train_users: list[int]
    test_users: list[int]
    n_ratings_without_metadata: int


def missing_to_category(value: str) -> str:
    """A stripped field value, with ``N/A`` and empty mapped to :data:`MISSING`."""
    value = value.strip()
    return MISSING if value in ("", "N/A") else value


def split_multi_value(text: str, strip_notes: bool = False) -> tuple[str, ...]:
    """Comma-separated values, stripped, de-duplicated in order; notes like ``(co-director)`` removed."""
    if strip_notes:
        text = _PARENTHETICAL_NOTE.sub("", text)
    return tuple(dict.fromkeys(missing_to_category(value) for value in text.split(",")))


def check_known_users(table: Table, rating_users: np.ndarray, users: pd.DataFrame) -> None:
    """Refuse the first rating (record of ``table``) whose user is not in ``users``."""
    unknown = np.flatnonzero(~np.isin(rating_users, users.index.to_numpy()))
    if unknown.size:
        k = int(unknown[0])
        raise table.error(k, f"user {rating_users[k]} is not in the users file, expected a known user id")


def parse_ratings(table: Table, users: pd.DataFrame) -> pd.DataFrame:
    """Ratings table -> DataFrame [user, item, rating, timestamp, line], users checked known."""
    ratings = pd.DataFrame({
        "user": int_column(table, "user", low=1),
        "item": int_column(table, "item", low=1),
        "rating": int_column(table, "rating", *RATING_RANGE),
        "timestamp": int_column(table, "timestamp", low=0),
        "line": table.line_numbers,
    })
    check_known_users(table, ratings["user"].to_numpy(), users)
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
        user_fields=[("gender", "categorical"), ("age", "categorical"), ("occupation", "categorical")],
        item_fields=[("rate", "categorical"), ("year", "categorical"), ("genre", "multi_hot"),
                     ("director", "multi_hot")],
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
        user_fields=[("gender", "categorical"), ("age", "categorical"), ("occupation", "categorical")],
        item_fields=[("year", "categorical"), ("genre", "multi_hot")],
        files=[raw_dir / name for name in ML100K_FILES],
    )


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the protocol's rounding (Python's ``round`` rounds half to even)."""
    return int(math.floor(x + 0.5))


def split_timestamp(timestamps: np.ndarray, ratio: float) -> int:
    """Timestamp at 0-based position ``min(round_half_up(ratio * N), N - 1)`` of the sorted N."""
    if len(timestamps) == 0:
        raise DataError("no ratings left after dropping movies without metadata, expected at least one")
    position = min(round_half_up(ratio * len(timestamps)), len(timestamps) - 1)
    return int(np.sort(timestamps, kind="stable")[position])


def new_users_by_first_time(ratings: pd.DataFrame, kept: pd.DataFrame, protocol: dict) -> UserClasses:
    """Rules 3 and 5: new iff the user's first kept rating is at or after ``split_time``."""
    split_time = split_timestamp(ratings["timestamp"].to_numpy(), protocol["time_split_ratio"])
    first_time = kept.groupby("user", sort=False)["timestamp"].transform("first")
    return UserClasses(
        is_new=(first_time >= split_time).to_numpy(),
        split_time=split_time,
        rules={"split_time_rule": "sorted_timestamps[min(floor(time_split_ratio * N + 0.5), N - 1)], 0-based, "
                                  "N = ratings of movies with metadata",
               "user_rule": "new iff first kept rating's timestamp >= split_time"},
    )


def first_ratings_per_user(ratings: pd.DataFrame, n_kept: int) -> pd.DataFrame:
    """The first ``n_kept`` ratings in (timestamp, line) order of users with at least ``n_kept``."""
    order = np.lexsort((ratings["line"].to_numpy(), ratings["timestamp"].to_numpy(), ratings["user"].to_numpy()))
    ordered = ratings.iloc[order].reset_index(drop=True)
    position = ordered.groupby("user", sort=False).cumcount().to_numpy()
    count = ordered.groupby("user", sort=False)["user"].transform("size").to_numpy()
    return ordered[(count >= n_kept) & (position < n_kept)].reset_index(drop=True)


def split_users(user_ids: np.ndarray, train_ratio: float, random_state: int) -> tuple[list[int], list[int]]:
    """Seeded permutation of the sorted ids; the first ``round_half_up(ratio * n)`` are train users."""
    permuted = np.random.default_rng(random_state).permutation(np.sort(user_ids))
    n_train = round_half_up(train_ratio * len(permuted))
    return sorted(int(u) for u in permuted[:n_train]), sorted(int(u) for u in permuted[n_train:])


def apply_protocol(raw: RawDataset, protocol: dict) -> ProtocolResult:
    """Apply SPEC section 1 to ``raw`` with ``protocol`` (support_size, query_size, ...)."""
    has_metadata = raw.ratings["item"].isin(raw.items.index).to_numpy()
    ratings = raw.ratings[has_metadata]
    if ratings.empty:
        raise DataError("no ratings left after dropping items without metadata, expected at least one")
    kept = first_ratings_per_user(ratings, protocol["support_size"] + protocol["query_size"])
    if kept.empty:
        raise DataError(
            f"{raw.files[0]}: no user has {protocol['support_size'] + protocol['query_size']} ratings "
            "of items with metadata, expected at least one such user"
        )
    user_classes = raw.user_rule(ratings, kept, protocol)
    kept["user_is_new"] = user_classes.is_new
    item_count = kept.groupby("item", sort=False)["item"].transform("size")
    kept["item_is_new"] = (item_count <= protocol["item_cold_max_ratings"]).to_numpy()
    kept["scenario"] = 2 * kept["user_is_new"].astype(np.int64) + kept["item_is_new"].astype(np.int64)
    train, test = split_users(kept["user"].unique(), protocol["train_ratio"], protocol["random_state"])
    return ProtocolResult(
        kept=kept.drop(columns="line"),
        split_time=user_classes.split_time,
        rules=user_classes.rules,
        train_users=train,
        test_users=test,
        n_ratings_without_metadata=int((~has_metadata).sum()),
    )


LOADERS = {"movielens": load_movielens_1m, "movielens-100k": load_movielens_100k, "synthetic": load_movielens_1m,
           "synthetic-types": load_movielens_1m}
RAW_FILES = {"movielens": ML1M_FILES, "movielens-100k": ML100K_FILES, "synthetic": ML1M_FILES,
             "synthetic-types": ML1M_FILES}
