"""mamoRec's parts on hand-made tiny inputs: reference rows, query rows, user order, the
`prediction` setting, the ablations, run-folder names, epochs.csv."""
import csv
import dataclasses
import random
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

import mamoRec
from models import MEM_WEIGHT
from tests.conftest import TINY_FEATURES, random_batch, small_config
from utils import TaskBatch

MANIFEST = {"features": TINY_FEATURES, "n_rating_classes": 5, "rating_min": 1, "split": {"train": [], "test": []}}


def with_ids(batch, first_user_id):
    """`batch` with raw user ids first_user_id, first_user_id + 1, ... and item ids 100 + row."""
    n_users, n_rows = batch.ratings.shape
    return dataclasses.replace(batch, user_ids=torch.arange(n_users) + first_user_id,
                               item_ids=(torch.arange(n_rows) + 100).expand(n_users, -1).clone())


def trainer(tmp_path, log=None, diagnostics=True, **overrides):
    """A MAMRec on 10 random training and 4 test users of TINY_FEATURES; `log` collects its lines."""
    cfg = small_config(**{"device": "cpu", "n_epoch": 2, **overrides})
    train, test = with_ids(random_batch(10, seed=1), 1), with_ids(random_batch(4, seed=2), 50)
    return mamoRec.MAMRec(cfg, MANIFEST, train, test, tmp_path, torch.device("cpu"), log=log or (lambda line: None),
                          diagnostics=diagnostics)


def hand_batch(support_ratings, query_ratings, support_scenarios, query_scenarios):
    """One-feature-free batch of users with the given ratings and scenario codes (lists of lists)."""
    ratings = torch.tensor([s + q for s, q in zip(support_ratings, query_ratings)])
    n_users, n_rows = ratings.shape
    return TaskBatch(user_codes=torch.zeros(n_users, 1, dtype=torch.long), item_features={}, ratings=ratings,
                     scenarios=torch.tensor([s + q for s, q in zip(support_scenarios, query_scenarios)]),
                     support_size=len(support_ratings[0]), user_ids=torch.tensor([7, 9][:n_users]),
                     item_ids=torch.arange(n_users * n_rows).reshape(n_users, n_rows) + 10)


def test_reference_rows_by_hand():
    train = hand_batch([[1, 2, 3]], [[4, 5]], [[0, 0, 0]], [[0, 0]])  # mean 3
    test = hand_batch([[1, 1, 4], [5, 5, 5]], [[2, 5], [3, 4]], [[0] * 3] * 2, [[0, 1], [2, 3]])
    references = mamoRec.reference_predictions(train, test)
    support_mean = references["support_mean"]
    assert support_mean.prediction.tolist() == [[2.0, 2.0], [5.0, 5.0]]  # from the support rows, not the query
    assert references["train_mean"].prediction.tolist() == [[3.0, 3.0], [3.0, 3.0]]
    table = support_mean.table()
    assert table["all"]["mae"] == pytest.approx((0 + 3 + 2 + 1) / 4)
    assert table["all"]["rmse"] == pytest.approx(np.sqrt((0 + 9 + 4 + 1) / 4))


def test_query_rows_carry_the_query_scenarios_ids_and_ratings():
    test = hand_batch([[1, 2, 3], [3, 3, 3]], [[4, 5], [1, 2]], [[0, 0, 0], [0, 0, 0]], [[3, 1], [2, 3]])
    record = mamoRec.query_record(test, np.zeros((2, 2)), np.zeros((2, 2)))
    assert record.scenarios.tolist() == [[3, 1], [2, 3]]
    assert record.ratings.tolist() == [[4, 5], [1, 2]]
    assert record.user_ids.tolist() == [[7, 7], [9, 9]] and record.item_ids.tolist() == [[13, 14], [18, 19]]
    table = record.table()
    assert [table[name]["n_ratings"] for name in mamoRec.SCENARIOS] == [0, 1, 1, 2]


def test_every_epoch_visits_every_training_user_in_a_new_order(tmp_path, monkeypatch):
    model_trainer = trainer(tmp_path, users_per_step=3)
    visited = []
    original = mamoRec.meta_train_step

    def recording(model, engine, batch, optimizer):
        visited.append(batch.user_ids.tolist())
        return original(model, engine, batch, optimizer)

    monkeypatch.setattr(mamoRec, "meta_train_step", recording)
    model_trainer.fit(2)
    first, second = sum(visited[:4], []), sum(visited[4:], [])
    assert len(visited) == 8 and sorted(first) == sorted(second) == list(range(1, 11))
    assert first != second
    assert model_trainer.user_order(1).tolist() == trainer(tmp_path).user_order(1).tolist()  # from (seed, epoch)
    assert trainer(tmp_path, seed=1).user_order(1).tolist() == np.random.default_rng([1, 1]).permutation(10).tolist()
    assert trainer(tmp_path, seed=2).user_order(1).tolist() != trainer(tmp_path, seed=1).user_order(1).tolist()


def test_the_epoch_loss_is_the_mean_over_users_not_over_steps(tmp_path, monkeypatch):
    """Steps of 3, 3, 3 and 1 users, each user's loss its id: the mean over users is 5.5 in any order."""
    monkeypatch.setattr(mamoRec, "meta_train_step", lambda model, engine, batch, optimizer: batch.user_ids.double())
    assert trainer(tmp_path, users_per_step=3).train_epoch(1) == 5.5


@pytest.mark.parametrize("eval_batch_users", [1, 3])
def test_evaluation_in_batches_scores_every_test_user_once_in_order(tmp_path, eval_batch_users):
    """4 test users in batches of 3 + 1 (or 1 each) give the predictions of one batch of all four."""
    whole = trainer(tmp_path / "whole", eval_batch_users=32).predict_test()
    batched = trainer(tmp_path / "batched", eval_batch_users=eval_batch_users).predict_test()
    assert batched.user_ids[:, 0].tolist() == whole.user_ids[:, 0].tolist() == [50, 51, 52, 53]
    assert np.allclose(batched.prediction, whole.prediction, atol=1e-6)
    assert np.allclose(batched.ranking_score, whole.ranking_score, atol=1e-6)


@pytest.mark.parametrize("head", ["classification", "regression"])
def test_the_prediction_setting_decides_the_point_prediction(head, tmp_path):
    expected = trainer(tmp_path, prediction="expected", head=head).predict_test()
    argmax = trainer(tmp_path, prediction="argmax", head=head).predict_test()
    assert np.array_equal(expected.ranking_score, argmax.ranking_score)  # same model, same ranking
    assert np.array_equal(expected.prediction, expected.ranking_score)
    if head == "classification":
        assert np.all(np.isin(argmax.prediction, [1, 2, 3, 4, 5]))
        model_trainer = trainer(tmp_path, prediction="argmax")
        outputs = mamoRec.predict_query(model_trainer.model, model_trainer.engine, model_trainer.test_tasks)
        assert np.array_equal(argmax.prediction, outputs.argmax(-1).numpy() + 1)
        assert argmax.table()["all"]["mae"] != expected.table()["all"]["mae"]
    else:  # one output: nothing to choose
        assert np.array_equal(argmax.prediction, expected.prediction)


def test_ablations_train_without_memories_and_the_frozen_one_without_its_mem_layer(tmp_path):
    cfg = small_config(device="cpu")
    assert mamoRec.method_config(cfg, "mamo") == cfg
    models = {method: trainer(tmp_path, **mamoRec.method_config(cfg, method)).model
              for method in ("mamo", "no_memory", "no_memory_frozen")}
    assert models["mamo"].memories is not None
    assert models["no_memory"].memories is None and models["no_memory_frozen"].memories is None
    mem_weight = dict(models["no_memory_frozen"].named_parameters())[f"theta_net.{MEM_WEIGHT}"]
    assert all(p is not mem_weight for p in models["no_memory_frozen"].meta_parameters())
    no_memory_weight = dict(models["no_memory"].named_parameters())[f"theta_net.{MEM_WEIGHT}"]
    assert any(p is no_memory_weight for p in models["no_memory"].meta_parameters())


def test_training_draws_nothing_from_numpy_or_python_global_generators(tmp_path):
    """Why checkpoints keep no numpy or Python generator state."""
    model_trainer = trainer(tmp_path)
    np.random.seed(3)
    random.seed(3)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    model_trainer.fit(2)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(numpy_state, after)) and random.getstate() == python_state


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    first = trainer(tmp_path)
    first.fit(1)
    second = trainer(tmp_path)
    assert second.load_checkpoint() and second.epoch == 1 and second.epochs == first.epochs
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(first.model.memories.task, second.model.memories.task)


def test_a_checkpoint_of_another_split_or_other_data_is_refused(tmp_path):
    trainer(tmp_path).save_checkpoint()
    moved = trainer(tmp_path)
    moved.manifest = {**MANIFEST, "split": {"train": [1, 2], "test": [3]}}
    with pytest.raises(mamoRec.RunError, match="another train/test split than the run"):
        moved.load_checkpoint()
    changed = trainer(tmp_path)
    changed.data_checksum = "0" * 32
    with pytest.raises(mamoRec.RunError, match="differs from the run's data"):
        changed.load_checkpoint()
    assert trainer(tmp_path).load_checkpoint()


def test_default_run_folders_are_unique_per_run(tmp_path):
    template = str(tmp_path / "runs" / "{dataset}" / "{timestamp}-seed{seed}")
    started = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    planned = mamoRec.fill_folder(template, {"dataset": "synthetic", "seed": 3}, started)
    assert planned == tmp_path / "runs" / "synthetic" / "20240506T070809Z-seed3"
    claimed = [mamoRec.claim_run_dir(template, planned, overwrite=False) for _ in range(3)]
    assert [path.name for path in claimed] == ["20240506T070809Z-seed3", "20240506T070809Z-seed3-2",
                                               "20240506T070809Z-seed3-3"]
    with pytest.raises(mamoRec.RunError, match="bad placeholder"):
        mamoRec.fill_folder("runs/{user}", {"dataset": "synthetic", "seed": 3}, started)


def test_epochs_csv_rows_carry_each_methods_own_loss_and_diagnostics(tmp_path):
    table = {subset: {"mae": 1.0, "rmse": 2.0, "ndcg@3": None} for subset in mamoRec.SUBSETS}
    memory = {"attention_max_mean": 0.75, "attention_spread": 0.125, "slot_usage": [0.625, 0.375],
              "profile_slot_spread": 1.5, "task_slot_spread": None, "task_read_norm": None,
              "phi_mem_weight_norm": None, "task_read_ratio": None, "bias_term_ratio": 0.01}
    epochs = [{"epoch": 1, "train_loss": {"mamo": 0.5, "no_memory": 0.25},
               "results": {"mamo": table, "train_mean": table, "no_memory": table}, "memory": {"mamo": memory}}]
    mamoRec.write_epochs_csv(tmp_path / "epochs.csv", epochs, n_slots=2)
    with open(tmp_path / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], row["train_loss"]) for row in rows] == [("mamo", "0.5"), ("train_mean", ""),
                                                                     ("no_memory", "0.25")]
    assert rows[0]["all_mae"] == "1.0" and rows[0]["all_ndcg@3"] == ""
    assert (rows[0]["memory_attention_spread"], rows[0]["memory_slot_usage_1"], rows[0]["memory_slot_usage_2"],
            rows[0]["memory_task_read_norm"], rows[0]["memory_bias_term_ratio"]) == ("0.125", "0.625", "0.375", "", "0.01")
    memory_columns = [name for name in rows[0] if name.startswith("memory_")]
    assert len(memory_columns) == len(memory) + 1  # slot_usage takes K = 2 columns
    assert all(row[name] == "" for row in rows[1:] for name in memory_columns)


def test_one_line_joins_multi_line_messages():
    assert mamoRec.one_line(ValueError("missing files:\n  a <- url\n\n  b <- url")) == "missing files: a <- url; b <- url"
    assert mamoRec.one_line(ValueError("first\nsecond")) == "first; second"


def test_the_table_scores_the_point_predictions_and_ranks_by_the_ranking_scores():
    """MAE / RMSE from `prediction`, NDCG@3 from `ranking_score`: here the point predictions rank the
    two items the wrong way round and the ranking scores the right way."""
    record = mamoRec.QueryPredictions(
        user_ids=np.array([[7, 7]]), item_ids=np.array([[13, 14]]), scenarios=np.array([[0, 0]]),
        ratings=np.array([[5, 1]]), prediction=np.array([[2.0, 4.0]]), ranking_score=np.array([[4.0, 2.0]]))
    row = record.table()["all"]
    assert row["ndcg@3"] == 1.0  # ranked by the point predictions: (1 + 31 / log2 3) / (31 + 1 / log2 3) = 0.65
    assert row["mae"] == 3.0 and row["rmse"] == 3.0  # errors 3 and 3


def test_predictions_csv_writes_each_column_from_its_own_field(tmp_path):
    record = mamoRec.QueryPredictions(
        user_ids=np.array([[7, 7]]), item_ids=np.array([[13, 14]]), scenarios=np.array([[3, 0]]),
        ratings=np.array([[4, 1]]), prediction=np.array([[4.0, 2.0]]), ranking_score=np.array([[3.25, 1 / 3]]))
    mamoRec.write_predictions_csv(tmp_path / "p.csv", {"mamo": record})
    assert (tmp_path / "p.csv").read_text().splitlines() == [
        "method,user_id,item_id,scenario,rating,prediction,ranking_score",
        "mamo,7,13,new_user_new_item,4,4.0,3.25",
        f"mamo,7,14,existing_user_existing_item,1,2.0,{1 / 3!r}"]
