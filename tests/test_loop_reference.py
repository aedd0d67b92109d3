"""Both engines against the independent loop-based MAMO (tests/reference_mamo.py), in float64:
parameters, every memory and the losses after each global step, then evaluation outputs."""
import pytest
import torch

from models import MAMO, make_engine, meta_train_step, predict_query
from tests.conftest import TINY_FEATURES, random_batch, small_config
from tests.reference_mamo import LoopMAMO

N_STEPS = 4
TOLERANCE = 1e-10

# config overrides: the published method with either meta-optimiser, each memory alone, every
# departure alone and all together, and the memory-free model with a frozen mem_layer weight.
# SGD with a large step keeps the gradients' scale visible (Adam's steps hide it).
CASES = {
    "published-sgd": dict(meta_optimizer="sgd", **{"lambda": 0.5}),
    "published-adam": dict(meta_optimizer="adam", **{"lambda": 0.01}),
    "local-clip-bites": dict(meta_optimizer="sgd", grad_clip=0.3, **{"lambda": 0.5}),
    "feature-memory-only": dict(meta_optimizer="sgd", task_memory=False, **{"lambda": 0.5}),
    "task-memory-only": dict(meta_optimizer="sgd", feature_memory=False, **{"lambda": 0.5}),
    "temperature": dict(meta_optimizer="sgd", attention_temperature=0.05, **{"lambda": 0.5}),
    "increment-write": dict(meta_optimizer="sgd", task_memory_write="increment", **{"lambda": 0.5}),
    "phi-init": dict(meta_optimizer="sgd", task_memory_init="phi", **{"lambda": 0.5}),
    "query-clip-bites": dict(meta_optimizer="sgd", clip_query_grad=0.2, **{"lambda": 0.5}),
    "all-departures": dict(meta_optimizer="adam", attention_temperature=0.1, task_memory_write="increment",
                           task_memory_init="phi", clip_query_grad=0.2, grad_clip=0.3, **{"lambda": 0.01}),
    "no-memory-frozen": dict(meta_optimizer="sgd", feature_memory=False, task_memory=False, freeze_mem_layer=True,
                             **{"lambda": 0.5}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which costs 10-100x on a
    busy machine (measured 0.1 s vs 3-15 s per case with 2 threads while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(cfg, seed=1):
    torch.manual_seed(seed)
    return MAMO(TINY_FEATURES, 5, 1, cfg, torch.Generator().manual_seed(seed)).to(torch.float64)


def assert_same_model(model, loop, context):
    params = loop.named_parameters()
    for name, p in model.named_parameters():
        assert torch.allclose(p, params[name], atol=TOLERANCE, rtol=0), f"{context}: parameter {name}"
    memories = model.memories
    if memories is None:
        assert loop.M_P is None
        return
    assert torch.allclose(memories.profile, loop.M_P, atol=TOLERANCE, rtol=0), f"{context}: profile memory"
    assert memories.embedding.keys() == loop.M_U.keys()
    for name, slots in memories.embedding.items():
        assert torch.allclose(slots, loop.M_U[name], atol=TOLERANCE, rtol=0), f"{context}: embedding memory {name}"
    if loop.M_UI is None:
        assert memories.task is None
    else:
        assert torch.allclose(memories.task, loop.M_UI, atol=TOLERANCE, rtol=0), f"{context}: task memory"


def train_both(cfg, engine_name, users_per_step, n_steps=N_STEPS):
    """Train an engine model and the loop reference side by side, comparing after every step."""
    model = build(cfg)
    loop = LoopMAMO(model, cfg)
    engine = make_engine(model, engine_name)
    optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    optimizer = optimizers[cfg["meta_optimizer"]](model.meta_parameters(), lr=cfg["lambda"])
    assert_same_model(model, loop, "at init")
    for step in range(n_steps):
        batch = random_batch(users_per_step, seed=step)
        losses = meta_train_step(model, engine, batch, optimizer)
        assert torch.allclose(losses, loop.train_step(batch), atol=TOLERANCE, rtol=0), f"step {step}: losses"
        assert_same_model(model, loop, f"after step {step}")
    return model, engine, loop


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("users_per_step", [1, 3])
@pytest.mark.parametrize("engine_name", ["batched", "reference"])
def test_engine_matches_the_loop_reference(engine_name, users_per_step, case):
    cfg = small_config(**CASES[case])
    model, engine, loop = train_both(cfg, engine_name, users_per_step)
    if "local-clip" in case or case == "all-departures":
        assert loop.clipped_local_steps > 0
    if "query-clip" in case or case == "all-departures":
        assert loop.clipped_query_grads > 0
    test = random_batch(5, seed=99)
    assert torch.allclose(predict_query(model, engine, test), loop.predict(test), atol=TOLERANCE, rtol=0)


def test_the_frozen_mem_layer_weight_stays_at_its_initial_value():
    cfg = small_config(meta_optimizer="sgd", feature_memory=False, task_memory=False, freeze_mem_layer=True,
                       **{"lambda": 0.5})
    initial = build(cfg).state_dict()
    model, _, _ = train_both(cfg, "batched", 3, n_steps=2)
    after = model.state_dict()
    assert torch.equal(after["theta_net.rec.layers.0.weight"], initial["theta_net.rec.layers.0.weight"])
    assert not torch.equal(after["theta_net.rec.layers.0.bias"], initial["theta_net.rec.layers.0.bias"])
    assert model.theta_net.rec.layers[0].weight.grad is None  # no gradient handed to a weight nothing trains
    unfrozen = build(dict(cfg, freeze_mem_layer=False))
    assert len(unfrozen.meta_parameters()) == len(model.meta_parameters()) + 1
