"""Fetch missing raw files (urllib only), verify md5 where one is published, extract zips safely.

Base URLs, in order of precedence: the ``base_urls`` argument (``{"grouplens": url, "melu": url,
"bookcrossing": url}``), the environment variables ``MAMO_GROUPLENS_BASE_URL``,
``MAMO_MELU_BASE_URL`` and ``MAMO_BOOKCROSSING_BASE_URL``, then the public defaults below. Tests
point them at a local ``http.server``. The Book-Crossing dump has no official md5 and its classic
host is often down, so it is fetched unverified and any mirror can be named as its base URL.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.raw_io import md5_of

DEFAULT_BASE_URLS = {
    "grouplens": "https://files.grouplens.org/datasets/movielens/",
    "melu": "https://raw.githubusercontent.com/hoyeoplee/MeLU/master/movielens/ml-1m/",
    "bookcrossing": "http://www2.informatik.uni-freiburg.de/~cziegler/BX/",
}
BASE_URL_ENVIRONMENT = {"grouplens": "MAMO_GROUPLENS_BASE_URL", "melu": "MAMO_MELU_BASE_URL",
                        "bookcrossing": "MAMO_BOOKCROSSING_BASE_URL"}
TIMEOUT_SECONDS = 60


class DownloadError(RuntimeError):
    """A download failed (no network, bad checksum, unsafe archive)."""


@dataclass(frozen=True)
class Source:
    """One downloadable file: a zip whose ``members`` give raw files, or a raw file itself.

    members: ``{raw file name: member path inside the zip}``; empty for a direct file.
    md5: None when no checksum is published (the download is then not verified).
    """

    name: str
    host: str
    md5: str | None
    members: dict[str, str] = field(default_factory=dict)

    def raw_files(self) -> list[str]:
        return list(self.members) or [self.name]


SOURCES = {
    "movielens": [
        Source("ml-1m.zip", "grouplens", "c4d9eecfca2ab87c1945afe126590906",
               {"ratings.dat": "ml-1m/ratings.dat", "users.dat": "ml-1m/users.dat"}),
        Source("movies_extrainfos.dat", "melu", "a7a0e11c3b4d7f5216d91295488c2a84"),
    ],
    "movielens-100k": [
        Source("ml-100k.zip", "grouplens", "0e33842e24a9c977be4e0107933c0723",
               {"u.data": "ml-100k/u.data", "u.user": "ml-100k/u.user", "u.item": "ml-100k/u.item"}),
    ],
    "bookcrossing": [
        Source("BX-CSV-Dump.zip", "bookcrossing", None,
               {name: name for name in ("BX-Users.csv", "BX-Books.csv", "BX-Book-Ratings.csv")}),
    ],
}


def resolve_base_urls(base_urls: dict[str, str] | None = None) -> dict[str, str]:
    """Base URL per host: argument, else environment variable, else default; ends with '/'."""
    chosen = {}
    for host, default in DEFAULT_BASE_URLS.items():
        url = (base_urls or {}).get(host) or os.environ.get(BASE_URL_ENVIRONMENT[host]) or default
        chosen[host] = url if url.endswith("/") else url + "/"
    return chosen


def missing_sources(dataset: str, raw_dir: Path) -> list[Source]:
    """Sources of ``dataset`` with at least one raw file absent from ``raw_dir``."""
    return [s for s in SOURCES[dataset] if any(not (Path(raw_dir) / f).is_file() for f in s.raw_files())]


def manual_instructions(dataset: str, raw_dir: Path, base_urls: dict[str, str] | None = None) -> str:
    """Which files to put where, with the URLs they come from."""
    urls = resolve_base_urls(base_urls)
    lines = [f"missing raw files for {dataset!r}; put them in {Path(raw_dir).resolve()} "
             "(or re-run with --download):"]
    for source in missing_sources(dataset, raw_dir):
        url = urls[source.host] + source.name
        for raw_file in source.raw_files():
            origin = f"member {source.members[raw_file]} of {url}" if source.members else url
            checksum = f"md5 of download {source.md5}" if source.md5 else "no published md5, not verified"
            lines.append(f"  {Path(raw_dir).resolve() / raw_file}  <-  {origin} ({checksum})")
    return "\n".join(lines)


def fetch(url: str, target: Path, expected_md5: str | None) -> None:
    """Download ``url`` to ``target`` with a progress bar; refuse (and delete) on md5 mismatch.

    expected_md5 None: no checksum is published, the download is kept unverified.
    """
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as progress:
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                progress.update(len(block))
    actual = md5_of(partial)
    if expected_md5 is not None and actual != expected_md5:
        partial.unlink()
        raise DownloadError(f"{url}: md5 {actual}, expected {expected_md5}; the download was deleted")
    os.replace(partial, target)


def check_members_stay_inside(archive: zipfile.ZipFile, archive_path: Path, target_dir: Path) -> None:
    """Refuse an archive with any member path (absolute, ``..``) that would land outside ``target_dir``."""
    root = target_dir.resolve()
    for member in archive.namelist():
        destination = (root / member).resolve()
        if member.startswith(("/", "\\")) or not destination.is_relative_to(root):
            raise DownloadError(
                f"{archive_path}: refusing to extract, member {member!r} would be written outside {root}"
            )


def extract_members(archive_path: Path, members: dict[str, str], target_dir: Path) -> None:
    """Write ``members`` (``{raw file name: member path}``) of a checked zip into ``target_dir``."""
    with zipfile.ZipFile(archive_path) as archive:
        check_members_stay_inside(archive, archive_path, target_dir)
        names = set(archive.namelist())
        for raw_file, member in members.items():
            if member not in names:
                raise DownloadError(f"{archive_path}: member {member!r} not found, expected it for {raw_file}")
            (target_dir / raw_file).write_bytes(archive.read(member))


def download_missing(dataset: str, raw_dir: Path, base_urls: dict[str, str] | None = None,
                     md5s: dict[str, str] | None = None) -> list[str]:
    """Fetch every missing raw file of ``dataset`` into ``raw_dir``; return the source names fetched.

    md5s: optional ``{source name: md5}`` overriding the known checksums.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    urls = resolve_base_urls(base_urls)
    fetched = []
    for source in missing_sources(dataset, raw_dir):
        target = raw_dir / source.name
        expected = (md5s or {}).get(source.name, source.md5)
        if not (target.is_file() and (expected is None or md5_of(target) == expected)):
            try:
                fetch(urls[source.host] + source.name, target, expected)
            except (urllib.error.URLError, OSError) as exc:
                raise DownloadError(f"download failed ({exc}).\n{manual_instructions(dataset, raw_dir, base_urls)}") from None
        if source.members:
            extract_members(target, source.members, raw_dir)
        fetched.append(source.name)
    return fetched
