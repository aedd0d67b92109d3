"""--download against a local http.server on 127.0.0.1 (never the network)."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from data_prep.download import DownloadError, download_missing, manual_instructions
from data_prep.prepare_data import prepare
from tests.data_helpers import write_ml1m

RATINGS = [(u, 10 + k, 3, 1000 * u + k) for u in (1, 2, 3) for k in range(4)]


def publish_ml1m(site, tmp_path, members=None):
    """Put ml-1m.zip (ratings.dat, users.dat under ml-1m/) and movies_extrainfos.dat on the site.

    Returns ``{source name: md5}``.
    """
    source = write_ml1m(tmp_path / "source", RATINGS)
    members = members or {"ml-1m/ratings.dat": "ratings.dat", "ml-1m/users.dat": "users.dat"}
    with zipfile.ZipFile(site / "ml-1m.zip", "w") as archive:
        for member, name in members.items():
            archive.write(source / name, member)
    (site / "movies_extrainfos.dat").write_bytes((source / "movies_extrainfos.dat").read_bytes())
    return {name: hashlib.md5((site / name).read_bytes()).hexdigest()
            for name in ("ml-1m.zip", "movies_extrainfos.dat")}


def test_download_fetches_extracts_and_prepares(tmp_path, server):
    site, url = server
    md5s = publish_ml1m(site, tmp_path)
    fetched = download_missing("movielens", tmp_path / "raw", {"grouplens": url, "melu": url}, md5s)
    assert fetched == ["ml-1m.zip", "movies_extrainfos.dat"]
    for name in ("ratings.dat", "users.dat", "movies_extrainfos.dat"):
        assert (tmp_path / "raw" / name).read_bytes() == (tmp_path / "source" / name).read_bytes()
    manifest = prepare("movielens", tmp_path / "raw", tmp_path / "out", download=True,
                       log=lambda m: None, support_size=2, query_size=1)
    assert manifest["n_users"] == 3


def test_base_urls_from_environment(tmp_path, server, monkeypatch):
    site, url = server
    md5s = publish_ml1m(site, tmp_path)
    monkeypatch.setenv("MAMO_GROUPLENS_BASE_URL", url)
    monkeypatch.setenv("MAMO_MELU_BASE_URL", url.rstrip("/"))
    assert download_missing("movielens", tmp_path / "raw", md5s=md5s) == ["ml-1m.zip", "movies_extrainfos.dat"]


def test_md5_mismatch_is_refused_and_deleted(tmp_path, server):
    site, url = server
    publish_ml1m(site, tmp_path)  # real ml-1m.zip md5 expected: mismatch
    with pytest.raises(DownloadError, match=r"ml-1m\.zip: md5 [0-9a-f]{32}, expected c4d9eecfca2ab87c1945afe126590906"):
        download_missing("movielens", tmp_path / "raw", {"grouplens": url, "melu": url})
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == []


def test_zip_slip_is_refused(tmp_path, server):
    site, url = server
    members = {"ml-1m/ratings.dat": "ratings.dat", "ml-1m/users.dat": "users.dat", "../../evil.dat": "users.dat"}
    md5s = publish_ml1m(site, tmp_path, members)
    with pytest.raises(DownloadError, match=r"refusing to extract, member '\.\./\.\./evil\.dat'"):
        download_missing("movielens", tmp_path / "raw", {"grouplens": url, "melu": url}, md5s)
    assert not (tmp_path / "evil.dat").exists() and not (tmp_path / "raw" / "ratings.dat").exists()


def test_offline_message_lists_urls_and_target_paths(tmp_path):
    dead = "http://127.0.0.1:9/"  # discard port: connection refused
    with pytest.raises(DownloadError) as error:
        download_missing("movielens-100k", tmp_path / "raw", {"grouplens": dead})
    message = str(error.value)
    assert "download failed" in message and f"{dead}ml-100k.zip" in message
    for name in ("u.data", "u.user", "u.item"):
        assert str((tmp_path / "raw" / name).resolve()) in message


def test_manual_instructions_name_every_missing_file(tmp_path):
    message = manual_instructions("movielens", tmp_path)
    assert "https://raw.githubusercontent.com/hoyeoplee/MeLU/master/movielens/ml-1m/movies_extrainfos.dat" in message
    assert "member ml-1m/ratings.dat of https://files.grouplens.org/datasets/movielens/ml-1m.zip" in message
