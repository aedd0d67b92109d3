"""Read the Book-Crossing dump (``BX-Users.csv``, ``BX-Books.csv``, ``BX-Book-Ratings.csv``).

The files are latin-1, one record per line, every field in double quotes and separated by ``;``
except the bare ``NULL`` of an unknown age. A field ends at ``";``, so stray semicolons and quotes
inside a field are kept. The dump's known damage is repaired and counted (``RawDataset.repairs``,
reported in the manifest under ``repairs``), or refused with a :class:`DataError`:

- a book line whose title ends in ``\\"`` swallowed the author's opening quote (7 fields, the
  year shifted into the author column): split at the ``\\";`` when that gives 8 fields with an
  integer year (``books_author_split_repaired``), else the book is dropped
  (``books_dropped_unparseable``); any other user or rating line with the wrong shape is an error;
- ``\\"`` inside a field becomes ``"`` (``escaped_quotes``); HTML entities such as ``&amp;`` are
  unescaped with ``html.unescape`` (``html_entities``);
- ISBNs are stripped and upper-cased (``isbns_normalised``); a repeated book or (user, book)
  rating after that keeps its first line (``duplicate_books_dropped``, ``duplicate_ratings_dropped``);
- implicit ratings (0) are dropped (``implicit_ratings_dropped``); ratings of ISBNs without a book
  row are dropped first by the protocol (``n_ratings_without_metadata``);
- ages NULL (``ages_null``) or outside 5-100 (``ages_out_of_range``) and years 0 or after the dump
  (2004) (``years_zero_or_future``) or not a number (``years_not_a_number``) become ``unknown``.

Book-Crossing has no timestamps: a user's ratings are ordered by their line in
``BX-Book-Ratings.csv`` (the task pickles' ``timestamps`` hold that line number), and users are
classed existing/new by :func:`new_users_by_id_or_at_random` (setting ``bx_user_rule``).
"""
from __future__ import annotations

import html
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.protocol import RawDataset, UserClasses, check_known_users, round_half_up
from data_prep.raw_io import DataError, Table, int_column, read_lines, unique_ids

BX_FILES = ("BX-Users.csv", "BX-Books.csv", "BX-Book-Ratings.csv")
USER_COLUMNS = ("User-ID", "Location", "Age")
BOOK_COLUMNS = ("ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher",
                "Image-URL-S", "Image-URL-M", "Image-URL-L")
RATING_COLUMNS = ("User-ID", "ISBN", "Book-Rating")
RATING_RANGE = (1, 10)
DUMP_YEAR = 2004
AGE_RANGE = (5, 100)
AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (55, "45-54"), (65, "55-64"),
               (math.inf, "65+"))
FIRST_DECADE = 1950
UNKNOWN = "unknown"
OTHER = "other"
USER_RULES = ("id_order", "random")
REPAIR_KINDS = (
    "books_author_split_repaired", "books_dropped_unparseable", "escaped_quotes", "html_entities",
    "isbns_normalised", "duplicate_books_dropped", "duplicate_ratings_dropped", "implicit_ratings_dropped",
    "ages_null", "ages_out_of_range", "years_zero_or_future", "years_not_a_number",
)
BX_DEFAULTS = {
    "bx_user_rule": "id_order",
    "bx_existing_user_ratio": 0.8,
    "bx_min_country_users": 20,
    "bx_min_author_books": 5,
    "bx_min_publisher_books": 5,
}
ESCAPED_QUOTE = '\\"'
_WHITESPACE = re.compile(r"\s+")


def split_record(line: str) -> list[str] | None:
    """``"a";"b;c";NULL`` -> ``['a', 'b;c', 'NULL']``; None when the line is not quoted fields."""
    if line.endswith(";NULL"):
        line = line[: -len("NULL")] + '"NULL"'
    if len(line) < 2 or not (line.startswith('"') and line.endswith('"')):
        return None
    return line[1:-1].split('";"')


def split_merged_author(fields: list[str]) -> list[str] | None:
    """Repair ``Title\\";Author`` merged into one field (7 fields): 8 fields, or None if ambiguous."""
    separator = ESCAPED_QUOTE + ";"
    if len(fields) != len(BOOK_COLUMNS) - 1 or sum(field.count(separator) for field in fields) != 1:
        return None
    if separator not in fields[1]:
        return None
    title, author = fields[1].split(separator)
    repaired = [fields[0], title, author, *fields[2:]]
    return repaired if repaired[3].strip().isdigit() else None


def read_bx_table(path: Path, columns: tuple[str, ...], repairs: Counter, repairable: bool = False) -> Table:
    """Records of one dump file (header checked) as a :class:`Table` keyed by column name.

    repairable: books only; a record of the wrong shape is repaired or dropped (and counted)
    instead of refused.
    """
    lines = read_lines(path, "latin-1")
    if split_record(lines[0]) != list(columns):
        expected = ";".join(f'"{name}"' for name in columns)
        raise DataError(f"{path}: line 1: header {lines[0][:120]!r}, expected {expected}")
    records, numbers = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = split_record(line)
        if fields is not None and len(fields) != len(columns) and repairable:
            fields = split_merged_author(fields)
            repairs["books_author_split_repaired" if fields else "books_dropped_unparseable"] += 1
        elif fields is None and repairable:
            repairs["books_dropped_unparseable"] += 1
        elif fields is None or len(fields) != len(columns):
            found = "not quoted fields" if fields is None else f"{len(fields)} fields"
            raise DataError(f"{path}: line {number}: expected {len(columns)} fields in double quotes "
                            f"separated by ';' ({';'.join(columns)}), found {found}")
        if fields:
            records.append(fields)
            numbers.append(number)
    values = list(zip(*records)) if records else [()] * len(columns)
    return Table(Path(path), {name: list(column) for name, column in zip(columns, values)},
                 np.asarray(numbers, dtype=np.int64))


def clean_text(values: list[str], repairs: Counter) -> list[str]:
    """``\\"`` -> ``"`` and HTML entities unescaped, each kind counted in ``repairs``."""
    cleaned = []
    for value in values:
        if ESCAPED_QUOTE in value:
            value = value.replace(ESCAPED_QUOTE, '"')
            repairs["escaped_quotes"] += 1
        if "&" in value and html.unescape(value) != value:
            value = html.unescape(value)
            repairs["html_entities"] += 1
        cleaned.append(value)
    return cleaned


def normalise_isbns(values: list[str], repairs: Counter) -> np.ndarray:
    """ISBNs stripped and upper-cased; changed ones counted."""
    normalised = np.asarray([value.strip().upper() for value in values], dtype=object)
    repairs["isbns_normalised"] += int(sum(a != b for a, b in zip(values, normalised)))
    return normalised


def normalise_name(value: str) -> str:
    """Author or publisher: whitespace collapsed, stripped, lower-cased; empty -> ``unknown``."""
    return _WHITESPACE.sub(" ", value).strip().lower() or UNKNOWN


def pool_rare(values: pd.Series, min_count: int) -> pd.Series:
    """Values seen fewer than ``min_count`` times become ``other`` (``unknown`` stays)."""
    counts = values.map(values.value_counts())
    return values.where((counts >= min_count) | (values == UNKNOWN), OTHER)


def country_of(location: str) -> str:
    """Last comma-separated part of a location, trimmed and lower-cased; empty or n/a -> unknown."""
    country = location.rsplit(",", 1)[-1].strip().lower()
    return UNKNOWN if country in ("", "n/a") else country


def age_bucket_of(age: int) -> str:
    """Age in years (within AGE_RANGE) -> its bucket name."""
    return next(name for upper, name in AGE_BUCKETS if age < upper)


def age_buckets(table: Table, repairs: Counter) -> list[str]:
    """Age column -> bucket names; NULL or outside 5-100 -> ``unknown`` (counted)."""
    buckets = []
    for k, value in enumerate(table.columns["Age"]):
        if value == "NULL":
            repairs["ages_null"] += 1
            buckets.append(UNKNOWN)
            continue
        try:
            age = int(value)
        except ValueError:
            raise table.error(k, f"field Age = {value!r}, expected an integer or NULL") from None
        if AGE_RANGE[0] <= age <= AGE_RANGE[1]:
            buckets.append(age_bucket_of(age))
        else:
            repairs["ages_out_of_range"] += 1
            buckets.append(UNKNOWN)
    return buckets


def year_bucket(text: str, repairs: Counter) -> str:
    """Year of publication -> decade (``1990s``; ``<1950`` before); 0, > 2004 or not a number -> unknown."""
    text = text.strip()
    if not text.isdigit():
        repairs["years_not_a_number"] += 1
        return UNKNOWN
    year = int(text)
    if year == 0 or year > DUMP_YEAR:
        repairs["years_zero_or_future"] += 1
        return UNKNOWN
    return f"<{FIRST_DECADE}" if year < FIRST_DECADE else f"{year // 10 * 10}s"


def read_users(path: Path, settings: dict, repairs: Counter) -> pd.DataFrame:
    """BX-Users.csv -> DataFrame indexed by user id: age bucket, country (rare ones pooled)."""
    table = read_bx_table(path, USER_COLUMNS, repairs)
    countries = pd.Series([country_of(location) for location in clean_text(table.columns["Location"], repairs)])
    return pd.DataFrame({
        "age": age_buckets(table, repairs),
        "country": pool_rare(countries, settings["bx_min_country_users"]).to_numpy(),
    }, index=pd.Index(unique_ids(table, "User-ID"), name="user"))


def read_books(path: Path, settings: dict, repairs: Counter) -> pd.DataFrame:
    """BX-Books.csv -> DataFrame indexed by normalised ISBN: year bucket, author, publisher."""
    table = read_bx_table(path, BOOK_COLUMNS, repairs, repairable=True)
    isbns = normalise_isbns(table.columns["ISBN"], repairs)
    authors = pd.Series([normalise_name(a) for a in clean_text(table.columns["Book-Author"], repairs)])
    publishers = pd.Series([normalise_name(p) for p in clean_text(table.columns["Publisher"], repairs)])
    books = pd.DataFrame({
        "isbn": isbns,
        "year": [year_bucket(year, repairs) for year in table.columns["Year-Of-Publication"]],
        "author": authors,
        "publisher": publishers,
    })
    repeated = books["isbn"].duplicated().to_numpy() | (books["isbn"] == "").to_numpy()
    repairs["duplicate_books_dropped"] += int(repeated.sum())
    books = books[~repeated].set_index("isbn")
    books["author"] = pool_rare(books["author"], settings["bx_min_author_books"])
    books["publisher"] = pool_rare(books["publisher"], settings["bx_min_publisher_books"])
    return books


def read_ratings(path: Path, users: pd.DataFrame, repairs: Counter) -> pd.DataFrame:
    """BX-Book-Ratings.csv -> explicit ratings [user, isbn, rating, timestamp, line] in file order.

    timestamp is the line number: the only order the dump has.
    """
    table = read_bx_table(path, RATING_COLUMNS, repairs)
    user_ids = int_column(table, "User-ID", low=1)
    check_known_users(table, user_ids, users)
    ratings = pd.DataFrame({
        "user": user_ids,
        "isbn": normalise_isbns(table.columns["ISBN"], repairs),
        "rating": int_column(table, "Book-Rating", 0, RATING_RANGE[1]),
        "timestamp": table.line_numbers,
        "line": table.line_numbers,
    })
    implicit = (ratings["rating"] == 0).to_numpy()
    repairs["implicit_ratings_dropped"] += int(implicit.sum())
    ratings = ratings[~implicit]
    repeated = ratings.duplicated(["user", "isbn"]).to_numpy()
    repairs["duplicate_ratings_dropped"] += int(repeated.sum())
    return ratings[~repeated].reset_index(drop=True)


def new_users_by_id_or_at_random(ratings: pd.DataFrame, kept: pd.DataFrame, protocol: dict) -> UserClasses:
    """Existing/new users without time (setting ``bx_user_rule``), over the kept users sorted by id.

    ``id_order``: the first ``floor(bx_existing_user_ratio * n + 0.5)`` ids are existing (ids as a
    proxy of sign-up order); ``random``: the same count taken from
    ``default_rng([random_state, 1]).permutation(ids)``, a stream apart from the train/test split's.
    """
    user_ids = np.unique(kept["user"].to_numpy())
    n_existing = round_half_up(protocol["bx_existing_user_ratio"] * len(user_ids))
    if protocol["bx_user_rule"] == "random":
        user_ids = np.random.default_rng([protocol["random_state"], 1]).permutation(user_ids)
        rule = ("new iff not among the first floor(bx_existing_user_ratio * n + 0.5) of "
                "default_rng([random_state, 1]).permutation(sorted kept user ids)")
    else:
        rule = "new iff not among the floor(bx_existing_user_ratio * n + 0.5) smallest kept user ids"
    return UserClasses(
        is_new=kept["user"].isin(user_ids[n_existing:]).to_numpy(),
        split_time=None,
        rules={"split_time_rule": "none: Book-Crossing has no timestamps",
               "order_rule": "a user's ratings in BX-Book-Ratings.csv line order (timestamps hold the line)",
               "user_rule": rule},
    )


def load_bookcrossing(raw_dir: Path, settings: dict) -> RawDataset:
    """Read the three dump files from ``raw_dir``; settings: BX_DEFAULTS' keys (pooling, user rule)."""
    if settings["bx_user_rule"] not in USER_RULES:
        raise DataError(f"bx_user_rule = {settings['bx_user_rule']!r}, expected one of {USER_RULES}")
    raw_dir = Path(raw_dir)
    repairs = Counter()
    users = read_users(raw_dir / "BX-Users.csv", settings, repairs)
    books = read_books(raw_dir / "BX-Books.csv", settings, repairs)
    ratings = read_ratings(raw_dir / "BX-Book-Ratings.csv", users, repairs)
    isbns = np.unique(np.concatenate([books.index.to_numpy(dtype=object), ratings["isbn"].to_numpy()]).astype(str))
    book_ids = np.searchsorted(isbns, books.index.to_numpy(dtype=str)) + 1
    ratings["item"] = np.searchsorted(isbns, ratings["isbn"].to_numpy(dtype=str)) + 1
    return RawDataset(
        ratings=ratings[["user", "item", "rating", "timestamp", "line"]].astype(np.int64),
        users=users,
        items=books.set_axis(pd.Index(book_ids, name="item")),
        user_fields=[("age", "categorical"), ("country", "categorical")],
        item_fields=[("year", "categorical"), ("author", "categorical"), ("publisher", "categorical")],
        files=[raw_dir / "BX-Book-Ratings.csv", raw_dir / "BX-Users.csv", raw_dir / "BX-Books.csv"],
        user_rule=new_users_by_id_or_at_random,
        rating_range=RATING_RANGE,
        repairs={kind: repairs[kind] for kind in sorted(REPAIR_KINDS)},
        item_keys=dict(zip(book_ids.tolist(), books.index.tolist())),
    )
