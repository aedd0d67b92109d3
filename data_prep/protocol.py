"""The data protocol, the same for every dataset: raw ratings -> kept ratings, scenario codes, user split.

A dataset's reader turns its raw files into a :class:`RawDataset` (ratings in file order, user and
item features as strings); :func:`apply_protocol` then applies the protocol's nine rules to it,
vectorised. The rules, with the reasons behind each, are written out once in ``docs/data.md``
(section "The protocol"); each function below names the rules it implements. A dataset without
time (Book-Crossing) brings its own ``user_rule``; everything else is shared.

This module also owns the protocol's constants: :data:`DEFAULT_PROTOCOL` (the settings every
prepared folder records and is compared on) and :data:`SCENARIOS` (the names of scenario codes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data_prep.raw_io import DataError, Table, is_int, is_number

DEFAULT_PROTOCOL = {
    "support_size": 15,  # support ratings per user (the first in time)
    "query_size": 5,  # query ratings per user (the last in time)
    "time_split_ratio": 0.8,  # split_time = the timestamp at this share of all ratings sorted by time
    "train_ratio": 0.8,  # share of users that are training users (the released code's split_ratio)
    "item_cold_max_ratings": 10,  # an item is new iff it has at most this many kept ratings
    "random_state": 100,  # seed of the train/test user split (and of the synthetic generators)
}
"""Protocol settings and their defaults; the one source of these values for data_prep and configs.py."""

SETTING_RULES = {  # setting: (what it must be, its test)
    "support_size": ("an integer >= 1", lambda v: is_int(v) and v >= 1),
    "query_size": ("an integer >= 1", lambda v: is_int(v) and v >= 1),
    "time_split_ratio": ("a number in [0, 1]", lambda v: is_number(v) and 0 <= v <= 1),
    "train_ratio": ("a number in [0, 1]", lambda v: is_number(v) and 0 <= v <= 1),
    "item_cold_max_ratings": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
    "random_state": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
}


def check_protocol(protocol: dict) -> None:
    """Refuse a protocol setting of the wrong type or range with a one-line DataError."""
    for key, (expected, is_valid) in SETTING_RULES.items():
        if not is_valid(protocol[key]):
            raise DataError(f"protocol setting {key} = {protocol[key]!r}, expected {expected}")


SCENARIOS = (
    "existing_user_existing_item",
    "existing_user_new_item",
    "new_user_existing_item",
    "new_user_new_item",
)
"""Scenario names; the index is the scenario code (0..3) = 2 * user_is_new + item_is_new."""

ITEM_RULE = "new iff kept ratings <= item_cold_max_ratings"
SPLIT_RULE = ("default_rng(random_state).permutation(sorted user ids); "
              "first floor(train_ratio * n_users + 0.5) are train")


@dataclass
class UserClasses:
    """A user rule's answer: ``is_new`` per kept rating row, the split time (None without time)
    and the manifest's one-line descriptions of the rules (``split_time_rule``, ``user_rule``)."""

    is_new: np.ndarray
    split_time: int | None
    rules: dict[str, str]


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the protocol's rounding (Python's ``round`` rounds half to even)."""
    return int(math.floor(x + 0.5))


def split_timestamp(timestamps: np.ndarray, ratio: float) -> int:
    """Rule 3: the timestamp at 0-based position ``min(round_half_up(ratio * N), N - 1)`` of the sorted N."""
    if len(timestamps) == 0:
        raise DataError("no ratings left after dropping items without metadata, expected at least one")
    position = min(round_half_up(ratio * len(timestamps)), len(timestamps) - 1)
    return int(np.sort(timestamps, kind="stable")[position])


def new_users_by_first_time(ratings: pd.DataFrame, kept: pd.DataFrame, protocol: dict) -> UserClasses:
    """Rules 3 and 5: new iff the user's first kept rating is at or after ``split_time``.

    ratings: every rating of an item with metadata (rule 1 applied); kept: the kept rows (rule 4).
    """
    split_time = split_timestamp(ratings["timestamp"].to_numpy(), protocol["time_split_ratio"])
    first_time = kept.groupby("user", sort=False)["timestamp"].transform("first")
    return UserClasses(
        is_new=(first_time >= split_time).to_numpy(),
        split_time=split_time,
        rules={"split_time_rule": "sorted_timestamps[min(floor(time_split_ratio * N + 0.5), N - 1)], 0-based, "
                                  "N = ratings of movies with metadata",
               "user_rule": "new iff first kept rating's timestamp >= split_time"},
    )


@dataclass
class RawDataset:
    """Raw data of one dataset, before the protocol.

    ratings: DataFrame [user, item, rating, timestamp, line] (int64, file order; line is 1-based).
    users: DataFrame indexed by user id, one str column per user field.
    items: DataFrame indexed by item id; categorical fields are str, multi-hot fields tuples of str.
    user_fields / item_fields: ``[(name, "categorical" | "multi_hot"), ...]`` in output order.
    rating_range: (lowest, highest) rating.
    files: the raw files read; ``files[0]`` holds the ratings.
    user_rule: classes kept users existing/new (default: first rating at or after split_time).
    repairs: ``{kind of damage: count}`` repaired or dropped while reading (reported in the manifest).
    item_keys: ``{item id: the raw file's key}`` where raw keys are not integers (Book-Crossing ISBNs).
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_fields: list[tuple[str, str]]
    item_fields: list[tuple[str, str]]
    rating_range: tuple[int, int]
    files: list[Path] = field(default_factory=list)
    user_rule: Callable[[pd.DataFrame, pd.DataFrame, dict], UserClasses] = new_users_by_first_time
    repairs: dict[str, int] = field(default_factory=dict)
    item_keys: dict[int, str] = field(default_factory=dict)


@dataclass
class ProtocolResult:
    """Kept ratings after the protocol.

    kept: DataFrame [user, item, rating, timestamp, user_is_new, item_is_new, scenario], sorted by
    user then time, exactly ``support_size + query_size`` rows per user.
    rules: one-line descriptions of the rules for the manifest (the user rule's, then item and split).
    train_users / test_users: sorted user ids.
    """

    kept: pd.DataFrame
    split_time: int | None
    rules: dict[str, str]
    train_users: list[int]
    test_users: list[int]
    n_ratings_without_metadata: int


def check_known_users(table: Table, rating_users: np.ndarray, users: pd.DataFrame) -> None:
    """Refuse the first rating (record of ``table``) whose user is not in ``users``."""
    unknown = np.flatnonzero(~np.isin(rating_users, users.index.to_numpy()))
    if unknown.size:
        k = int(unknown[0])
        raise table.error(k, f"user {rating_users[k]} is not in the users file, expected a known user id")


def first_ratings_per_user(ratings: pd.DataFrame, n_kept: int) -> pd.DataFrame:
    """Rules 2 and 4: the first ``n_kept`` ratings in (timestamp, line) order of users with at least ``n_kept``."""
    order = np.lexsort((ratings["line"].to_numpy(), ratings["timestamp"].to_numpy(), ratings["user"].to_numpy()))
    ordered = ratings.iloc[order].reset_index(drop=True)
    position = ordered.groupby("user", sort=False).cumcount().to_numpy()
    count = ordered.groupby("user", sort=False)["user"].transform("size").to_numpy()
    return ordered[(count >= n_kept) & (position < n_kept)].reset_index(drop=True)


def split_users(user_ids: np.ndarray, train_ratio: float, random_state: int) -> tuple[list[int], list[int]]:
    """Rule 9: seeded permutation of the sorted ids; the first ``round_half_up(ratio * n)`` are train users."""
    permuted = np.random.default_rng(random_state).permutation(np.sort(user_ids))
    n_train = round_half_up(train_ratio * len(permuted))
    return sorted(int(u) for u in permuted[:n_train]), sorted(int(u) for u in permuted[n_train:])


def apply_protocol(raw: RawDataset, protocol: dict) -> ProtocolResult:
    """All nine rules on ``raw`` with ``protocol`` (:data:`DEFAULT_PROTOCOL`'s keys and the dataset's own).

    Rule 1 (drop ratings of items without metadata) comes first; rule 8 (support = first
    ``support_size`` of each user's kept rows, query = the rest) is the row order of ``kept``.
    """
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
        rules={**user_classes.rules, "item_rule": ITEM_RULE, "split_rule": SPLIT_RULE},
        train_users=train,
        test_users=test,
        n_ratings_without_metadata=int((~has_metadata).sum()),
    )
