"""Cold-start inference from a run folder (mamoRec.load_run), after the data folder is gone."""
import csv
import json
from collections import defaultdict

import numpy as np
import pytest

import mamoRec
from data_prep.task_io import load_processed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_users(synthetic_dir, finished_run):
    """Per test user of the finished run: (raw profile, support pairs, query item ids)."""
    assert not (finished_run.run_dir.parents[2] / "data").exists()  # the run's data folder is deleted
    manifest, tasks = load_processed(synthetic_dir)
    vocabularies = json.loads((synthetic_dir / "vocabularies.json").read_text())["user"]
    fields = [field["name"] for field in manifest["features"]["user"]]
    users = {}
    for user_id in manifest["split"]["test"]:
        task = tasks[user_id]
        profile = {name: vocabularies[name][code] for name, code in zip(fields, task["user_features"])}
        support = list(zip(task["support"]["item_ids"], task["support"]["ratings"]))
        users[user_id] = (profile, support, task["query"]["item_ids"])
    return users


@pytest.fixture(scope="module")
def saved_predictions(finished_run):
    """{(method, user_id): {item_id: (prediction, ranking score)}} from predictions.csv."""
    rows = defaultdict(dict)
    with open(finished_run.run_dir / "predictions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["method"], int(row["user_id"])][int(row["item_id"])] = (float(row["prediction"]),
                                                                             float(row["ranking_score"]))
    return rows


@pytest.mark.parametrize("method", ["mamo", "no_memory", "no_memory_frozen"])
def test_predict_on_a_test_users_own_support_equals_the_evaluation(method, finished_run, test_users,
                                                                   saved_predictions):
    run = mamoRec.load_run(finished_run.run_dir, method=method)
    for user_id, (profile, support, query_items) in test_users.items():
        saved = saved_predictions[method, user_id]
        predicted = run.predict(profile, support, query_items)
        assert np.allclose(predicted, [saved[item][0] for item in query_items], rtol=0, atol=1e-5), user_id


def test_evaluation_and_inference_share_one_prediction_path(finished_run, test_users, monkeypatch):
    """Both call query_predictions: replacing it changes what evaluation and inference return."""
    run = mamoRec.load_run(finished_run.run_dir)
    profile, support, query_items = next(iter(test_users.values()))

    def constant(model, engine, batch, prediction, users_per_batch):
        shape = (batch.ratings.shape[0], batch.ratings.shape[1] - batch.support_size)
        return np.full(shape, 2.5), np.full(shape, 1.5)

    monkeypatch.setattr(mamoRec, "query_predictions", constant)
    assert run.predict(profile, support, query_items) == [2.5] * len(query_items)
    assert {score for _, score in run.recommend(profile, support, k=3)} == {1.5}


def test_recommend_ranks_the_unrated_items_by_expected_rating(finished_run, test_users):
    run = mamoRec.load_run(finished_run.run_dir)
    profile, support, _ = next(iter(test_users.values()))
    recommended = run.recommend(profile, support, k=10)
    rated = {item for item, _ in support}
    unrated = [int(key) for key in run.item_keys if int(key) not in rated]
    assert len(recommended) == 10 and not rated & {item for item, _ in recommended}
    scores = [score for _, score in recommended]
    assert scores == sorted(scores, reverse=True)
    all_scores = run.predict(profile, support, unrated)  # the expected rating: the default point prediction
    assert np.isclose(max(all_scores), scores[0], atol=1e-5)
    assert run.recommend(profile, support, k=len(unrated) + 5) and len(run.recommend(profile, support, k=10_000)) \
        == len(unrated)


def test_profile_values_may_be_strings_or_ints_and_support_of_any_length(finished_run, test_users):
    run = mamoRec.load_run(finished_run.run_dir)
    profile, support, query_items = next(iter(test_users.values()))
    as_ints = {name: int(value) if value.isdigit() else value for name, value in profile.items()}
    assert run.predict(as_ints, support, query_items) == run.predict(profile, support, query_items)
    for length in (1, 7, len(support)):
        predictions = run.predict(profile, support[:length], query_items)
        assert len(predictions) == len(query_items) and all(1 <= value <= 5 for value in predictions)
    longer = support + [(int(key), 4) for key in run.item_keys if int(key) not in {i for i, _ in support}][:5]
    assert len(run.predict(profile, longer, query_items)) == len(query_items)
    assert run.predict(profile, support[:1], query_items) != run.predict(profile, support, query_items)


@pytest.mark.parametrize("change, message", [
    (lambda p, s, q: ({**p, "zip": "12345"}, s, q), "unknown: ['zip']"),
    (lambda p, s, q: ({k: v for k, v in p.items() if k != "age"}, s, q), "missing: ['age']"),
    (lambda p, s, q: ({**p, "gender": "X"}, s, q), "profile gender='X' is not a known value, expected one of F, M"),
    (lambda p, s, q: ("F,25", s, q), "profile must be a dict"),
    (lambda p, s, q: (p, [], q), "support must be a non-empty list"),
    (lambda p, s, q: (p, [(999_999, 4)] + s, q), "unknown item 999999"),
    (lambda p, s, q: (p, s, [999_999]), "unknown item 999999"),
    (lambda p, s, q: (p, s + [s[0]], q), "appears twice"),
    (lambda p, s, q: (p, [(s[0][0], 6)] + s[1:], q), "rating 6 of item"),
    (lambda p, s, q: (p, [(s[0][0], 0)] + s[1:], q), "rating 0 of item"),
    (lambda p, s, q: (p, [(s[0][0], 3.5)] + s[1:], q), "rating 3.5 of item"),
    (lambda p, s, q: (p, [(s[0][0], True)] + s[1:], q), "rating True of item"),
    (lambda p, s, q: (p, [s[0][0]] + s[1:], q), "is not an (item_id, rating) pair"),
])
def test_bad_inputs_get_a_clear_value_error(change, message, finished_run, test_users):
    run = mamoRec.load_run(finished_run.run_dir)
    profile, support, query_items = change(*next(iter(test_users.values())))
    with pytest.raises(ValueError) as error:
        run.predict(profile, support, query_items)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_recommend_refuses_a_bad_k(finished_run, test_users):
    run = mamoRec.load_run(finished_run.run_dir)
    profile, support, _ = next(iter(test_users.values()))
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            run.recommend(profile, support, k=k)


def test_load_run_refuses_a_folder_without_a_run_and_an_unknown_method(finished_run, tmp_path):
    with pytest.raises(ValueError, match="holds no run"):
        mamoRec.load_run(tmp_path)
    with pytest.raises(ValueError, match="method 'maml' is not trained in a run"):
        mamoRec.load_run(finished_run.run_dir, method="maml")


def test_command_line_recommendation(finished_run, test_users, capsys):
    profile, support, _ = next(iter(test_users.values()))
    flags = ["--recommend", str(finished_run.run_dir), "--profile", ",".join(f"{k}={v}" for k, v in profile.items()),
             "--support", ",".join(f"{item}:{rating}" for item, rating in support), "--top-k", "4"]
    assert mamoRec.main(flags) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = mamoRec.load_run(finished_run.run_dir).recommend(profile, support, k=4)
    assert lines == [f"{item}\t{score:.4f}" for item, score in expected]
    assert mamoRec.main(flags[:3] + ["gender:F", *flags[4:]]) == 2
    assert capsys.readouterr().err.strip() == ("error: --profile 'gender:F': expected comma-separated pairs like "
                                               "gender=F,age=25,occupation=4")
    assert mamoRec.main(flags[:5] + ["1:9", "--top-k", "4"]) == 2
    assert "--recommend" in capsys.readouterr().err


def test_ml100k_ages_in_years_map_to_the_age_groups():
    assert mamoRec.raw_field_value("movielens-100k", "age", 24) == "18"
    assert mamoRec.raw_field_value("movielens-100k", "age", "57") == "56"
    assert mamoRec.raw_field_value("movielens", "age", 24) == "24"
    assert mamoRec.raw_field_value("movielens", "gender", " F ") == "F"
