"""bench/vmap_engine.py: its vmap engine computes what the batched engine computes, and the
benchmark runs end to end on a tiny synthetic dataset."""
import json
import sys

import torch

from models import MAMO, make_engine, meta_train_step, predict_query
from tests.conftest import ROOT, TINY_FEATURES, random_batch, small_config

sys.path.insert(0, str(ROOT / "bench"))
import vmap_engine  # noqa: E402


def test_vmap_engine_equals_the_batched_engine_through_training():
    cfg = small_config(meta_optimizer="sgd", grad_clip=0.3)
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(MAMO(TINY_FEATURES, 5, 1, cfg, torch.Generator().manual_seed(1)).to(torch.float64))
    engines = [make_engine(models[0], "batched"), vmap_engine.VmapEngine(models[1])]
    optimizers = [torch.optim.SGD(m.meta_parameters(), lr=0.5) for m in models]
    for step in range(3):
        batch = random_batch(3, seed=step)
        losses = [meta_train_step(m, e, batch, o) for m, e, o in zip(models, engines, optimizers)]
        assert torch.allclose(losses[0], losses[1], atol=1e-10)
    assert vmap_engine.max_state_difference(models[0], models[1]) < 1e-10
    test = random_batch(4, seed=9)
    assert torch.allclose(predict_query(models[0], engines[0], test), predict_query(models[1], engines[1], test),
                          atol=1e-10)


def test_vmap_benchmark_writes_its_measures(tmp_path):
    out = tmp_path / "vmap.json"
    vmap_engine.main(["--n-users", "80", "--users", "4", "--users-per-step", "2", "--rounds", "2",
                      "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["users"] == 4 and result["rounds"] == 2
    for path in ("batched", "vmap"):
        assert len(result[path]["train_users_per_second_rounds"]) == 2
        assert result[path]["eval_users_per_second"] > 0
    assert result["train_speedup_batched_over_vmap"] > 0
    agreement = result["agreement"]
    assert 0 <= agreement["query_outputs_max_abs_difference_float32"] < 1e-4
    assert 0 <= agreement["state_after_one_step_max_abs_difference_float64"] < 1e-10
