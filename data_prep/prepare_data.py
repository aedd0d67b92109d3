"""Entry point: raw files -> ``OUT/manifest.json``, ``OUT/vocabularies.json``, ``OUT/tasks/*.pkl``.

    python -m data_prep.prepare_data --dataset movielens      --raw-dir RAW --out-dir OUT [--download]
    python -m data_prep.prepare_data --dataset movielens-100k --raw-dir RAW --out-dir OUT [--download]
    python -m data_prep.prepare_data --dataset bookcrossing   --raw-dir RAW --out-dir OUT [--download]
    python -m data_prep.prepare_data --dataset synthetic      --out-dir OUT [--n-users N] [--seed S]
    python -m data_prep.prepare_data --dataset synthetic-types --out-dir OUT [--n-users N] [--seed S]
    python -m data_prep.prepare_data --dataset synthetic-bookcrossing --out-dir OUT [--n-users N] [--seed S]

The output is built in a work folder beside OUT and renamed into place, so an interrupted run
leaves either the previous complete output or none (and a work folder that the next run removes).
A re-run whose raw inputs (md5) and settings equal those recorded in the manifest reuses the output.
:func:`ensure_prepared` is the trainer's entry: it never uses a folder prepared with other settings.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data_prep.download import DownloadError, download_missing, manual_instructions, missing_sources
from data_prep.prepare_list import build_vocabularies, encode_table, feature_schema, save_vocabularies
from data_prep.preprocess_BookCrossing import BX_DEFAULTS, BX_FILES, load_bookcrossing
from data_prep.preprocess_MovieLens import LOADERS, RAW_FILES
from data_prep.protocol import (DEFAULT_PROTOCOL, SCENARIOS, ProtocolResult, RawDataset, apply_protocol,
                                check_protocol)
from data_prep.raw_io import DataError, md5_of
from data_prep.synthetic import check_generated_folder, write_synthetic_bookcrossing, write_synthetic_movielens
from data_prep.synthetic_types import write_synthetic_types
from data_prep.task_io import (FORMAT, ITEM_KEYS, MANIFEST, TASKS, VOCABULARIES, read_manifest, task_path,
                               write_json, write_task)

BOOKCROSSING_DATASETS = ("bookcrossing", "synthetic-bookcrossing")
DATASETS = (*LOADERS, *BOOKCROSSING_DATASETS)
DATASET_RAW_FILES = {**RAW_FILES, **{name: BX_FILES for name in BOOKCROSSING_DATASETS}}
SYNTHETIC_WRITERS = {"synthetic": write_synthetic_movielens, "synthetic-types": write_synthetic_types,
                     "synthetic-bookcrossing": write_synthetic_bookcrossing}
DATASET_DEFAULTS = {name: BX_DEFAULTS for name in BOOKCROSSING_DATASETS}
DEFAULT_SYNTHETIC_USERS = 6040
WORK_MARKER = ".mamo-prepare"
"""File in every work folder this module creates: ``{"pid", "host"}`` of the preparing process."""
ON_MISMATCH = ("error", "new-folder")


def protocol_defaults(dataset: str) -> dict:
    """Every protocol setting of ``dataset`` with its default (Book-Crossing adds its ``bx_*`` settings)."""
    return {**DEFAULT_PROTOCOL, **DATASET_DEFAULTS.get(dataset, {})}


def resolve_protocol(dataset: str, protocol_settings: dict) -> dict:
    """The defaults overridden by ``protocol_settings`` (``seed`` is an alias of random_state).

    Unknown keys are a TypeError (a programming error, as an unknown keyword argument would be).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}, expected one of {', '.join(DATASETS)}")
    settings = dict(protocol_settings)
    if "seed" in settings:
        settings["random_state"] = settings.pop("seed")
    defaults = protocol_defaults(dataset)
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}, expected some of {sorted(defaults)}")
    protocol = {**defaults, **settings}
    check_protocol(protocol)
    return protocol


def protocol_from_config(cfg: dict) -> dict:
    """The protocol settings among a training config's keys (configs.py), for :func:`ensure_prepared`."""
    return {key: cfg[key] for key in protocol_defaults(cfg["dataset"]) if key in cfg}


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
    """The existing manifest when it records exactly these settings and checksums, else None.

    A damaged manifest is not reusable: the output is then prepared again.
    """
    if checksums is None or not (out_dir / MANIFEST).is_file() or not (out_dir / TASKS).is_dir():
        return None
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        return None
    same = manifest["settings"] == settings and manifest["checksums"] == checksums
    return manifest if same else None


def user_sets(result: ProtocolResult, item_codes: dict, protocol: dict) -> dict[int, tuple[dict, dict]]:
    """Per user id: (support SET, query SET) as plain data, in time order (docs/data.md)."""
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
    return {name: int(count) for name, count in zip(SCENARIOS, counts)}


def build_manifest(raw: RawDataset, result: ProtocolResult, vocabularies: dict, settings: dict,
                   checksums: dict, protocol: dict) -> dict:
    """The manifest (docs/data.md) with counts over the kept data."""
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


def make_work_dir(out_dir: Path) -> Path:
    """A new folder ``.<out name>.tmp-<pid>-<random>`` beside ``out_dir`` holding :data:`WORK_MARKER`.

    Created with ``mkdir`` (permissions from the umask; ``tempfile.mkdtemp`` would make the
    published output 0700). The output is built in ``work / out_dir.name``.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        work = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            work.mkdir()
            break
        except FileExistsError:
            continue
    write_json(work / WORK_MARKER, {"pid": os.getpid(), "host": socket.gethostname()})
    return work


def process_is_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_work_dirs(out_dir: Path) -> list[Path]:
    """Work folders of ``out_dir`` left by a preparation that was killed.

    Only folders named as :func:`make_work_dir` names them, holding its marker, made on this
    machine by a process that is no longer running; anything else is left alone.
    """
    stale = []
    for work in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*")):
        try:
            owner = json.loads((work / WORK_MARKER).read_text(encoding="utf-8"))
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if not work.is_symlink() and host == socket.gethostname() and pid != os.getpid() \
                and not process_is_running(pid):
            stale.append(work)
    return stale


def remove_stale_work_dirs(out_dir: Path, log) -> None:
    """Remove :func:`stale_work_dirs` of ``out_dir``, saying so."""
    for work in stale_work_dirs(out_dir):
        shutil.rmtree(work)
        log(f"{work}: removed, the work folder of an interrupted preparation")


def publish(work: Path, out_dir: Path) -> None:
    """Rename ``work / out_dir.name`` to ``out_dir``; a previous output moves into ``work`` first.

    Killed in between, ``out_dir`` is missing and both outputs are in ``work``, which the next
    preparation removes; never is a half-written folder at ``out_dir``.
    """
    if out_dir.exists():
        os.replace(out_dir, work / "previous")
    os.replace(work / out_dir.name, out_dir)


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
    """Prepare ``dataset`` from ``raw_dir`` into ``out_dir`` (replacing an earlier output); return the manifest.

    protocol_settings: any of DEFAULT_PROTOCOL's keys (support_size, query_size, random_state, ...),
    and for Book-Crossing datasets BX_DEFAULTS' keys (bx_user_rule, pooling thresholds); ``seed`` is
    accepted as an alias of random_state. For ``synthetic`` and ``synthetic-bookcrossing``, raw files
    are generated with seed random_state into ``raw_dir`` when given (an empty folder or one the
    generator wrote), else into ``out_dir/raw``.
    """
    protocol = resolve_protocol(dataset, protocol_settings)
    out_dir = Path(out_dir)
    raw_dir = Path(raw_dir) if raw_dir is not None else None
    synthetic = dataset in SYNTHETIC_WRITERS
    generate_in_output = synthetic and raw_dir is None
    check_out_dir(out_dir, None if generate_in_output else raw_dir)
    if synthetic and raw_dir is not None:
        check_generated_folder(raw_dir)
    if not synthetic:
        if raw_dir is None:
            raise DataError(f"--raw-dir is required for {dataset!r}")
        ensure_raw_files(dataset, raw_dir, download, base_urls)
    if out_dir.parent.is_dir():
        remove_stale_work_dirs(out_dir, log)
    settings = preparation_settings(dataset, protocol, n_users)
    raw_location = out_dir / "raw" if generate_in_output else raw_dir
    manifest = reusable_manifest(out_dir, settings, raw_checksums(raw_location, dataset))
    if manifest is not None:
        log(f"{out_dir}: reusing the existing output (same raw files and settings)")
        return manifest
    work = make_work_dir(out_dir)
    try:
        staging = work / out_dir.name
        staging.mkdir()
        if synthetic:
            raw_location = staging / "raw" if generate_in_output else raw_dir
            SYNTHETIC_WRITERS[dataset](raw_location, n_users=n_users, seed=protocol["random_state"])
        manifest = build_output(staging, raw_location, settings, protocol)
        publish(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{out_dir}: {manifest['n_users']} users ({manifest['n_train_users']} train, "
        f"{manifest['n_test_users']} test), {manifest['n_items']} items, {manifest['n_ratings']} ratings")
    return manifest


@dataclass
class PreparedData:
    """What :func:`ensure_prepared` found or made.

    data_dir: the folder holding the data (the one asked for, or its settings-named sibling).
    manifest: its manifest (checked); reused: True when nothing was prepared.
    """

    data_dir: Path
    manifest: dict
    reused: bool


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """``{"synthetic": {"seed": 3}}`` -> ``{"synthetic.seed": 3}``: one entry per setting."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def setting_differences(prepared: dict, wanted: dict, ignored: tuple[str, ...] = ()) -> list[str]:
    """``["random_state: prepared 100, asked 7", ...]`` for every setting that differs, but ``ignored`` ones."""
    prepared, wanted = flat_settings(prepared), flat_settings(wanted)
    missing = "(absent)"
    return [f"{key}: prepared {prepared.get(key, missing)}, asked {wanted.get(key, missing)}"
            for key in sorted((set(prepared) | set(wanted)) - set(ignored))
            if prepared.get(key, missing) != wanted.get(key, missing)]


def raw_file_differences(manifest: dict, raw_dir: Path | None, dataset: str) -> list[str]:
    """Raw files present in ``raw_dir`` whose md5 differs from the manifest's (real datasets only).

    Synthetic raw files are a function of the settings, so the settings already decide.
    """
    if dataset in SYNTHETIC_WRITERS or raw_dir is None:
        return []
    checksums = raw_checksums(raw_dir, dataset)
    if checksums is None:
        return []
    return [f"{name}: prepared from md5 {manifest['checksums'].get(name)}, raw file now {md5}"
            for name, md5 in checksums.items() if manifest["checksums"].get(name) != md5]


def settings_dir(data_dir: Path, settings: dict) -> Path:
    """``<data_dir>-<first 10 hex of md5(settings as sorted JSON)>``: one folder per settings."""
    digest = hashlib.md5(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return data_dir.parent / f"{data_dir.name}-{digest}"


def ensure_prepared(dataset: str, raw_dir: Path | str | None, data_dir: Path | str, protocol: dict | None = None, *,
                    download: bool = False, on_mismatch: str = "error", n_users: int | None = None,
                    base_urls: dict[str, str] | None = None, log=print) -> PreparedData:
    """A prepared folder whose settings are exactly ``protocol`` (defaults for the keys not given).

    n_users (synthetic datasets): the generated users; None accepts a folder of any size and
    generates DEFAULT_SYNTHETIC_USERS when it prepares (the size is the raw data's, not a setting).

    - ``data_dir`` without a manifest: prepared there.
    - ``data_dir`` prepared with the same settings (and, for real datasets whose raw files are at
      hand, the same raw md5s): reused as it is.
    - otherwise ``on_mismatch="error"`` raises a one-line DataError naming every differing setting;
      ``"new-folder"`` uses :func:`settings_dir` instead (reused if it matches, prepared if absent;
      a mismatch there is the same error). A mismatching folder is never used or overwritten.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch = {on_mismatch!r}, expected one of {ON_MISMATCH}")
    data_dir = Path(data_dir)
    raw_dir = Path(raw_dir) if raw_dir is not None else None
    resolved = resolve_protocol(dataset, protocol or {})
    settings = preparation_settings(dataset, resolved, n_users or DEFAULT_SYNTHETIC_USERS)
    if not (data_dir / MANIFEST).is_file():
        manifest = prepare(dataset, raw_dir, data_dir, download=download, base_urls=base_urls,
                           n_users=n_users or DEFAULT_SYNTHETIC_USERS, log=log, **resolved)
        return PreparedData(data_dir, manifest, reused=False)
    manifest = read_manifest(data_dir)
    ignored = ("synthetic.n_users",) if n_users is None else ()
    differences = (setting_differences(manifest["settings"], settings, ignored)
                   + raw_file_differences(manifest, raw_dir, dataset))
    if not differences:
        return PreparedData(data_dir, manifest, reused=True)
    if on_mismatch == "new-folder":
        other = settings_dir(data_dir, settings)
        log(f"{data_dir}: prepared with other settings ({'; '.join(differences)}); using {other}")
        return ensure_prepared(dataset, raw_dir, other, protocol, download=download, n_users=n_users,
                               base_urls=base_urls, log=log)
    raise DataError(f"{data_dir / MANIFEST}: prepared with other settings ({'; '.join(differences)}), expected the "
                    "asked settings; use another data folder, or delete this one to prepare it again")


def option(key: str) -> str:
    """``support_size`` -> ``--support-size``."""
    return "--" + key.replace("_", "-")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring); a protocol setting left out keeps its default."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare_data", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--raw-dir", type=Path, help="raw files (required unless synthetic)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--download", action="store_true", help="fetch missing raw files first")
    parser.add_argument("--n-users", type=int, default=DEFAULT_SYNTHETIC_USERS, help="synthetic users")
    parser.add_argument("--seed", dest="random_state", type=int,
                        help=f"user split seed (and synthetic generator seed; default {DEFAULT_PROTOCOL['random_state']})")
    for key, default in {**DEFAULT_PROTOCOL, **BX_DEFAULTS}.items():
        if key != "random_state":
            parser.add_argument(option(key), dest=key, type=type(default), help=f"default {default}")
    arguments = parser.parse_args(argv)
    if arguments.dataset not in SYNTHETIC_WRITERS and arguments.raw_dir is None:
        parser.error(f"--raw-dir is required for --dataset {arguments.dataset}")
    if arguments.dataset not in BOOKCROSSING_DATASETS:
        given = [option(key) for key in BX_DEFAULTS if getattr(arguments, key) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only for --dataset {' or '.join(BOOKCROSSING_DATASETS)}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    """Run the command line; exit status 2 with a one-line reason on bad input."""
    arguments = parse_arguments(argv)
    settings = {key: getattr(arguments, key) for key in protocol_defaults(arguments.dataset)
                if getattr(arguments, key) is not None}
    try:
        prepare(arguments.dataset, arguments.raw_dir, arguments.out_dir, download=arguments.download,
                n_users=arguments.n_users, **settings)
    except (DataError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
