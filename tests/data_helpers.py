"""Helpers for the data-preparation tests: tiny raw files in the MovieLens-1M format."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.prepare_data import prepare
from data_prep.task_io import load_processed, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ML1M_SIDE = SHARED_DATA / "ml-1m-side"
ML100K = SHARED_DATA / "ml-100k"


def movie_record(item_id: int, genre: str = "Comedy, Drama", director: str = "Ann Lee", rate: str = "PG",
                 year: str = "1995") -> str:
    """One ``movies_extrainfos.dat`` line (without line end), 11 fields."""
    return "::".join([str(item_id), f"Movie {item_id}", year, rate, f"01 Jan {year}", genre, director,
                      "N/A", "N/A", "A plot.", "N/A"])


def write_ml1m(raw_dir: Path, ratings: list[tuple[int, int, int, int]], movie_ids=None, user_ids=None) -> Path:
    """Write tiny ML-1M raw files; ratings are (user, item, rating, timestamp) in file order.

    movie_ids: items with a metadata row (default: every rated item); user_ids likewise.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    movie_ids = sorted({r[1] for r in ratings}) if movie_ids is None else movie_ids
    user_ids = sorted({r[0] for r in ratings}) if user_ids is None else user_ids
    (raw_dir / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
    (raw_dir / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::25::{u % 21}::12345\n" for u in user_ids))
    (raw_dir / "movies_extrainfos.dat").write_bytes(
        "".join(movie_record(i) + "\r\n" for i in movie_ids).encode("utf-8"))
    return raw_dir


def random_ratings(user_ids, movie_ids, seed: int, per_user=(20, 60), start=956_703_932,
                   span=3 * 365 * 86_400) -> list[tuple[int, int, int, int]]:
    """Random ratings over the given real ids, per user a count in ``per_user`` (inclusive)."""
    rng = np.random.default_rng(seed)
    movie_ids = np.asarray(sorted(movie_ids))
    ratings = []
    for user in sorted(user_ids):
        count = int(rng.integers(per_user[0], per_user[1] + 1))
        items = rng.choice(movie_ids, size=min(count, len(movie_ids)), replace=False)
        times = start + rng.integers(0, span, size=len(items))
        ratings += [(int(user), int(i), int(rng.integers(1, 6)), int(t)) for i, t in zip(items, times)]
    return ratings


def write_ml100k(raw_dir: Path, ratings: list[tuple[int, int, int, int]]) -> Path:
    """Write tiny ML-100K raw files (``u.data``, ``u.user``, ``u.item``) for every rated user and item."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    user_ids, item_ids = sorted({r[0] for r in ratings}), sorted({r[1] for r in ratings})
    (raw_dir / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (raw_dir / "u.user").write_text("".join(f"{u}|{20 + u}|{'MF'[u % 2]}|student|12345\n" for u in user_ids))
    flags = "|".join("1" if k == 5 else "0" for k in range(19))
    (raw_dir / "u.item").write_text("".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{flags}\n" for i in item_ids))
    return raw_dir


def folder_bytes(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder``."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare_generated(dataset: str, out: Path, n_users: int, seed: int) -> dict:
    """Generate and prepare a synthetic ``dataset`` into ``out`` (raw files in ``out/raw``), quietly."""
    return prepare(dataset, None, out, n_users=n_users, seed=seed, log=lambda m: None)


def generated_dataset(tmp_path_factory, dataset: str, n_users: int, seed: int) -> tuple[Path, dict, dict]:
    """(output folder, manifest, tasks) of a freshly generated and prepared synthetic ``dataset``."""
    out = tmp_path_factory.mktemp(dataset) / "out"
    prepare_generated(dataset, out, n_users, seed)
    manifest, tasks = load_processed(out)
    return out, manifest, tasks


def assert_seed_decides_the_bytes(dataset: str, out: Path, n_users: int, seed: int, scratch: Path) -> None:
    """Preparing ``dataset`` again with ``seed`` rebuilds ``out`` byte for byte; seed + 1 gives other ratings."""
    prepare_generated(dataset, scratch / "again", n_users, seed)
    assert folder_bytes(scratch / "again") == folder_bytes(out)
    other = prepare_generated(dataset, scratch / "other", n_users, seed + 1)
    assert other["checksums"]["ratings.dat"] != read_manifest(out)["checksums"]["ratings.dat"]
