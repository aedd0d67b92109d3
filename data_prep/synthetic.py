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

:func:`write_synthetic_bookcrossing` writes the Book-Crossing dump's three files the same way
(user types tied to age and country, items' appeal tied to author, publisher and decade, ratings
1-10 plus implicit 0s) with a little of the real dump's damage (see its docstring).

Both writers only write into a folder that is empty or that they wrote themselves: the folder
then holds :data:`GENERATED_MARKER`, a JSON record of the generator's settings and of the md5 of
every file it wrote. A folder with any other file, or with a generated file changed since, is
refused with a :class:`DataError`, so real raw data is never overwritten.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from data_prep.preprocess_MovieLens import AGE_BUCKETS
from data_prep.raw_io import DataError, md5_of

GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Family",
          "Fantasy", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
RATES = ("G", "NC-17", "PG", "PG-13", "R", "UNRATED")
RATE_PROBABILITIES = (0.05, 0.01, 0.15, 0.15, 0.43, 0.21)
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
GENERATED_MARKER = ".mamo-synthetic"


def read_generated_marker(raw_dir: Path) -> dict | None:
    """The marker's record ``{"generator", "settings", "files": {name: md5 | None}}``, or None if absent or unreadable."""
    try:
        record = json.loads((raw_dir / GENERATED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    return record if isinstance(files, dict) else None


def check_generated_folder(raw_dir: Path) -> dict[str, str | None]:
    """Refuse ``raw_dir`` unless it is absent, empty, or holds only files the generators wrote.

    Returns the marker's ``{file name: md5}`` (empty when there is none). An md5 of None marks a
    file whose writing was interrupted: it is the generator's, and may be replaced.
    """
    raw_dir = Path(raw_dir)
    if raw_dir.exists() and not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: not a folder, expected a folder for the synthetic raw files")
    entries = sorted(raw_dir.iterdir()) if raw_dir.exists() else []
    if not entries:
        return {}
    record = read_generated_marker(raw_dir)
    if record is None:
        names = ", ".join(path.name for path in entries[:3])
        raise DataError(f"{raw_dir}: holds files the synthetic generator did not write ({names}), expected an "
                        f"empty folder or one it wrote (with {GENERATED_MARKER}); refusing to overwrite them")
    for path in entries:
        if path.name == GENERATED_MARKER:
            continue
        if path.name not in record["files"] or path.is_symlink() or not path.is_file():
            raise DataError(f"{path}: not written by the synthetic generator (not in {GENERATED_MARKER}), "
                            "expected only generated files in this folder; refusing to overwrite it")
        expected = record["files"][path.name]
        if expected is not None and md5_of(path) != expected:
            raise DataError(f"{path}: changed since the synthetic generator wrote it (md5 {expected} expected); "
                            "refusing to overwrite it")
    return record["files"]


def write_generated(raw_dir: Path, files: dict[str, bytes], settings: dict) -> None:
    """Write ``files`` (``{name: content}``) into ``raw_dir`` after :func:`check_generated_folder`.

    The marker names the files before they are written (md5 None) and records their md5 after, so
    that an interrupted run leaves a folder the next run recognises. Generated files of an earlier
    run that this one does not write again (another dataset's) are removed.
    """
    raw_dir = Path(raw_dir)
    previous = check_generated_folder(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    marker = raw_dir / GENERATED_MARKER

    def write_marker(md5s: dict) -> None:
        record = {"generator": __name__, "settings": settings, "files": md5s}
        marker.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    write_marker({**previous, **dict.fromkeys(files)})
    for name in set(previous) - set(files):
        (raw_dir / name).unlink(missing_ok=True)
    for name, content in files.items():
        (raw_dir / name).write_bytes(content)
    write_marker({name: hashlib.md5(content).hexdigest() for name, content in files.items()})


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


def draw_ratings(rng: np.random.Generator, users: dict, items: dict, noise_std: float = NOISE_STD) -> dict[str, np.ndarray]:
    """Rating events (user index, item index, rating 1..5, timestamp), grouped by user."""
    n_users, n_items = len(users["type"]), len(items["year"])
    counts = np.minimum(20 + np.floor(rng.lognormal(np.log(105), 1.0, n_users)), 0.6 * n_items).astype(np.int64)
    late = rng.random(n_users) < LATE_USER_PROBABILITY
    counts[late] = np.maximum(20, counts[late] // 3)
    popularity = items["popularity"] / items["popularity"].sum()
    item = np.concatenate([rng.choice(n_items, size=k, replace=False, p=popularity) for k in counts])
    user = np.repeat(np.arange(n_users), counts)
    score = (3.6 + users["bias"][user] + AFFINITY_SCALE * items["affinity"][users["type"][user], item]
             + rng.normal(0.0, noise_std, len(user)))
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


def check_n_users(n_users: int) -> None:
    if n_users < 10:
        raise ValueError(f"n_users = {n_users}, expected at least 10")


def movielens_item_count(n_users: int) -> int:
    """Items to draw for n_users users: ML-1M's items per user, at least 100."""
    return max(100, round(ITEMS_PER_USER * n_users))


def write_synthetic_movielens(raw_dir: Path, n_users: int = 6040, seed: int = 100) -> None:
    """Write ``ratings.dat``, ``users.dat``, ``movies_extrainfos.dat`` (ML-1M format) into ``raw_dir``."""
    check_n_users(n_users)
    rng = np.random.default_rng(seed)
    users = draw_users(rng, n_users)
    items = draw_items(rng, movielens_item_count(n_users))
    write_generated(raw_dir, movielens_files(users, items, draw_ratings(rng, users, items)),
                    {"dataset": "synthetic", "n_users": n_users, "seed": seed})


def movielens_files(users: dict, items: dict, ratings: dict) -> dict[str, bytes]:
    """Drawn users, items and ratings as ML-1M's three raw files: ``{file name: content}``."""
    n_items = len(items["year"])
    user_lines = [f"{u + 1}::{g}::{a}::{o}::{z}" for u, (g, a, o, z) in
                  enumerate(zip(users["gender"], users["age"].tolist(), users["occupation"].tolist(), users["zip"].tolist()))]
    hidden = items_without_metadata(n_items)
    movie_lines = [movie_line(items, i, i + 1) for i in range(n_items) if i not in hidden]
    columns = zip((ratings["user"] + 1).tolist(), (ratings["item"] + 1).tolist(),
                  ratings["rating"].tolist(), ratings["timestamp"].tolist())
    rating_lines = [f"{u}::{i}::{r}::{t}" for u, i, r, t in columns]
    return {
        "users.dat": ("\n".join(user_lines) + "\n").encode("latin-1"),
        "movies_extrainfos.dat": ("\r\n".join(movie_lines) + "\r\n").encode("utf-8"),
        "ratings.dat": ("\n".join(rating_lines) + "\n").encode("latin-1"),
    }


BX_COUNTRIES = ("usa", "canada", "united kingdom", "germany", "spain", "australia")
BX_RARE_COUNTRIES = ("kenya", "iceland")
BX_AGE_CENTRES = (16, 22, 30, 40, 50, 60, 70)
BX_IMPLICIT_PROBABILITY = 0.3
BX_ITEMS_PER_USER = 1.2
BX_HEADERS = {
    "BX-Users.csv": '"User-ID";"Location";"Age"',
    "BX-Books.csv": '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";'
                    '"Image-URL-S";"Image-URL-M";"Image-URL-L"',
    "BX-Book-Ratings.csv": '"User-ID";"ISBN";"Book-Rating"',
}


def bx_user_line(rng: np.random.Generator, user_id: int, user_type: int) -> str:
    """One BX-Users.csv record: age and country follow the type most of the time; some damage."""
    follows = rng.random(2) < 0.75
    country = BX_COUNTRIES[user_type if follows[0] else rng.integers(len(BX_COUNTRIES))]
    if user_id % 29 == 0:
        country = BX_RARE_COUNTRIES[user_id % 2]
    location = "n/a, n/a, " if user_id % 31 == 0 else f"town {user_id % 7}, region &amp; co, {country}"
    centre = BX_AGE_CENTRES[user_type if follows[1] else rng.integers(len(BX_AGE_CENTRES))]
    age = "NULL" if user_id % 9 == 0 else f'"{(0, 150)[user_id % 2] if user_id % 43 == 0 else centre + rng.integers(-2, 3)}"'
    return f'"{user_id}";"{location}";{age}'


def bx_isbn(index: int) -> str:
    """A 10-character ISBN for item ``index``; every seventh ends in X."""
    return f"{100_000_000 + index:09d}" + ("X" if index % 7 == 0 else str(index % 10))


def bx_book_line(index: int, author: int, publisher: int, year: int) -> str:
    """One BX-Books.csv record; item 1's title swallows its author's quote (the dump's damage)."""
    isbn = bx_isbn(index)
    year_text = "0" if index % 23 == 4 else ("2030" if index % 47 == 6 else str(year))
    publisher_name = "Simon &amp; Schuster" if publisher == 0 else f"Publisher {publisher}"
    urls = ";".join(f'"http://images.example/{isbn}.{size}.jpg"' for size in "SML")
    if index == 1:
        return f'"{isbn}";"Readers (Level 4)\\";Author {author}";"{year_text}";"{publisher_name}";{urls}'
    return f'"{isbn}";"Book {index}; a &quot;story&quot;";"Author {author}";"{year_text}";"{publisher_name}";{urls}'


def write_synthetic_bookcrossing(raw_dir: Path, n_users: int = 6040, seed: int = 100) -> None:
    """Write ``BX-Users.csv``, ``BX-Books.csv``, ``BX-Book-Ratings.csv`` (latin-1) into ``raw_dir``.

    Structure: users of N_TYPES types (age and country follow the type 75 % of the time); each
    item's appeal per type is a function of its author, publisher and decade; rating =
    clip(round(7 + user bias + 1.6 * appeal + noise), 1, 10). Damage planted as in the real dump:
    HTML entities, NULL and out-of-range ages, years 0 and 2030, implicit 0 ratings, ratings of
    ISBNs without a book row, lower-case ISBNs, one book line with ``\\";`` (repairable) and 20 %
    more users without any rating. Deterministic for a given ``(n_users, seed)``.
    """
    check_n_users(n_users)
    rng = np.random.default_rng(seed)
    n_items = max(100, round(BX_ITEMS_PER_USER * n_users))
    n_authors, n_publishers = max(5, n_items // 4), 12
    user_type = rng.integers(0, N_TYPES, n_users + n_users // 5)
    author = np.minimum(rng.zipf(1.5, n_items) - 1, n_authors - 1)
    publisher = rng.integers(0, n_publishers, n_items)
    year = np.clip(np.round(2004 - rng.gamma(2.0, 8.0, n_items)), 1930, 2004).astype(np.int64)
    decade = (year - 1930) // 10
    appeal = (rng.normal(0, 1.0, (N_TYPES, n_authors))[:, author] + rng.normal(0, 0.6, (N_TYPES, n_publishers))[:, publisher]
              + rng.normal(0, 0.6, (N_TYPES, decade.max() + 1))[:, decade] + rng.normal(0, 0.2, (N_TYPES, n_items)))
    appeal = (appeal - appeal.mean()) / appeal.std()
    popularity = rng.permutation(np.arange(1, n_items + 1) ** -0.8)
    popularity /= popularity.sum()
    bias = rng.normal(0, 0.5, n_users)

    user_lines = [bx_user_line(rng, u + 1, int(t)) for u, t in enumerate(user_type)]
    book_lines = [bx_book_line(i, int(author[i]), int(publisher[i]), int(year[i])) for i in range(n_items)]
    rating_lines = []
    for user in range(n_users):
        count = int(np.minimum(15 + rng.lognormal(np.log(20), 0.7), 0.6 * n_items))
        for item in rng.choice(n_items, size=count, replace=False, p=popularity):
            score = 7 + bias[user] + 1.6 * appeal[user_type[user], item] + rng.normal(0, 0.9)
            rating = 0 if rng.random() < BX_IMPLICIT_PROBABILITY else int(np.clip(np.round(score), 1, 10))
            isbn = bx_isbn(item).lower() if item % 5 == 0 else bx_isbn(item)
            rating_lines.append(f'"{user + 1}";"{isbn}";"{rating}"')
        if user % 11 == 0:
            rating_lines.append(f'"{user + 1}";"99999999{user % 10}9";"{rng.integers(1, 11)}"')
    files = {name: ("\r\n".join([BX_HEADERS[name], *lines]) + "\r\n").encode("latin-1")
             for name, lines in (("BX-Users.csv", user_lines), ("BX-Books.csv", book_lines),
                                 ("BX-Book-Ratings.csv", rating_lines))}
    write_generated(raw_dir, files, {"dataset": "synthetic-bookcrossing", "n_users": n_users, "seed": seed})
