"""Measure data preparation at MovieLens-1M scale (synthetic: 6,040 users, ~1,000,000 ratings).

    python bench/prepare_speed.py [--n-users 6040] [--work-dir DIR]

Generates the raw files once (timed separately), then times ``prepare`` on them from scratch and
a re-run (reuse), reading everything back with its checks (``load_processed``) and the data
checksum, and reports the output size (bytes of all files, raw files excluded). Targets:
preparation under 60 s, output under 100 MB.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.prepare_data import prepare  # noqa: E402
from data_prep.synthetic import write_synthetic_movielens  # noqa: E402
from data_prep.task_io import data_checksum, load_processed  # noqa: E402


def folder_size(folder: Path) -> int:
    """Total bytes of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--n-users", type=int, default=6040)
    parser.add_argument("--work-dir", type=Path, default=None)
    arguments = parser.parse_args()
    work = arguments.work_dir or Path(tempfile.mkdtemp(prefix="mamo-prepare-speed-"))
    raw, out = work / "raw", work / "out"

    started = time.perf_counter()
    write_synthetic_movielens(raw, n_users=arguments.n_users, seed=100)
    generated = time.perf_counter() - started
    n_raw_ratings = sum(1 for _ in open(raw / "ratings.dat", "rb"))

    started = time.perf_counter()
    manifest = prepare("movielens", raw, out, log=lambda message: None)
    prepared = time.perf_counter() - started

    started = time.perf_counter()
    prepare("movielens", raw, out, log=lambda message: None)
    reused = time.perf_counter() - started

    started = time.perf_counter()
    load_processed(out)
    loaded = time.perf_counter() - started

    started = time.perf_counter()
    data_checksum(out)
    checksummed = time.perf_counter() - started

    print(f"raw: {arguments.n_users} users, {n_raw_ratings} ratings, {folder_size(raw) / 1e6:.1f} MB "
          f"(generated in {generated:.1f} s)")
    print(f"prepare: {prepared:.1f} s -> {manifest['n_users']} tasks, {manifest['n_items']} items; "
          f"output {folder_size(out) / 1e6:.1f} MB in {out}")
    print(f"re-run (reuse): {reused:.2f} s; load_processed (checked): {loaded:.2f} s; data_checksum: {checksummed:.2f} s")


if __name__ == "__main__":
    main()
