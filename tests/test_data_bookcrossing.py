"""Book-Crossing: the dump's damage, the protocol without time, features and 1-10 ratings, on
tiny hand-written raw files (latin-1, quoted, ``;``-separated) with hand-computed expectations."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from data_prep.download import manual_instructions
from data_prep.prepare_data import main, prepare
from data_prep.raw_io import DataError
from data_prep.task_io import load_processed

USERS = [
    '"User-ID";"Location";"Age"',
    '"1";"nyc, new york, usa";NULL',
    '"2";"toronto, ontario, canada";"17"',
    '"3";"boston; ma, massachusetts, usa";"30"',
    '"4";"berlin, n/a, germany";"150"',
    '"5";"rome, \\"lazio\\", italy";"66"',
    '"6";"x, y, ";"4"',
    '"7";"paris, &amp; , USA ";"24"',
]
URLS = '"u";"u";"u"'
BOOKS = [
    '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"',
    f'"000000001X";"Title A; part &amp; one";"Ann Lee";"1995";"Penguin";{URLS}',
    f'" 0000000028";"Title B";"ann  lee";"0";"PENGUIN";{URLS}',
    f'"0000000036";"DK Readers (Level 4)\\";Bob Ray";"2000";"DK Publishing";{URLS}',
    f'"0000000044";"Bad\\";x\\";y";"1999";"P";{URLS}',
    f'"0000000052";"Old";"Cy Zed";"1940";"Tiny &amp; Co";{URLS}',
    f'"0000000060";"Future";"Cy Zed";"2030";"Tiny &amp; Co";{URLS}',
]
RATINGS = [  # (user, ISBN as written, rating); line = index + 2
    (1, "0000000028", 7), (1, "9999999999", 9), (1, "000000001X", 10), (1, "0000000052", 0),
    (1, "0000000036", 1), (1, "0000000060", 5), (2, "000000001x", 8), (2, "0000000028", 3),
    (2, "0000000052", 6), (3, "0000000052", 2), (3, "000000001X", 4), (3, " 0000000028 ", 9),
    (4, "000000001X", 5), (4, "0000000028", 0), (4, "0000000036", 6), (2, "0000000060", 4),
    (3, "000000001X", 7), (5, "0000000044", 8),
]
TINY = {"support_size": 2, "query_size": 1, "item_cold_max_ratings": 2, "bx_min_country_users": 2,
        "bx_min_author_books": 2, "bx_min_publisher_books": 2}


def write_bx(raw_dir, users=USERS, books=BOOKS, ratings=RATINGS):
    """Write the three dump files (latin-1, CRLF) into ``raw_dir``."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    rating_lines = ['"User-ID";"ISBN";"Book-Rating"'] + [f'"{u}";"{i}";"{r}"' for u, i, r in ratings]
    for name, lines in (("BX-Users.csv", users), ("BX-Books.csv", books), ("BX-Book-Ratings.csv", rating_lines)):
        (raw_dir / name).write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))
    return raw_dir


def run(tmp_path, **settings):
    raw = write_bx(tmp_path / "raw")
    prepare("bookcrossing", raw, tmp_path / "out", log=lambda message: None, **{**TINY, **settings})
    manifest, tasks = load_processed(tmp_path / "out")
    keys = json.loads((tmp_path / "out" / "item_keys.json").read_text())
    return manifest, tasks, {int(item): isbn for item, isbn in keys.items()}


@pytest.fixture
def prepared(tmp_path):
    return run(tmp_path)


def isbns_of(rating_set, keys):
    return [keys[item] for item in rating_set["item_ids"]]


def test_file_order_first_ratings_implicit_and_unknown_isbns_dropped(prepared):
    manifest, tasks, keys = prepared
    assert sorted(tasks) == [1, 2, 3]  # user 4 has 2 explicit ratings, user 5 one of a dropped book
    assert isbns_of(tasks[1]["support"], keys) == ["0000000028", "000000001X"]
    assert isbns_of(tasks[1]["query"], keys) == ["0000000036"]
    assert tasks[1]["support"]["timestamps"] == [2, 4] and tasks[1]["query"]["timestamps"] == [6]
    assert isbns_of(tasks[2]["support"], keys) + isbns_of(tasks[2]["query"], keys) == \
        ["000000001X", "0000000028", "0000000052"]  # lower-case x normalised; line 17 comes later
    assert tasks[3]["support"]["ratings"] + tasks[3]["query"]["ratings"] == [2, 4, 9]  # duplicate line 18 dropped
    assert manifest["n_ratings_without_metadata"] == 2  # 9999999999 and the dropped 0000000044
    assert manifest["n_raw_ratings"] == 15  # 18 lines - 2 implicit - 1 duplicate


def test_ratings_are_1_to_10(prepared):
    manifest, tasks, _ = prepared
    assert (manifest["rating_min"], manifest["rating_max"], manifest["n_rating_classes"]) == (1, 10, 10)
    assert tasks[1]["support"]["ratings"] + tasks[1]["query"]["ratings"] == [7, 10, 1]


def test_user_rule_id_order_item_rule_and_scenarios(prepared):
    manifest, tasks, keys = prepared
    assert [tasks[u]["user_is_new"] for u in (1, 2, 3)] == [False, False, True]  # floor(0.8 * 3 + 0.5) = 2 existing
    assert manifest["split_time"] is None and manifest["split_time_utc"] is None
    assert "smallest kept user ids" in manifest["protocol"]["user_rule"]
    # kept counts: 000000001X 3, 0000000028 3, 0000000036 1, 0000000052 2 (new iff <= 2)
    codes = {u: tasks[u]["support"]["scenarios"] + tasks[u]["query"]["scenarios"] for u in tasks}
    assert codes == {1: [0, 0, 1], 2: [0, 0, 1], 3: [3, 2, 2]}
    assert (manifest["n_warm_items"], manifest["n_cold_items"]) == (2, 2)
    assert manifest["scenario_counts"] == {"existing_user_existing_item": 4, "existing_user_new_item": 2,
                                           "new_user_existing_item": 2, "new_user_new_item": 1}


def test_existing_user_ratio_rounds_half_up(tmp_path):
    _, tasks, _ = run(tmp_path, bx_existing_user_ratio=0.5)
    assert [tasks[u]["user_is_new"] for u in (1, 2, 3)] == [False, False, True]  # 0.5 * 3 = 1.5 -> 2 existing


@pytest.mark.parametrize("setting, vocabulary, expected", [
    ("bx_min_country_users", ("user", "country"), ["other", "unknown"]),  # usa has 3 users, fewer than 4
    ("bx_min_author_books", ("item", "author"), ["other"]),  # ann lee and cy zed: 2 books each, fewer than 3
    ("bx_min_publisher_books", ("item", "publisher"), ["other"]),  # penguin, tiny & co: 2 books each
])
def test_each_pooling_threshold_acts_on_its_own_field(tmp_path, setting, vocabulary, expected):
    """Raising one threshold pools only its own field; the others keep TINY's vocabularies."""
    run(tmp_path, **{setting: 4 if setting == "bx_min_country_users" else 3})
    vocabularies = json.loads((tmp_path / "out" / "vocabularies.json").read_text())
    tiny = {("user", "country"): ["other", "unknown", "usa"], ("item", "author"): ["ann lee", "cy zed", "other"],
            ("item", "publisher"): ["other", "penguin", "tiny & co"]}
    for part, name in tiny:
        assert vocabularies[part][name] == (expected if (part, name) == vocabulary else tiny[part, name])


def test_random_user_rule_uses_its_own_seeded_stream(tmp_path):
    manifest, tasks, _ = run(tmp_path, bx_user_rule="random", seed=5)
    new = np.random.default_rng([5, 1]).permutation([1, 2, 3])[2:].tolist()
    assert [u for u in tasks if tasks[u]["user_is_new"]] == new
    assert "permutation" in manifest["protocol"]["user_rule"]


def test_user_features_age_buckets_and_pooled_countries(prepared, tmp_path):
    manifest, tasks, _ = prepared
    vocabularies = json.loads((tmp_path / "out" / "vocabularies.json").read_text())
    # ages: NULL, 17, 30, 150, 66, 4, 24 -> unknown, <18, 25-34, unknown, 65+, unknown, 18-24
    assert vocabularies["user"]["age"] == ["18-24", "25-34", "65+", "<18", "unknown"]
    # usa x3 (one written ' USA '), canada/germany/italy 1 each (< 2: other), empty country: unknown
    assert vocabularies["user"]["country"] == ["other", "unknown", "usa"]
    assert tasks[1]["user_features"] == [4, 2] and tasks[2]["user_features"] == [3, 0]
    assert tasks[3]["user_features"] == [1, 2]
    assert [f["name"] for f in manifest["features"]["user"]] == ["age", "country"]
    assert all(f["kind"] == "categorical" for part in ("user", "item") for f in manifest["features"][part])


def test_item_features_decades_normalised_and_pooled_names(prepared, tmp_path):
    _, tasks, _ = prepared
    vocabularies = json.loads((tmp_path / "out" / "vocabularies.json").read_text())
    assert vocabularies["item"]["year"] == ["1990s", "2000s", "<1950", "unknown"]  # 0 and 2030 unknown
    assert vocabularies["item"]["author"] == ["ann lee", "cy zed", "other"]  # bob ray: 1 book
    assert vocabularies["item"]["publisher"] == ["other", "penguin", "tiny & co"]
    features = tasks[1]["support"]["item_features"]  # 0000000028, 000000001X
    assert (features["year"], features["author"], features["publisher"]) == ([3, 0], [0, 0], [1, 1])
    repaired = tasks[1]["query"]["item_features"]  # 0000000036: author split off the title
    assert (repaired["year"], repaired["author"], repaired["publisher"]) == ([1], [2], [0])


def test_every_repair_is_counted(prepared):
    manifest, _, _ = prepared
    assert manifest["repairs"] == {
        "ages_null": 1, "ages_out_of_range": 2, "books_author_split_repaired": 1,
        "books_dropped_unparseable": 1, "duplicate_books_dropped": 0, "duplicate_ratings_dropped": 1,
        "escaped_quotes": 1, "html_entities": 3, "implicit_ratings_dropped": 2, "isbns_normalised": 3,
        "years_not_a_number": 0, "years_zero_or_future": 2,
    }


def replaced(lines, number, text):
    """``lines`` with line ``number`` (1-based, header = 1) replaced."""
    return [text if k == number - 1 else line for k, line in enumerate(lines)]


BAD_FILES = [
    ("rating out of range", "BX-Book-Ratings.csv", 3, '"1";"000000001X";"11"',
     "field Book-Rating = '11', expected an integer in [0, 10]"),
    ("rating line not quoted", "BX-Book-Ratings.csv", 3, "1;000000001X;5", "found not quoted fields"),
    ("rating line with 4 fields", "BX-Book-Ratings.csv", 3, '"1";"000000001X";"5";"5"', "expected 3 fields"),
    ("unknown user", "BX-Book-Ratings.csv", 3, '"99";"000000001X";"5"', "user 99 is not in the users file"),
    ("age not a number", "BX-Users.csv", 2, '"1";"nyc, usa";"abc"', "field Age = 'abc', expected an integer or NULL"),
    ("repeated user", "BX-Users.csv", 3, '"1";"nyc, usa";"20"', "User-ID 1 appears twice"),
    ("wrong header", "BX-Books.csv", 1, '"ISBN";"Title"', "header"),
]


@pytest.mark.parametrize("what, name, number, text, expectation", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_unusable_lines_name_file_line_and_expectation(tmp_path, what, name, number, text, expectation):
    raw = write_bx(tmp_path / "raw")
    path = raw / name
    path.write_bytes("\r\n".join(replaced(path.read_bytes().decode("latin-1").split("\r\n"), number, text)).encode("latin-1"))
    with pytest.raises(DataError) as error:
        prepare("bookcrossing", raw, tmp_path / "out", log=lambda message: None, **TINY)
    message = str(error.value)
    assert str(path) in message and f"line {number}:" in message and expectation in message
    assert not (tmp_path / "out").exists()


def test_latin1_nel_byte_does_not_split_a_line(tmp_path):
    books = replaced(BOOKS, 3, f'" 0000000028";"Title B\x85 and more";"ann  lee";"0";"PENGUIN";{URLS}')
    raw = write_bx(tmp_path / "raw", books=books)
    manifest = prepare("bookcrossing", raw, tmp_path / "out", log=lambda message: None, **TINY)
    assert manifest["n_users"] == 3


def test_unknown_user_rule_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bx_user_rule"):
        run(tmp_path, bx_user_rule="alphabetical")


def test_missing_files_say_what_to_put_where_without_md5(tmp_path):
    message = manual_instructions("bookcrossing", tmp_path / "raw")
    for name in ("BX-Users.csv", "BX-Books.csv", "BX-Book-Ratings.csv"):
        assert str((tmp_path / "raw" / name).resolve()) in message
    assert "BX-CSV-Dump.zip" in message and "no published md5, not verified" in message
    with pytest.raises(DataError, match="--download"):
        prepare("bookcrossing", tmp_path / "raw", tmp_path / "out", log=lambda message: None)


def test_command_line_and_synthetic_bookcrossing(tmp_path):
    raw = write_bx(tmp_path / "raw")
    settings = ["--support-size", "2", "--query-size", "1"]
    assert main(["--dataset", "bookcrossing", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"), *settings]) == 0
    assert main(["--dataset", "synthetic-bookcrossing", "--n-users", "150", "--out-dir", str(tmp_path / "syn")]) == 0
    manifest, tasks = load_processed(tmp_path / "syn")
    assert manifest["dataset"] == "synthetic-bookcrossing" and manifest["n_rating_classes"] == 10
    assert all(manifest["repairs"][kind] > 0 for kind in (
        "ages_null", "ages_out_of_range", "html_entities", "implicit_ratings_dropped", "years_zero_or_future",
        "books_author_split_repaired", "isbns_normalised"))
    assert manifest["n_ratings_without_metadata"] > 0
    test_codes = {code for task in tasks.values() if task["split"] == "test"
                  for part in ("support", "query") for code in task[part]["scenarios"]}
    assert test_codes == {0, 1, 2, 3}


def test_download_extracts_the_dump_zip_without_md5(tmp_path, server):
    site, base_url = server
    source = write_bx(tmp_path / "source")
    with zipfile.ZipFile(site / "BX-CSV-Dump.zip", "w") as archive:
        for name in ("BX-Users.csv", "BX-Books.csv", "BX-Book-Ratings.csv"):
            archive.write(source / name, name)
    manifest = prepare("bookcrossing", tmp_path / "raw", tmp_path / "out", download=True,
                       base_urls={"bookcrossing": base_url}, log=lambda message: None, **TINY)
    assert manifest["n_users"] == 3 and (tmp_path / "raw" / "BX-Books.csv").read_bytes() == (source / "BX-Books.csv").read_bytes()
