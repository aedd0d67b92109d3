"""Each rule of the data protocol on tiny hand-written raw files."""
from __future__ import annotations

import json
import time

import numpy as np

from data_prep.prepare_data import prepare
from data_prep.protocol import split_timestamp, split_users
from data_prep.task_io import load_processed
from tests.data_helpers import write_ml1m

TINY = {"support_size": 2, "query_size": 1}


def run(tmp_path, ratings, movie_ids=None, **settings):
    """Prepare tiny raw files; return (manifest, {user_id: task})."""
    raw = write_ml1m(tmp_path / "raw", ratings, movie_ids=movie_ids)
    prepare("movielens", raw, tmp_path / "out", log=lambda message: None, **settings)
    return load_processed(tmp_path / "out")


def all_items(task):
    return task["support"]["item_ids"] + task["query"]["item_ids"]


def test_split_time_is_sorted_timestamp_at_rounded_position():
    timestamps = np.array([50, 10, 40, 30, 20, 100, 90, 80, 70, 60])  # N = 10: index round(8.0) = 8
    assert split_timestamp(timestamps, 0.8) == 90
    assert split_timestamp(timestamps[:7], 0.8) == 100  # sorted 10,20,30,40,50,90,100: index round(5.6) = 6
    assert split_timestamp(np.array([5, 1, 4, 2, 3]), 0.5) == 4  # 2.5 rounds half up to index 3
    assert split_timestamp(np.array([3, 1, 2]), 1.0) == 3  # index clipped to N - 1


def test_split_time_in_manifest_counts_only_ratings_of_movies_with_metadata(tmp_path):
    # 10 ratings of known movies at t = 1..10, plus 5 very late ratings of movies 95-99 (no metadata).
    ratings = [(1, 10 + k, 3, k + 1) for k in range(5)] + [(2, 10 + k, 3, k + 6) for k in range(5)]
    ratings += [(1, 95 + k, 3, 1000 + k) for k in range(5)]
    manifest, _ = run(tmp_path, ratings, movie_ids=list(range(10, 15)), **TINY)
    assert manifest["split_time"] == 9  # sorted [1..10][8]
    assert manifest["n_ratings_without_metadata"] == 5


def test_first_ratings_in_time_order_with_default_sizes(tmp_path):
    rng = np.random.default_rng(0)
    times = rng.permutation(np.arange(1000, 1025))  # 25 ratings, file order shuffled
    ratings = [(7, 100 + int(t - 1000), 4, int(t)) for t in times]
    manifest, tasks = run(tmp_path, ratings)
    task = tasks[7]
    assert task["support"]["timestamps"] == list(range(1000, 1015))
    assert task["query"]["timestamps"] == list(range(1015, 1020))
    assert task["support"]["item_ids"] == list(range(100, 115))
    assert task["query"]["item_ids"] == list(range(115, 120))
    assert manifest["n_ratings"] == 20 and manifest["n_items"] == 20


def test_ties_keep_file_order(tmp_path):
    ratings = [(1, 13, 5, 200), (1, 12, 4, 100), (1, 11, 3, 100), (1, 14, 2, 50)]
    _, tasks = run(tmp_path, ratings, **TINY)
    assert all_items(tasks[1]) == [14, 12, 11]  # 12 and 11 tie at t = 100: file order
    assert tasks[1]["support"]["ratings"] == [2, 4] and tasks[1]["query"]["ratings"] == [3]


def test_many_ties_keep_file_order(tmp_path):
    """25 ratings at three timestamps, in file order k = 0..24 (item k + 1 at t = 100 + k % 3): the
    first 20 in (timestamp, line) order, as a stable sort gives them and an unstable one need not."""
    ratings = [(1, k + 1, 3, 100 + k % 3) for k in range(25)]
    _, tasks = run(tmp_path, ratings)
    assert tasks[1]["support"]["item_ids"] == [1, 4, 7, 10, 13, 16, 19, 22, 25, 2, 5, 8, 11, 14, 17]
    assert tasks[1]["query"]["item_ids"] == [20, 23, 3, 6, 9]


def test_query_is_later_than_support(tmp_path):
    ratings = [(1, 10 + k, 3, 1000 - 10 * k) for k in range(6)]
    _, tasks = run(tmp_path, ratings, support_size=3, query_size=2)
    task = tasks[1]
    assert max(task["support"]["timestamps"]) <= min(task["query"]["timestamps"])
    assert task["support"]["item_ids"] == [15, 14, 13] and task["query"]["item_ids"] == [12, 11]


def test_timestamps_stay_utc_integers_whatever_the_local_zone(tmp_path, monkeypatch):
    # 2000-10-29 05:59:59 and 06:00:00 UTC straddle the US fall-back hour; split index round(3.2) = 3.
    ratings = [(1, 10, 3, 972799199), (1, 11, 3, 972799200), (1, 12, 3, 972802800), (1, 13, 3, 972802801)]
    manifests = []
    for zone in ("UTC", "America/New_York"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        manifest, tasks = run(tmp_path / zone, ratings, **TINY)
        manifests.append((manifest["split_time"], manifest["split_time_utc"], tasks[1]["query"]["timestamps"]))
    monkeypatch.delenv("TZ")
    time.tzset()
    assert manifests[0] == manifests[1] == (972802801, "2000-10-29T07:00:01+00:00", [972802800])


def test_ratings_of_movies_without_metadata_are_dropped_before_truncation(tmp_path):
    ratings = [(1, 99, 5, 1), (1, 10, 1, 2), (1, 11, 2, 3), (1, 12, 3, 4), (1, 13, 4, 5),
               (2, 99, 5, 1), (2, 10, 1, 2), (2, 11, 2, 3)]
    manifest, tasks = run(tmp_path, ratings, movie_ids=[10, 11, 12, 13], **TINY)
    assert all_items(tasks[1]) == [10, 11, 12]  # 99 is gone, so 12 moves into the kept three
    assert 2 not in tasks  # only two ratings of movies with metadata left
    assert manifest["n_users"] == 1


def test_users_with_too_few_ratings_are_dropped(tmp_path):
    ratings = [(1, 10 + k, 3, k) for k in range(20)] + [(2, 10 + k, 3, k) for k in range(19)]
    manifest, tasks = run(tmp_path, ratings)
    assert sorted(tasks) == [1]
    assert manifest["n_users"] == 1 and manifest["n_ratings"] == 20


def test_user_is_new_iff_first_rating_at_or_after_split_time(tmp_path):
    # Sorted times 1..12, 20, 21, 22: N = 15, index round(12.0) = 12 -> split_time = 20, the first
    # rating of user 3. User 4 (two ratings) is dropped but its ratings count for split_time.
    ratings = [(1, 10, 3, 1), (1, 11, 3, 2), (1, 12, 3, 3), (2, 10, 3, 4), (2, 11, 3, 5), (2, 12, 3, 6),
               (4, 10, 3, 7), (4, 11, 3, 8), (5, 10, 3, 9), (5, 11, 3, 10), (5, 12, 3, 11), (5, 13, 3, 12),
               (3, 10, 3, 20), (3, 11, 3, 21), (3, 12, 3, 22)]
    manifest, tasks = run(tmp_path, ratings, **TINY)
    assert manifest["split_time"] == 20
    assert [tasks[u]["user_is_new"] for u in (1, 2, 5, 3)] == [False, False, False, True]
    assert manifest["n_warm_users"] == 3 and manifest["n_cold_users"] == 1


def test_item_is_new_iff_at_most_ten_kept_ratings(tmp_path):
    # support 1 + query 1: each user keeps their first 2 ratings. Item 500 gets 11 kept ratings (users
    # 1-11), item 600 10 kept ones (users 12-21) plus 5 more from users 22-26, who rate it third, so
    # truncation drops those: 15 ratings in all, 10 kept, and only kept ones count.
    ratings = []
    for user in range(1, 12):
        ratings += [(user, 500, 4, 10 * user), (user, 700 + user, 4, 10 * user + 1)]
    for user in range(12, 22):
        ratings += [(user, 600, 2, 10 * user), (user, 800 + user, 2, 10 * user + 1)]
    for user in range(22, 27):
        ratings += [(user, 900 + user, 3, 10 * user), (user, 950 + user, 3, 10 * user + 1), (user, 600, 3, 10 * user + 2)]
    manifest, tasks = run(tmp_path, ratings, support_size=1, query_size=1)
    assert tasks[1]["support"]["item_ids"] == [500] and tasks[12]["support"]["item_ids"] == [600]
    assert all(600 not in all_items(tasks[user]) for user in range(22, 27))
    assert tasks[1]["support"]["scenarios"][0] % 2 == 0  # 11 kept ratings: existing item
    assert tasks[12]["support"]["scenarios"][0] % 2 == 1  # 10 kept ratings (15 in all): new item
    assert manifest["n_warm_items"] == 1 and manifest["protocol"]["item_warm_min_ratings"] == 11


def test_four_scenario_codes(tmp_path):
    # support 1 + query 1. Users 1-6 rate early (plus 10 later, untruncated-away ratings each, which
    # count for split_time), users 7-12 only late. Item 500 is rated by all 12 users (existing);
    # item 700 + u only by user u (new).
    ratings = []
    for user in range(1, 13):
        t = user if user <= 6 else 10_000 + user
        ratings += [(user, 500, 3, t), (user, 700 + user, 3, t + 100)]
        if user <= 6:
            ratings += [(user, 900 + k, 3, 200 + 10 * user + k) for k in range(10)]
    manifest, tasks = run(tmp_path, ratings, support_size=1, query_size=1)
    # N = 84, index round(67.2) = 67 falls among the early extra ratings: split_time < 10_000.
    assert manifest["split_time"] < 10_000
    for user in range(1, 13):
        codes = tasks[user]["support"]["scenarios"] + tasks[user]["query"]["scenarios"]
        assert codes == ([0, 1] if user <= 6 else [2, 3])
    assert manifest["scenario_counts"] == {"existing_user_existing_item": 6, "existing_user_new_item": 6,
                                           "new_user_existing_item": 6, "new_user_new_item": 6}


def test_user_split_is_seeded_permutation_of_sorted_ids():
    ids = np.array([13, 2, 7, 5, 11, 3, 17, 19, 23, 29, 31, 37, 41])
    train, test = split_users(ids, 0.8, 100)
    expected = np.random.default_rng(100).permutation(np.sort(ids))
    assert len(train) == 10 and len(test) == 3  # round(10.4) = 10
    assert train == sorted(expected[:10].tolist()) and test == sorted(expected[10:].tolist())
    assert split_users(ids, 0.8, 100) == (train, test)
    assert split_users(ids, 0.8, 101) != (train, test)
    assert split_users(ids[::-1], 0.8, 100) == (train, test)  # the ids' order in the file does not matter


def test_user_split_rounds_half_up():
    train, test = split_users(np.arange(1, 6), 0.5, 100)  # 0.5 * 5 = 2.5 -> 3 (Python's round gives 2)
    assert (len(train), len(test)) == (3, 2)


def test_split_saved_in_manifest_covers_all_users(tmp_path):
    ratings = [(u, 10 + k, 3, 100 * u + k) for u in range(1, 11) for k in range(3)]
    manifest, tasks = run(tmp_path, ratings, **TINY)
    assert sorted(manifest["split"]["train"] + manifest["split"]["test"]) == sorted(tasks)
    assert (manifest["n_train_users"], manifest["n_test_users"]) == (8, 2)
    assert all(tasks[u]["split"] == "train" for u in manifest["split"]["train"])
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["split"] == manifest["split"]
