"""The memory diagnostics (modules/diagnostics.py): hand-computed values on set memories, the
collapse warning, and that recording them changes no result."""
import math

import pytest
import torch

from models import MAMO, MEM_WEIGHT
from modules.diagnostics import COLLAPSE_SPREAD, critical_temperature, memory_diagnostics, slot_spread
from modules.memories import DenseUserValues, Memories, buffer_name
from tests.conftest import TINY_FEATURES, small_config
from tests.test_mamoRec_units import trainer

SIGMA = math.e / (1 + math.e)  # softmax([1, 0])[0]


def set_model(**overrides):
    """MAMO with K = 2, d = 8 (profiles of width 16, a 16 x 16 mem_layer) and hand-set memories and phi:
    profile slots 2 e_0 and e_1; task slots I and -I; embedding slots all ones and all minus ones;
    phi_u's weights 0.5 and biases 0; phi's mem_layer weight 2 I."""
    model = MAMO(TINY_FEATURES, 5, 1, small_config(n_k=2, **overrides), torch.Generator().manual_seed(0))
    memories, eye = model.memories, torch.eye(16)
    memories.profile = torch.stack([2 * eye[0], eye[1]])
    if memories.task is not None:
        memories.task = torch.stack([eye, -eye])
    for name, slots in memories.embedding.items():
        setattr(memories, buffer_name(name), torch.stack([torch.ones_like(slots[0]), -torch.ones_like(slots[0])]))
    with torch.no_grad():
        for name, p in model.phi().items():
            if name.startswith("user."):
                p.fill_(0.5 if name.endswith("weight") else 0.0)
        model.phi()[MEM_WEIGHT].copy_(2 * eye)
    return model


def test_diagnostics_by_hand():
    model = set_model()
    profiles = torch.eye(16)[:2]  # e_0: cosines (1, 0) to the slots; e_1: (0, 1)
    got = memory_diagnostics(model, profiles)
    # attention: user 0 (SIGMA, 1 - SIGMA), user 1 (1 - SIGMA, SIGMA)
    assert got.attention_max_mean == pytest.approx(SIGMA)
    assert got.attention_spread == pytest.approx(SIGMA - 0.5)  # population sd of (SIGMA, 1 - SIGMA)
    assert got.slot_usage == pytest.approx([0.5, 0.5])
    assert got.profile_slot_spread == pytest.approx(math.sqrt(5) / 1.5)  # |2 e_0 - e_1| / mean(2, 1)
    assert got.task_slot_spread == pytest.approx(8 / 4)  # |I - (-I)|_F = 2 * 4, |I|_F = 4
    # each user reads (2 SIGMA - 1) I or its negative: norm 4 (2 SIGMA - 1) each (their mean read is zero)
    assert got.task_read_norm == pytest.approx(4 * (2 * SIGMA - 1))
    assert got.phi_mem_weight_norm == pytest.approx(8)
    assert got.task_read_ratio == pytest.approx(4 * (2 * SIGMA - 1) / 8)
    # b_u = +-(2 SIGMA - 1) on every entry of theta_u; phi_u: 0.5 on the weights, 0 on the biases
    user = {name: p for name, p in model.phi().items() if name.startswith("user.")}
    n_all = sum(p.numel() for p in user.values())
    n_weights = sum(p.numel() for name, p in user.items() if name.endswith("weight"))
    expected = 0.01 * (2 * SIGMA - 1) * math.sqrt(n_all) / (0.5 * math.sqrt(n_weights))
    assert got.bias_term_ratio == pytest.approx(expected)


def test_two_users_reading_alike_separate_users_from_slots():
    """Both users read (SIGMA, 1 - SIGMA): the largest weight per user and the spread over users
    (0: every user reads the same) differ from the per-slot values the symmetric case cannot tell apart."""
    got = memory_diagnostics(set_model(), torch.eye(16)[[0, 0]])
    assert got.attention_max_mean == pytest.approx(SIGMA)  # per user, then the mean (the other way round: 0.5)
    assert got.attention_spread == pytest.approx(0.0)  # sd over users of each slot's weight
    assert got.slot_usage == pytest.approx([SIGMA, 1 - SIGMA])


def test_attention_temperature_enters_the_diagnostics():
    got = memory_diagnostics(set_model(attention_temperature=0.5), torch.eye(16)[:2])
    sharper = math.exp(2) / (1 + math.exp(2))  # softmax([1, 0] / 0.5)[0]
    assert got.attention_max_mean == pytest.approx(sharper)
    assert got.attention_spread == pytest.approx(sharper - 0.5)


def test_switched_off_memories_have_no_fields():
    profiles = torch.eye(16)[:2]
    memory_free = MAMO(TINY_FEATURES, 5, 1, small_config(feature_memory=False, task_memory=False))
    assert memory_diagnostics(memory_free, profiles) is None
    feature_only = memory_diagnostics(set_model(task_memory=False), profiles)
    assert feature_only.task_read_norm is None and feature_only.task_slot_spread is None
    assert feature_only.bias_term_ratio is not None
    task_only = memory_diagnostics(set_model(feature_memory=False), profiles)
    assert task_only.bias_term_ratio is None and task_only.task_read_norm == pytest.approx(4 * (2 * SIGMA - 1))


def test_uniform_attention_has_zero_spread_and_the_mean_read():
    model = set_model()
    model.memories.profile = torch.ones(2, 16)  # equal slots: every user reads (1/2, 1/2)
    got = memory_diagnostics(model, torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))
    assert got.attention_spread == 0.0 and got.attention_max_mean == pytest.approx(0.5)
    assert got.profile_slot_spread == 0.0 and got.task_read_norm == pytest.approx(0.0, abs=1e-12)
    assert got.attention_spread < COLLAPSE_SPREAD


def test_recording_diagnostics_changes_no_result(tmp_path):
    with_diagnostics = trainer(tmp_path / "on", diagnostics=True)
    without = trainer(tmp_path / "off", diagnostics=False)
    with_diagnostics.fit(2)
    without.fit(2)
    assert [row["memory"] is not None for row in with_diagnostics.epochs] == [True, True]
    assert [row["memory"] for row in without.epochs] == [None, None]
    assert ([(row["train_loss"], row["results"]) for row in with_diagnostics.epochs]
            == [(row["train_loss"], row["results"]) for row in without.epochs])
    for (name, a), b in zip(with_diagnostics.model.state_dict().items(), without.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_models_without_memories_record_none(tmp_path):
    memory_free = trainer(tmp_path, feature_memory=False, task_memory=False)
    memory_free.fit(1)
    assert memory_free.epochs[0]["memory"] is None


@pytest.mark.parametrize("collapsed", [True, False])
def test_a_collapsed_attention_is_warned_about_once(tmp_path, collapsed):
    """alpha = 0: the profile memory keeps its slots, equal (collapsed from the start) or as drawn."""
    lines = []
    model_trainer = trainer(tmp_path, log=lines.append, alpha=0.0)
    if collapsed:
        model_trainer.model.memories.profile = torch.ones_like(model_trainer.model.memories.profile)
    model_trainer.fit(2)
    warnings = [line for line in lines if line.startswith("warning:")]
    if not collapsed:
        assert warnings == [] and model_trainer.epochs[-1]["memory"]["attention_spread"] > COLLAPSE_SPREAD
        return
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("warning: mamo epoch 1: the memory attention has collapsed")
    assert "attention_temperature (1)" in warnings[0] and "docs/results.md#" in warnings[0]
    assert "SPEC" not in warnings[0]


@pytest.mark.parametrize("alpha, ratio, collapses, epochs", [
    (0.5, 1.5, True, 5), (0.5, 0.7, True, 5), (0.5, 0.3, False, 5), (0.05, 1.1, True, 20), (0.05, 0.7, False, 20)])
def test_the_profile_memory_collapses_above_the_critical_temperature(alpha, ratio, collapses, epochs):
    """The published write, one user at a time over profiles around a common direction, at
    T = ratio * rho_max(J). Above rho_max(J) the slots collapse to one vector; below it they stay
    apart when alpha is small, while a large alpha's per-user noise collapses them even a little
    below it (alpha = 0.5: at 0.7 rho_max(J), not at 0.3)."""
    gen = torch.Generator().manual_seed(0)
    profiles = torch.randn(600, 6, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 1, 1, 1, 1, 1.0])
    profiles[:, 0] += 2.0
    rho = critical_temperature(profiles)
    assert rho == pytest.approx(0.18, abs=0.01)
    memories = Memories(3, 6, {}, (1, 1), feature_memory=False, task_memory=False, generator=gen,
                        temperature=ratio * rho)
    memories.profile = memories.profile.double()
    for _ in range(epochs):
        for p in profiles:
            memories.write(memories.attention(p[None]), p[None], {}, None, None, alpha=alpha, beta=0.0, gamma=0.0)
    spread = slot_spread(memories.profile)
    assert (spread < 1e-6) if collapses else (spread > 0.1), spread


def test_under_uniform_attention_the_published_task_write_settles_at_the_mean_update_over_k_minus_1():
    """Every user reads W = mean of the slots and writes its adapted W + delta: the read tends to
    delta / (K - 1) whatever the slots started at; the increment write adds gamma * delta / K per user."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.tensor([[0.2, -0.1], [0.0, 0.4]], dtype=torch.float64)
    uniform = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    profile = torch.zeros(1, 2, dtype=torch.float64)
    reads = {}
    for rule in ("published", "increment"):
        memories = Memories(3, 2, {}, (2, 2), feature_memory=False, task_memory=True, generator=gen, task_write=rule)
        memories.task = memories.task.double()
        start = memories.task_weight(uniform)[0]
        for _ in range(400):
            read = memories.task_weight(uniform)
            memories.write(uniform, profile, {}, DenseUserValues(read + delta), DenseUserValues(delta[None]),
                           alpha=0.0, beta=0.0, gamma=0.1)
        reads[rule] = (start, memories.task_weight(uniform)[0])
    assert torch.allclose(reads["published"][1], delta / 2)
    assert torch.allclose(reads["increment"][1], reads["increment"][0] + 400 * 0.1 * delta / 3)


def test_the_diagnostics_reader_prints_one_row_per_epoch():
    from bench.memory_diagnostics import diagnostics_table
    record = {"attention_max_mean": 0.5, "attention_spread": 0.0, "slot_usage": [0.5, 0.5],
              "profile_slot_spread": 0.0, "task_slot_spread": None, "task_read_norm": None,
              "phi_mem_weight_norm": None, "task_read_ratio": None, "bias_term_ratio": 1.25e-05}
    metrics = {"epochs": [{"epoch": 1, "memory": {"mamo": record}}, {"epoch": 2, "memory": {"mamo": record}}]}
    lines = diagnostics_table(metrics).splitlines()
    assert lines[0].startswith("| epoch | attention_max_mean | attention_spread | slot_usage_1 | slot_usage_2 |")
    assert lines[2] == "| 1 | 0.5 | 0 | 0.5 | 0.5 | 0 | - | - | - | - | 1.25e-05 |" and len(lines) == 4
    with pytest.raises(SystemExit, match="no memory diagnostics for no_memory"):
        diagnostics_table(metrics, "no_memory")
