"""The rules that set the global step from users_per_step (meta_step.py) and their use."""
import pytest
import torch

from mamoRec import MAMRec
from modules.meta_step import meta_step_settings
from tests.conftest import TINY_FEATURES, random_batch, small_config

ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8}


@pytest.mark.parametrize("users_per_step, scaling, expected_lr", [
    (8, "sqrt", 0.0025),        # 0.005 * sqrt(8 / 32) = 0.005 / 2
    (128, "sqrt", 0.01),        # 0.005 * sqrt(4)
    (2, "sqrt", 0.00125),       # 0.005 * sqrt(1 / 16)
    (8, "linear", 0.00125),     # 0.005 / 4
    (128, "linear", 0.02),      # 0.005 * 4
    (1, "linear", 0.00015625),  # 0.005 / 32
    (1, "none", 0.005),
    (128, "none", 0.005),
])
def test_learning_rate_rules_leave_adams_other_settings_alone(users_per_step, scaling, expected_lr):
    settings = meta_step_settings("adam", 0.005, users_per_step, scaling)
    assert settings == {"lr": pytest.approx(expected_lr, rel=1e-12), **ADAM_DEFAULTS}


@pytest.mark.parametrize("users_per_step, expected", [
    # kappa = users_per_step / 32; lr * sqrt(kappa), 1 - beta times kappa, eps / sqrt(kappa)
    (128, {"lr": 0.01, "betas": (0.6, 0.996), "eps": 0.5e-8}),
    (8, {"lr": 0.0025, "betas": (0.975, 0.99975), "eps": 2e-8}),
    (2, {"lr": 0.00125, "betas": (0.99375, 0.9999375), "eps": 4e-8}),
])
def test_sde_rule_for_adam_hand_computed(users_per_step, expected):
    settings = meta_step_settings("adam", 0.005, users_per_step, "sde")
    assert settings["lr"] == pytest.approx(expected["lr"], rel=1e-12)
    assert settings["betas"] == pytest.approx(expected["betas"], rel=1e-12)
    assert settings["eps"] == pytest.approx(expected["eps"], rel=1e-12)


def test_sde_rule_for_sgd_is_linear():
    assert meta_step_settings("sgd", 0.005, 8, "sde") == {"lr": pytest.approx(0.00125, rel=1e-12)}
    assert meta_step_settings("sgd", 0.005, 128, "sde") == {"lr": pytest.approx(0.02, rel=1e-12)}


@pytest.mark.parametrize("scaling", ["none", "sqrt", "linear", "sde"])
def test_every_rule_gives_the_configured_settings_exactly_at_32_users_per_step(scaling):
    for rate in (0.005, 0.0123456789, 1e-7):
        assert meta_step_settings("adam", rate, 32, scaling) == {"lr": rate, **ADAM_DEFAULTS}
        assert meta_step_settings("sgd", rate, 32, scaling) == {"lr": rate}


def test_bad_rule_or_step_size_is_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="meta_step_scaling must be one of none, sqrt, linear, sde, got 'square'"):
        meta_step_settings("adam", 0.005, 8, "square")
    with pytest.raises(ValueError, match="users_per_step must be at least 1, got 0"):
        meta_step_settings("adam", 0.005, 0, "sqrt")
    assert meta_step_settings("adam", 0.005, 320, "sde")["betas"][0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="'sde' with Adam allows at most 320 users per step.*got users_per_step = 321"):
        meta_step_settings("adam", 0.005, 321, "sde")


@pytest.mark.parametrize("optimizer, scaling, expected", [
    ("adam", "none", {"lr": 0.005, **ADAM_DEFAULTS}),
    ("adam", "sqrt", {"lr": 0.0025, **ADAM_DEFAULTS}),
    ("adam", "sde", {"lr": 0.0025, "betas": (0.975, 0.99975), "eps": 2e-8}),
    ("sgd", "sde", {"lr": 0.00125}),
])
def test_the_global_optimiser_uses_the_scaled_settings(optimizer, scaling, expected, tmp_path):
    cfg = small_config(users_per_step=8, meta_optimizer=optimizer, meta_step_scaling=scaling, **{"lambda": 0.005})
    manifest = {"features": TINY_FEATURES, "n_rating_classes": 5, "rating_min": 1}
    tasks = random_batch(4)
    group = MAMRec(cfg, manifest, tasks, tasks, tmp_path, torch.device("cpu")).optimizer.param_groups[0]
    assert {key: group[key] for key in expected} == pytest.approx(expected, rel=1e-12)
