"""Entry point: raw files -> ``OUT/manifest.json``, ``OUT/vocabularies.json``, ``OUT/tasks/*.pkl``.

    python -m data_prep.prepare_data --dataset movielens      --raw-dir RAW --out-dir OUT [--download]
    python -m data_prep.prepare_data --dataset movielens-100k --raw-dir RAW --out-dir OUT [--download]
    python -m data_prep.prepare_data --dataset bookcrossing   --raw-dir RAW --out-dir OUT [--download]
    python -m data_prep.prepare_data --dataset synthetic      --out-dir OUT [--n-users N] [--seed S]
    python -m data_prep.prepare_data --dataset synthetic-types --out-dir OUT [--n-users N] [--seed S]
    python -m data_prep.prepare_data --dataset synthetic-bookcrossing --out-dir OUT [--n-users N] [--seed S]

The output is built in a temporary sibling folder and renamed into place, so an interrupted run
leaves either the previous complete output or none. A re-run whose raw inputs (md5) and settings
equal those recorded in the manifest reuses the output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data_prep.download import DownloadError, download_missing, manual_instructions, missing_sources
from data_prep.prepare_list import build_vocabularies, encode_table, feature_schema, save_vocabularies
from data_prep.preprocess_BookCrossing import BX_DEFAULTS, BX_FILES, load_bookcrossing
from data_prep.preprocess_MovieLens import LOADERS, RAW_FILES, ProtocolResult, RawDataset, apply_protocol
from data_prep.raw_io import DataError, md5_of
from data_prep.synthetic import write_synthetic_bookcrossing, write_synthetic_movielens
from data_prep.synthetic_types import write_synthetic_types
from data_prep.task_io import FORMAT, MANIFEST, TASKS, VOCABULARIES, read_manifest, task_path, write_json, write_task

BOOKCROSSING_DATASETS = ("bookcrossing", "synthetic-bookcrossing")
DATASETS = (*LOADERS, *BOOKCROSSING_DATASETS)
DATASET_RAW_FILES = {**RAW_FILES, **{name: BX_FILES for name in BOOKCROSSING_DATASETS}}
SYNTHETIC_WRITERS = {"synthetic": write_synthetic_movielens, "synthetic-types": write_synthetic_types,
                     "synthetic-bookcrossing": write_synthetic_bookcrossing}
DATASET_DEFAULTS = {name: BX_DEFAULTS for name in BOOKCROSSING_DATASETS}
ITEM_KEYS = "item_keys.json"
DEFAULT_PROTOCOL = {
    "support_size": 15,
    "query_size": 5,
    "time_split_ratio": 0.8,
    "train_ratio": 0.8,
    "item_cold_max_ratings": 10,
    "random_state": 100,
}
DEFAULT_SYNTHETIC_USERS = 6040
SCENARIO_NAMES = ("existing_user_existing_item", "existing_user_new_item", "new_user_existing_item", "new_user_new_item")


def preparation_settings(dataset: str, protocol: dict, n_users: int) -> dict:
    """The settings that, with the raw checksums, decide whether an output can be reused."""
    settings = {"format": FORMAT, "dataset": dataset, **protocol}
    if dataset in SYNTHETIC_WRITERS:
        settings["synthetic"] = {"n_users": n_users, "seed": protocol["random_state"]}
    return settings


def raw_checksums(raw_dir: Path, dataset: str) -> dict[str, str] | None:
    """``{file name: md5}`` of the dataset's raw files, or None when one is missing."""
    paths = [Path(raw_dir) / name for name in DATASET_RAW_FILES[dataset]]
    if not all(path.is_file() for path in paths):
        return None
    return {path.name: md5_of(path) for path in paths}


def reusable_manifest(out_dir: Path, settings: dict, checksums: dict | None) -> dict | None:
    """The existing manifest when it records exactly these settings and checksums, else None."""
    if checksums is None or not (out_dir / MANIFEST).is_file() or not (out_dir / TASKS).is_dir():
        return None
    manifest = read_manifest(out_dir)
    same = manifest.get("settings") == settings and manifest.get("checksums") == checksums
    return manifest if same else None


def user_sets(result: ProtocolResult, item_codes: dict, protocol: dict) -> dict[int, tuple[dict, dict]]:
    """Per user id: (support SET, query SET) as plain data, in time order (see FORMAT.md)."""
    kept = result.kept
    n_per_user = protocol["support_size"] + protocol["query_size"]
    columns = {name: kept[name].to_numpy().reshape(-1, n_per_user).tolist()
               for name in ("user", "item", "rating", "timestamp", "scenario")}

    def rating_set(row: int, part: slice) -> dict:
        items = columns["item"][row][part]
        return {
            "item_ids": items,
            "ratings": columns["rating"][row][part],
            "timestamps": columns["timestamp"][row][part],
            "scenarios": columns["scenario"][row][part],
            "item_features": {name: [codes[i] for i in items] for name, codes in item_codes.items()},
        }

    support, query = slice(0, protocol["support_size"]), slice(protocol["support_size"], n_per_user)
    return {users[0]: (rating_set(row, support), rating_set(row, query)) for row, users in enumerate(columns["user"])}


def write_tasks(out_dir: Path, raw: RawDataset, result: ProtocolResult, vocabularies: dict, protocol: dict) -> None:
    """One ``tasks/<user_id>.pkl`` per kept user."""
    (out_dir / TASKS).mkdir()
    user_ids = result.train_users + result.test_users
    item_ids = result.kept["item"].unique()
    user_codes = encode_table(raw.users.loc[user_ids], raw.user_fields, vocabularies["user"])
    item_codes = encode_table(raw.items.loc[item_ids], raw.item_fields, vocabularies["item"])
    new_users = set(result.kept.loc[result.kept["user_is_new"], "user"].tolist())
    splits = {**{u: "train" for u in result.train_users}, **{u: "test" for u in result.test_users}}
    for user_id, (support, query) in user_sets(result, item_codes, protocol).items():
        write_task(task_path(out_dir, user_id), {
            "user_id": user_id,
            "split": splits[user_id],
            "user_is_new": user_id in new_users,
            "user_features": [user_codes[name][user_id] for name, _ in raw.user_fields],
            "support": support,
            "query": query,
        })


def scenario_counts(scenarios: np.ndarray) -> dict[str, int]:
    """``{scenario name: number of ratings}`` for codes 0..3."""
    counts = np.bincount(scenarios, minlength=4)
    return {name: int(count) for name, count in zip(SCENARIO_NAMES, counts)}


def build_manifest(raw: RawDataset, result: ProtocolResult, vocabularies: dict, settings: dict,
                   checksums: dict, protocol: dict) -> dict:
    """The manifest (FORMAT.md) with counts over the kept data."""
    kept = result.kept
    users_new = kept.groupby("user")["user_is_new"].first()
    items_new = kept.groupby("item")["item_is_new"].first()
    is_test_query = kept["user"].isin(result.test_users).to_numpy() & (
        kept.groupby("user").cumcount().to_numpy() >= protocol["support_size"])
    split_time = result.split_time
    rating_min, rating_max = raw.rating_range
    return {
        "format": FORMAT,
        "dataset": settings["dataset"],
        "protocol": {
            **protocol,
            "item_warm_min_ratings": protocol["item_cold_max_ratings"] + 1,
            **result.rules,
            "item_rule": "new iff kept ratings <= item_cold_max_ratings",
            "split_rule": "default_rng(random_state).permutation(sorted user ids); "
                          "first floor(train_ratio * n_users + 0.5) are train",
        },
        "split_time": split_time,
        "split_time_utc": None if split_time is None else datetime.fromtimestamp(split_time, tz=timezone.utc).isoformat(),
        "n_users": int(len(users_new)),
        "n_train_users": len(result.train_users),
        "n_test_users": len(result.test_users),
        "n_items": int(len(items_new)),
        "n_ratings": int(len(kept)),
        "n_raw_ratings": int(len(raw.ratings)),
        "n_ratings_without_metadata": result.n_ratings_without_metadata,
        **({"repairs": raw.repairs} if raw.repairs else {}),
        "n_warm_users": int((~users_new).sum()),
        "n_cold_users": int(users_new.sum()),
        "n_warm_items": int((~items_new).sum()),
        "n_cold_items": int(items_new.sum()),
        "scenario_counts": scenario_counts(kept["scenario"].to_numpy()),
        "test_query_scenario_counts": scenario_counts(kept.loc[is_test_query, "scenario"].to_numpy()),
        "rating_min": rating_min,
        "rating_max": rating_max,
        "n_rating_classes": rating_max - rating_min + 1,
        "features": {
            "user": feature_schema(raw.user_fields, vocabularies["user"]),
            "item": feature_schema(raw.item_fields, vocabularies["item"]),
        },
        "split": {"train": result.train_users, "test": result.test_users},
        "checksums": checksums,
        "settings": settings,
    }


def load_raw(dataset: str, raw_dir: Path, protocol: dict) -> RawDataset:
    """The dataset's reader: Book-Crossing's takes its settings (pooling, user rule)."""
    if dataset in BOOKCROSSING_DATASETS:
        return load_bookcrossing(raw_dir, protocol)
    return LOADERS[dataset](raw_dir)


def build_output(staging: Path, raw_dir: Path, settings: dict, protocol: dict) -> dict:
    """Read ``raw_dir``, apply the protocol and write the complete output into ``staging``."""
    dataset = settings["dataset"]
    checksums = raw_checksums(raw_dir, dataset)
    raw = load_raw(dataset, raw_dir, protocol)
    result = apply_protocol(raw, protocol)
    vocabularies = build_vocabularies(raw)
    write_tasks(staging, raw, result, vocabularies, protocol)
    save_vocabularies(vocabularies, staging / VOCABULARIES)
    if raw.item_keys:
        kept_items = sorted(result.kept["item"].unique().tolist())
        write_json(staging / ITEM_KEYS, {str(item): raw.item_keys[item] for item in kept_items})
    manifest = build_manifest(raw, result, vocabularies, settings, checksums, protocol)
    write_json(staging / MANIFEST, manifest)
    return manifest


def publish(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, replacing a previous output only after it is complete."""
    if out_dir.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, retired / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staging, out_dir)


def check_out_dir(out_dir: Path, raw_dir: Path | None) -> None:
    """Refuse to replace a folder that is not processed output, or one that holds the raw files."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise DataError(f"{out_dir}: exists and is not a processed-data folder (no {MANIFEST}); "
                        "expected a new or previously prepared --out-dir")
    if raw_dir is not None and raw_dir.resolve().is_relative_to(out_dir.resolve()):
        raise DataError(f"{raw_dir}: raw folder inside --out-dir {out_dir}, expected it outside "
                        "(the output folder is replaced as a whole)")


def ensure_raw_files(dataset: str, raw_dir: Path, download: bool, base_urls: dict | None) -> None:
    """Download missing raw files when asked, else refuse with instructions naming URLs and paths."""
    if not missing_sources(dataset, raw_dir):
        return
    if not download:
        raise DataError(manual_instructions(dataset, raw_dir, base_urls))
    download_missing(dataset, raw_dir, base_urls)


def prepare(dataset: str, raw_dir: Path | str | None, out_dir: Path | str, *, download: bool = False,
            base_urls: dict[str, str] | None = None, n_users: int = DEFAULT_SYNTHETIC_USERS,
            log=print, **protocol_settings) -> dict:
    """Prepare ``dataset`` from ``raw_dir`` into ``out_dir``; return the manifest.

    protocol_settings: any of DEFAULT_PROTOCOL's keys (support_size, query_size, random_state, ...),
    and for Book-Crossing datasets BX_DEFAULTS' keys (bx_user_rule, pooling thresholds); ``seed`` is
    accepted as an alias of random_state. For the synthetic datasets (SYNTHETIC_WRITERS), raw files
    are generated with seed random_state into ``raw_dir`` when given, else into ``out_dir/raw``.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}, expected one of {', '.join(DATASETS)}")
    if "seed" in protocol_settings:
        protocol_settings["random_state"] = protocol_settings.pop("seed")
    defaults = {**DEFAULT_PROTOCOL, **DATASET_DEFAULTS.get(dataset, {})}
    unknown = set(protocol_settings) - set(defaults)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}, expected some of {sorted(defaults)}")
    protocol = {**defaults, **protocol_settings}
    out_dir = Path(out_dir)
    raw_dir = Path(raw_dir) if raw_dir is not None else None
    synthetic = dataset in SYNTHETIC_WRITERS
    generate_in_output = synthetic and raw_dir is None
    check_out_dir(out_dir, None if generate_in_output else raw_dir)
    if not synthetic:
        if raw_dir is None:
            raise DataError(f"--raw-dir is required for {dataset!r}")
        ensure_raw_files(dataset, raw_dir, download, base_urls)
    settings = preparation_settings(dataset, protocol, n_users)
    raw_location = out_dir / "raw" if generate_in_output else raw_dir
    manifest = reusable_manifest(out_dir, settings, raw_checksums(raw_location, dataset))
    if manifest is not None:
        log(f"{out_dir}: reusing the existing output (same raw files and settings)")
        return manifest
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if synthetic:
            raw_location = staging / "raw" if generate_in_output else raw_dir
            SYNTHETIC_WRITERS[dataset](raw_location, n_users=n_users, seed=protocol["random_state"])
        manifest = build_output(staging, raw_location, settings, protocol)
        publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{out_dir}: {manifest['n_users']} users ({manifest['n_train_users']} train, "
        f"{manifest['n_test_users']} test), {manifest['n_items']} items, {manifest['n_ratings']} ratings")
    return manifest


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare_data", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--raw-dir", type=Path, help="raw files (required unless synthetic)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--download", action="store_true", help="fetch missing raw files first")
    parser.add_argument("--n-users", type=int, default=DEFAULT_SYNTHETIC_USERS, help="synthetic users")
    parser.add_argument("--seed", type=int, default=DEFAULT_PROTOCOL["random_state"],
                        help="user split seed (and synthetic generator seed)")
    parser.add_argument("--support-size", type=int, default=DEFAULT_PROTOCOL["support_size"])
    parser.add_argument("--query-size", type=int, default=DEFAULT_PROTOCOL["query_size"])
    arguments = parser.parse_args(argv)
    if arguments.dataset not in SYNTHETIC_WRITERS and arguments.raw_dir is None:
        parser.error(f"--raw-dir is required for --dataset {arguments.dataset}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    """Run the command line; exit status 2 with a one-line reason on bad input."""
    arguments = parse_arguments(argv)
    try:
        prepare(arguments.dataset, arguments.raw_dir, arguments.out_dir, download=arguments.download,
                n_users=arguments.n_users, random_state=arguments.seed,
                support_size=arguments.support_size, query_size=arguments.query_size)
    except (DataError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
