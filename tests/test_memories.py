"""Memory read and write rules on hand-computed values."""
import math

import torch

from modules.memories import DenseUserValues, Memories, decayed_write


def tiny_memories(**options):
    """K = 3 slots, profile width 2, one 1x2 'user' weight, 2x2 task weights."""
    mem = Memories(3, 2, {"user.w": (1, 2)}, (2, 2), feature_memory=True, task_memory=True, **options)
    mem.load_state_dict({
        "profile": torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),
        "embedding_user_w": torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]),
        "task": torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]])})
    return mem


def test_attention_is_softmax_of_cosine_similarities():
    mem = tiny_memories()
    # p = (2, 0): cosines to the slots are (1, 0, -1); p = (1, 1): (1/sqrt2, 1/sqrt2, -1/sqrt2)
    a = mem.attention(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    e = math.e
    expected0 = [e / (e + 1 + 1 / e), 1 / (e + 1 + 1 / e), (1 / e) / (e + 1 + 1 / e)]
    r = 2 ** -0.5
    z = 2 * math.exp(r) + math.exp(-r)
    expected1 = [math.exp(r) / z, math.exp(r) / z, math.exp(-r) / z]
    assert torch.allclose(a, torch.tensor([expected0, expected1]), atol=1e-6)


def test_bias_term_and_task_weight_are_attention_mixtures():
    mem = tiny_memories()
    a = torch.tensor([[0.5, 0.25, 0.25]])
    # 0.5*(1,2) + 0.25*(3,4) + 0.25*(5,6) = (0.5+0.75+1.25, 1+1+1.5) = (2.5, 3.5)
    assert torch.equal(mem.bias_term(a)["user.w"], torch.tensor([[[2.5, 3.5]]]))
    # 0.5*I + 0.25*2I + 0.25*[[0,1],[1,0]] = [[1, .25], [.25, 1]]
    assert torch.equal(mem.task_weight(a), torch.tensor([[[1.0, 0.25], [0.25, 1.0]]]))


def test_one_user_write_follows_the_three_rules():
    mem = tiny_memories()
    a = torch.tensor([[0.5, 0.25, 0.25]])
    p = torch.tensor([[4.0, 8.0]])
    g = {"user.w": DenseUserValues(torch.tensor([[[10.0, 20.0]]]))}
    w = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])
    mem.write(a, p, g, DenseUserValues(w), None, alpha=0.5, beta=0.1, gamma=0.2)
    # M_P[k] <- 0.5 * a_k * p + 0.5 * M_P[k]
    assert torch.allclose(mem.profile, torch.tensor([[0.5 + 1.0, 2.0], [0.5, 0.5 + 1.0], [-0.5 + 0.5, 1.0]]))
    # M_U[0] <- 0.1 * 0.5 * (10, 20) + 0.9 * (1, 2) = (1.4, 2.8)
    assert torch.allclose(mem.embedding["user.w"][0], torch.tensor([[1.4, 2.8]]))
    # M_UI[2] <- 0.2 * 0.25 * 4I + 0.8 * [[0,1],[1,0]] = [[.2, .8], [.8, .2]]
    assert torch.allclose(mem.task[2], torch.tensor([[0.2, 0.8], [0.8, 0.2]]))


def test_batch_write_equals_writes_in_user_order():
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    a = torch.softmax(torch.randn(6, 3, generator=gen, dtype=torch.float64), -1)
    values = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
    sequential = memory.clone()
    for b in range(6):
        sequential = 0.3 * a[b].view(3, 1, 1) * values[b] + 0.7 * sequential
    assert torch.allclose(decayed_write(memory, 0.3, a, DenseUserValues(values)), sequential, atol=1e-12)


def test_a_batch_of_one_is_the_sequential_rule_exactly():
    memory, a, values = torch.randn(3, 2), torch.softmax(torch.randn(1, 3), -1), torch.randn(1, 2)
    expected = 0.05 * a[0].view(3, 1) * values[0] + (1 - 0.05) * memory
    assert torch.equal(decayed_write(memory, 0.05, a, DenseUserValues(values)), expected)


def test_slots_start_independent_and_without_autograd():
    mem = Memories(3, 6, {"user.w": (4, 6)}, (5, 5), True, True, torch.Generator().manual_seed(0))
    slots = mem.embedding["user.w"]
    assert not torch.equal(slots[0], slots[1])
    assert 0.02 < slots.std().item() < 0.08  # N(0, 0.05^2)
    for tensor in (mem.profile, slots, mem.task):
        assert not tensor.requires_grad


def test_attention_temperature_divides_the_cosines():
    mem = tiny_memories(temperature=0.5)
    # p = (2, 0): cosines (1, 0, -1), divided by T = 0.5: (2, 0, -2)
    a = mem.attention(torch.tensor([[2.0, 0.0]]))
    z = math.exp(2) + 1 + math.exp(-2)
    assert torch.allclose(a, torch.tensor([[math.exp(2) / z, 1 / z, math.exp(-2) / z]]), atol=1e-6)


def test_increment_write_adds_the_attention_weighted_local_update():
    mem = tiny_memories(task_write="increment")
    a = torch.tensor([[0.5, 0.25, 0.25]])
    read = mem.task_weight(a)  # [[1, .25], [.25, 1]]
    adapted = read + torch.tensor([[[4.0, 0.0], [0.0, -4.0]]])  # local update diag(4, -4)
    g = {"user.w": DenseUserValues(torch.zeros(1, 1, 2))}
    mem.write(a, torch.tensor([[4.0, 8.0]]), g, DenseUserValues(adapted), DenseUserValues(adapted - read),
              alpha=0.5, beta=0.1, gamma=0.5)
    # M_k <- M_k + 0.5 * a_k * diag(4, -4): 0.5 * 0.5 * 4 = 1, 0.5 * 0.25 * 4 = 0.5
    assert torch.equal(mem.task, torch.tensor([[[2.0, 0.0], [0.0, 0.0]],
                                               [[2.5, 0.0], [0.0, 1.5]],
                                               [[0.5, 1.0], [1.0, -0.5]]]))


def test_increment_write_of_a_batch_is_the_users_increments_in_order():
    """Every user adds gamma * a_b[k] * (W'_b - W_b) with W_b what it read at the batch start; a
    batch of one user is the sequential rule exactly."""
    gen = torch.Generator().manual_seed(0)
    mem = Memories(3, 2, {}, (2, 4), feature_memory=False, task_memory=True, generator=gen, task_write="increment")
    mem.double()
    start = mem.task.clone()
    a = torch.softmax(torch.randn(5, 3, generator=gen, dtype=torch.float64), -1)
    read = torch.einsum("bk,kij->bij", a, start)
    updates = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64)
    profiles = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    mem.write(a, profiles, {}, DenseUserValues(read + updates), DenseUserValues(updates), 0.5, 0.05, 0.1)
    sequential = start.clone()
    for b in range(5):
        for k in range(3):
            sequential[k] = sequential[k] + 0.1 * a[b, k] * updates[b]
    assert torch.allclose(mem.task, sequential, atol=1e-12)
    one = Memories(3, 2, {}, (2, 4), False, True, torch.Generator().manual_seed(1), task_write="increment")
    before = one.task.clone()
    a1, update = torch.tensor([[0.5, 0.25, 0.25]]), torch.randn(1, 2, 4)
    one.write(a1, profiles[:1].float(), {}, None, DenseUserValues(update), 0.5, 0.05, 0.1)
    assert torch.equal(one.task, before + 0.1 * (a1[0].view(3, 1, 1) * update[0]))


def test_task_slots_can_start_at_a_given_weight():
    start = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mem = Memories(3, 2, {}, (2, 2), False, True, task_start=start)
    assert mem.task.shape == (3, 2, 2) and all(torch.equal(slot, start) for slot in mem.task)
    mem.task[0, 0, 0] = 9.0  # the slots are independent copies, not views of `start` or of each other
    assert start[0, 0] == 1.0 and mem.task[1, 0, 0] == 1.0


def test_memories_are_buffers():
    mem = tiny_memories()
    assert set(mem.state_dict()) == {"profile", "embedding_user_w", "task"}
    assert list(mem.parameters()) == []
    assert mem.double().profile.dtype == torch.float64
