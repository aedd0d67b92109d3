"""bench/metrics_agreement.py: the largest metric difference between two runs, by hand."""
import json
import sys

import pytest

from tests.conftest import ROOT
from utils import SUBSETS

sys.path.insert(0, str(ROOT / "bench"))
import metrics_agreement  # noqa: E402


def table(mae, rmse=1.0, ndcg=0.5, empty_subset=None):
    """A results table with the same metrics in every subset but `all`, whose MAE is `mae`."""
    rows = {subset: {"mae": 0.8, "rmse": rmse, "ndcg@3": ndcg} for subset in SUBSETS}
    rows["all"] = {"mae": mae, "rmse": rmse, "ndcg@3": ndcg}
    if empty_subset:
        rows[empty_subset] = {"mae": None, "rmse": None, "ndcg@3": None}
    return rows


def write_run(folder, results):
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"results": results}))
    return folder


def test_largest_difference_per_shared_method_and_the_exit_status(tmp_path):
    first = write_run(tmp_path / "a", {"mamo": table(0.90, ndcg=0.50), "train_mean": table(1.0)})
    second = write_run(tmp_path / "b", {"mamo": table(0.93, ndcg=0.51), "no_memory": table(2.0)})
    out = tmp_path / "agreement.json"
    assert metrics_agreement.main([str(first), str(second), "--tolerance", "0.05", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["max_abs_difference"] == {"mamo": pytest.approx(0.03)}  # MAE of `all`; NDCG differs by 0.01
    assert record["agree"]
    assert metrics_agreement.main([str(first / "metrics.json"), str(second), "--tolerance", "0.02"]) == 1
    assert metrics_agreement.main([str(first), str(second), "--tolerance", "0.02",
                                   "--subset", "new_user_new_item"]) == 0  # that subset differs only in NDCG


def test_subsets_without_ratings_in_both_runs_are_skipped_and_in_one_run_refused():
    both = metrics_agreement.differences({"mamo": table(0.9, empty_subset="new_user_new_item")},
                                         {"mamo": table(0.9, empty_subset="new_user_new_item")}, SUBSETS)
    assert both == {"mamo": 0.0}
    with pytest.raises(ValueError, match="missing in one run only"):
        metrics_agreement.differences({"mamo": table(0.9, empty_subset="new_user_new_item")}, {"mamo": table(0.9)},
                                      SUBSETS)
    with pytest.raises(ValueError, match="share no method"):
        metrics_agreement.differences({"mamo": table(0.9)}, {"no_memory": table(0.9)}, SUBSETS)
