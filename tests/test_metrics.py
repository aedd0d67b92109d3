"""Metric tests with hand-computed answers (LensKit style): the expected value is spelled out."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from utils import (
    SCENARIOS,
    dcg,
    evaluation_table,
    expected_rating,
    format_results,
    ndcg_at_k,
    point_prediction,
)

# Discounts 1 / log2(position + 1) for positions 1..3.
D1, D2, D3 = 1.0, 1.0 / math.log2(3), 1.0 / math.log2(4)


def gain(rating):
    return 2**rating - 1


# --- rating predictions ------------------------------------------------------------------------


def test_expected_rating_hand_example():
    probs = [[0.1, 0.2, 0.3, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0, 1.0]]
    # 0.1*1 + 0.2*2 + 0.3*3 + 0.2*4 + 0.2*5 = 0.1 + 0.4 + 0.9 + 0.8 + 1.0 = 3.2; one-hot on 5 -> 5.
    assert expected_rating(probs) == pytest.approx([3.2, 5.0])
    # With rating_min=0 every rating is one lower.
    assert expected_rating(probs, rating_min=0) == pytest.approx([2.2, 4.0])


def test_expected_rating_accepts_torch_and_returns_float64():
    probs = torch.tensor([[0.5, 0.5]], dtype=torch.float32)
    result = expected_rating(probs)
    assert result.dtype == np.float64
    assert result == pytest.approx([1.5])  # 0.5*1 + 0.5*2


def test_argmax_versus_expected_prediction():
    probs = np.array([[0.4, 0.0, 0.0, 0.0, 0.6], [0.1, 0.2, 0.4, 0.2, 0.1]])
    # argmax: class 4 -> rating 5; class 2 -> rating 3.
    assert point_prediction(probs).tolist() == [5.0, 3.0]
    # expected: 0.4*1 + 0.6*5 = 3.4; symmetric around 3 -> 3.0.
    assert point_prediction(probs, mode="expected") == pytest.approx([3.4, 3.0])


def test_argmax_ties_pick_lowest_class_like_torch():
    probs = torch.tensor([[0.25, 0.25, 0.5, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5]])
    assert point_prediction(probs).tolist() == [3.0, 1.0]
    assert point_prediction(probs).tolist() == (torch.argmax(probs, dim=1) + 1).tolist()


def test_point_prediction_rejects_unknown_mode_and_bad_shape():
    with pytest.raises(ValueError, match="mode"):
        point_prediction([[1.0]], mode="median")
    with pytest.raises(ValueError, match="2-D"):
        point_prediction([0.2, 0.8])


# --- DCG / NDCG ---------------------------------------------------------------------------------


def test_perfect_ranking_is_one():
    assert ndcg_at_k([3.0, 2.0, 1.0], [5, 4, 3]) == 1.0
    assert ndcg_at_k([0.9, 0.1, 0.5, 0.7, 0.3], [5, 1, 3, 4, 2]) == 1.0


def test_reversed_ranking_hand_computed():
    # ratings [5, 4, 3], scores [1, 2, 3]: ranked order is ratings 3, 4, 5.
    # DCG = 7/log2(2) + 15/log2(3) + 31/log2(4); ideal = 31/log2(2) + 15/log2(3) + 7/log2(4).
    dcg_value = gain(3) / math.log2(2) + gain(4) / math.log2(3) + gain(5) / math.log2(4)
    ideal = gain(5) / math.log2(2) + gain(4) / math.log2(3) + gain(3) / math.log2(4)
    assert dcg([1, 2, 3], [5, 4, 3]) == pytest.approx(dcg_value)
    assert ndcg_at_k([1, 2, 3], [5, 4, 3]) == pytest.approx(dcg_value / ideal)
    # = (22.5 + 9.4640) / (34.5 + 9.4640) = 31.9640 / 43.9640, as 15 / log2(3) = 9.4640.
    assert ndcg_at_k([1, 2, 3], [5, 4, 3]) == pytest.approx(0.72705, abs=1e-5)


def test_tied_pair_shares_average_discount():
    # ratings [5, 3, 1], scores [2, 2, 1]: ratings 5 and 3 tie for positions 1-2 and each get
    # (D1 + D2) / 2; rating 1 is alone at position 3.
    dcg_value = (gain(5) + gain(3)) * (D1 + D2) / 2 + gain(1) * D3
    ideal = gain(5) * D1 + gain(3) * D2 + gain(1) * D3
    assert dcg([2, 2, 1], [5, 3, 1]) == pytest.approx(dcg_value)
    assert ndcg_at_k([2, 2, 1], [5, 3, 1]) == pytest.approx(dcg_value / ideal)


def test_tie_group_straddling_the_cut():
    # scores [3, 1, 1, 1], ratings [1, 5, 4, 2], k=3: rating 1 alone at position 1; the tied
    # group occupies positions 2, 3, 4 whose discounts are D2, D3 and 0 (beyond the cut).
    dcg_value = gain(1) * D1 + (gain(5) + gain(4) + gain(2)) * (D2 + D3 + 0.0) / 3
    ideal = gain(5) * D1 + gain(4) * D2 + gain(2) * D3
    assert ndcg_at_k([3, 1, 1, 1], [1, 5, 4, 2]) == pytest.approx(dcg_value / ideal)


def test_all_equal_scores_do_not_depend_on_input_order():
    ratings = [5, 4, 3, 2, 1]
    # Every item gets the mean discount of positions 1..5 cut at 3: (D1 + D2 + D3 + 0 + 0) / 5.
    expected_dcg = sum(gain(r) for r in ratings) * (D1 + D2 + D3) / 5
    values = {round(dcg([0.0] * 5, list(p)), 12) for p in itertools.permutations(ratings)}
    assert values == {round(expected_dcg, 12)}


def test_partial_ties_do_not_depend_on_input_order():
    items = [(0.9, 2), (0.5, 5), (0.5, 1), (0.5, 4), (0.1, 3)]
    values = set()
    for permutation in itertools.permutations(items):
        scores, ratings = zip(*permutation)
        values.add(round(ndcg_at_k(scores, ratings), 12))
    assert len(values) == 1


def test_fewer_items_than_k():
    # ratings [4, 2], scores [0.1, 0.9]: ranked 2 then 4; the cut is min(3, 2) = 2.
    dcg_value = gain(2) * D1 + gain(4) * D2
    ideal = gain(4) * D1 + gain(2) * D2
    assert ndcg_at_k([0.1, 0.9], [4, 2]) == pytest.approx(dcg_value / ideal)


def test_one_item_is_one_and_empty_is_none():
    assert ndcg_at_k([0.3], [4]) == 1.0
    assert ndcg_at_k([], []) is None
    assert dcg([], []) == 0.0


def test_ideal_dcg_zero_is_undefined():
    # All gains 2^0 - 1 = 0: no ranking is better than another, NDCG is undefined.
    assert ndcg_at_k([1.0, 2.0], [0, 0]) is None


def test_k_cut_only_top_three_count():
    # 5 items ranked worst-first: ratings in ranked order 1, 2, 3, 4, 5; only 1, 2, 3 count.
    scores, ratings = [5, 4, 3, 2, 1], [1, 2, 3, 4, 5]
    dcg_value = gain(1) * D1 + gain(2) * D2 + gain(3) * D3
    ideal = gain(5) * D1 + gain(4) * D2 + gain(3) * D3
    assert dcg(scores, ratings) == pytest.approx(dcg_value)
    assert ndcg_at_k(scores, ratings) == pytest.approx(dcg_value / ideal)
    # Items below the cut change the ideal, never the DCG.
    assert dcg(scores, [1, 2, 3, 1, 1]) == pytest.approx(dcg_value)
    # With k=5 all positions count.
    assert dcg(scores, ratings, k=5) == pytest.approx(
        sum(gain(r) / math.log2(p + 1) for p, r in enumerate(ratings, start=1))
    )


def test_ndcg_accepts_torch_tensors():
    assert ndcg_at_k(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5, 4, 3])) == pytest.approx(
        ndcg_at_k([1, 2, 3], [5, 4, 3])
    )


def test_ndcg_input_errors():
    with pytest.raises(ValueError, match="shape"):
        ndcg_at_k([1.0, 2.0], [5])
    with pytest.raises(ValueError, match="NaN"):
        ndcg_at_k([float("nan"), 1.0], [5, 4])
    with pytest.raises(ValueError, match="k must"):
        ndcg_at_k([1.0], [5], k=0)


# --- evaluation table ---------------------------------------------------------------------------


def test_mae_rmse_hand_example():
    table = evaluation_table(
        user_ids=[7, 7, 7, 7],
        scenarios=[0, 0, 0, 0],
        true_ratings=[5, 4, 3, 1],
        predicted_ratings=[4, 4, 5, 1],
        ranking_scores=[4, 3, 2, 1],
    )
    # errors -1, 0, 2, 0: MAE = 3/4; RMSE = sqrt((1 + 0 + 4 + 0) / 4) = sqrt(5)/2.
    for subset in ("existing_user_existing_item", "all"):
        assert table[subset]["mae"] == pytest.approx(0.75)
        assert table[subset]["rmse"] == pytest.approx(math.sqrt(5) / 2)


# Hand-made query set: three users, mixed scenarios.
#   user 1 (existing): items in scenario 0 (ratings 5, 3), scenario 1 (rating 4)
#   user 2 (existing): scenario 0 (ratings 2, 4, 1)
#   user 3 (new):      scenario 3 (ratings 3, 5)
# Scenario 2 is absent.
USERS = [1, 1, 1, 2, 2, 2, 3, 3]
CODES = [0, 0, 1, 0, 0, 0, 3, 3]
TRUTH = [5, 3, 4, 2, 4, 1, 3, 5]
PREDICTED = [4, 3, 4, 3, 3, 1, 3, 3]
SCORES = [4.5, 3.5, 2.0, 1.0, 2.0, 3.0, 4.0, 4.0]


@pytest.fixture
def table():
    return evaluation_table(USERS, CODES, TRUTH, PREDICTED, SCORES)


def test_table_keys_and_json_types(table):
    assert list(table) == list(SCENARIOS) + ["all"]
    for row in table.values():
        assert set(row) == {"mae", "rmse", "ndcg@3", "n_ratings", "n_users", "n_ndcg_users"}
        for key in ("mae", "rmse", "ndcg@3"):
            assert row[key] is None or type(row[key]) is float
        for key in ("n_ratings", "n_users", "n_ndcg_users"):
            assert type(row[key]) is int
    assert json.loads(json.dumps(table)) == table


def test_scenario_0_two_users_with_several_items(table):
    row = table["existing_user_existing_item"]
    # errors: user 1 -1, 0; user 2 +1, -1, 0 -> |e| sum 3 over 5; e^2 sum 3 over 5.
    assert row["mae"] == pytest.approx(3 / 5)
    assert row["rmse"] == pytest.approx(math.sqrt(3 / 5))
    # user 1: scores 4.5, 3.5 rank ratings 5, 3 perfectly -> 1.0.
    # user 2: scores 1, 2, 3 rank ratings 1, 4, 2 (ranked order) against ideal 4, 2, 1.
    user2 = (gain(1) * D1 + gain(4) * D2 + gain(2) * D3) / (
        gain(4) * D1 + gain(2) * D2 + gain(1) * D3
    )
    assert row["ndcg@3"] == pytest.approx((1.0 + user2) / 2)
    assert (row["n_ratings"], row["n_users"], row["n_ndcg_users"]) == (5, 2, 2)


def test_single_item_user_counts_in_mae_not_in_ndcg(table):
    row = table["existing_user_new_item"]
    assert row["mae"] == 0.0 and row["rmse"] == 0.0  # one rating, predicted exactly
    assert row["ndcg@3"] is None
    assert (row["n_ratings"], row["n_users"], row["n_ndcg_users"]) == (1, 1, 0)


def test_a_user_whose_ideal_dcg_is_zero_is_left_out_of_ndcg_not_counted_as_zero():
    """User 1's ratings are all 0 (no ranking is better than another): MAE counts them, NDCG@3 leaves
    the user out instead of averaging in a 0."""
    row = evaluation_table([1, 1, 2, 2], [0, 0, 0, 0], [0, 0, 5, 1], [1, 1, 5, 1], [1.0, 2.0, 2.0, 1.0])["all"]
    assert row["ndcg@3"] == 1.0 and row["n_ndcg_users"] == 1 and row["n_users"] == 2
    assert row["mae"] == pytest.approx(0.5)  # errors 1, 1, 0, 0


def test_absent_scenario_is_none(table):
    assert table["new_user_existing_item"] == {
        "mae": None, "rmse": None, "ndcg@3": None, "n_ratings": 0, "n_users": 0, "n_ndcg_users": 0,
    }


def test_scenario_with_tied_scores(table):
    row = table["new_user_new_item"]
    # user 3: equal scores for ratings 3 and 5 -> both get (D1 + D2) / 2.
    expected = (gain(3) + gain(5)) * (D1 + D2) / 2 / (gain(5) * D1 + gain(3) * D2)
    assert row["ndcg@3"] == pytest.approx(expected)
    # errors 0, -2: MAE 1, RMSE sqrt(4/2).
    assert row["mae"] == pytest.approx(1.0)
    assert row["rmse"] == pytest.approx(math.sqrt(2))


def test_all_uses_each_users_full_query(table):
    row = table["all"]
    # errors -1, 0, 0, 1, -1, 0, 0, -2: |e| 5/8, e^2 7/8.
    assert row["mae"] == pytest.approx(5 / 8)
    assert row["rmse"] == pytest.approx(math.sqrt(7 / 8))
    # user 1 over all 3 items: scores 4.5, 3.5, 2.0 rank ratings 5, 3, 4; ideal 5, 4, 3.
    user1 = (gain(5) * D1 + gain(3) * D2 + gain(4) * D3) / (
        gain(5) * D1 + gain(4) * D2 + gain(3) * D3
    )
    user2 = ndcg_at_k([1.0, 2.0, 3.0], [2, 4, 1])
    user3 = ndcg_at_k([4.0, 4.0], [3, 5])
    assert row["ndcg@3"] == pytest.approx((user1 + user2 + user3) / 3)
    assert (row["n_ratings"], row["n_users"], row["n_ndcg_users"]) == (8, 3, 3)


def test_table_does_not_depend_on_row_order_and_accepts_torch(table):
    permutation = np.random.default_rng(0).permutation(len(USERS))
    columns = (USERS, CODES, TRUTH, PREDICTED, SCORES)
    shuffled = evaluation_table(*(torch.tensor(np.asarray(c)[permutation]) for c in columns))
    assert shuffled.keys() == table.keys()
    for subset in table:
        assert shuffled[subset] == pytest.approx(table[subset])


def test_table_key_follows_k():
    table = evaluation_table([1, 1], [0, 0], [5, 4], [5, 4], [2.0, 1.0], k=5)
    assert table["all"]["ndcg@5"] == 1.0


def test_table_input_errors():
    with pytest.raises(ValueError, match="scenario codes"):
        evaluation_table([1], [4], [5], [5], [1.0])
    with pytest.raises(ValueError, match="shape"):
        evaluation_table([1, 2], [0], [5], [5], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        evaluation_table([1], [0], [5], [float("nan")], [1.0])


def test_empty_input_gives_empty_table():
    table = evaluation_table([], [], [], [], [])
    assert all(row["n_ratings"] == 0 and row["mae"] is None for row in table.values())


# --- text report -------------------------------------------------------------------------------


def test_format_results_blocks_and_alignment(table):
    text = format_results({"mamo": table, "support mean": table})
    blocks = text.split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [f"[{s}]" for s in (*SCENARIOS, "all")]
    for block in blocks:
        header, *rows = block.splitlines()[1:]
        assert header.split()[:4] == ["method", "MAE", "RMSE", "NDCG@3"]
        assert [row.split()[0] for row in rows] == ["mamo", "support"]
        assert {len(line) for line in (header, *rows)} == {len(header)}  # aligned
    absent = blocks[SCENARIOS.index("new_user_existing_item")].splitlines()[2]
    assert absent.split()[1:] == ["-", "-", "-", "0", "0", "0"]
    all_row = blocks[-1].splitlines()[2]
    assert all_row.split()[1:3] == [f"{5 / 8:.4f}", f"{math.sqrt(7 / 8):.4f}"]
