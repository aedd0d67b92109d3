"""The rule that sets the global learning rate from users_per_step (meta_lr.py) and its use."""
import pytest
import torch

from mamoRec import MAMRec
from meta_lr import meta_learning_rate
from tests.conftest import TINY_FEATURES, random_batch, small_config


@pytest.mark.parametrize("users_per_step, scaling, expected", [
    (8, "sqrt", 0.0025),      # 0.005 * sqrt(8 / 32) = 0.005 / 2
    (128, "sqrt", 0.01),      # 0.005 * sqrt(4)
    (2, "sqrt", 0.00125),     # 0.005 * sqrt(1 / 16) = 0.005 / 4
    (8, "linear", 0.00125),   # 0.005 / 4
    (128, "linear", 0.02),    # 0.005 * 4
    (1, "linear", 0.00015625),  # 0.005 / 32
    (1, "none", 0.005),
    (128, "none", 0.005),
])
def test_hand_computed_rates(users_per_step, scaling, expected):
    assert meta_learning_rate(0.005, users_per_step, scaling) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scaling", ["none", "sqrt", "linear"])
def test_every_rule_keeps_lambda_exactly_at_32_users_per_step(scaling):
    for rate in (0.005, 0.0123456789, 1e-7):
        assert meta_learning_rate(rate, 32, scaling) == rate


def test_bad_rule_or_step_size_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="lambda_scaling must be one of none, sqrt, linear, got 'square'"):
        meta_learning_rate(0.005, 8, "square")
    with pytest.raises(ValueError, match="users_per_step must be at least 1, got 0"):
        meta_learning_rate(0.005, 0, "sqrt")


@pytest.mark.parametrize("scaling, expected", [("none", 0.005), ("sqrt", 0.0025), ("linear", 0.00125)])
def test_the_global_optimiser_uses_the_scaled_rate(scaling, expected, tmp_path):
    cfg = small_config(users_per_step=8, lambda_scaling=scaling, **{"lambda": 0.005})
    manifest = {"features": TINY_FEATURES, "n_rating_classes": 5, "rating_min": 1}
    tasks = random_batch(4)
    trainer = MAMRec(cfg, manifest, tasks, tasks, tmp_path, torch.device("cpu"))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
