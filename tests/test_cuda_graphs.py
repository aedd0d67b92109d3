"""The CUDA-graph path of the batched engine: its buffered calls give exactly the eager numbers
(on CPU without capture, on CUDA with it), shapes seen once run eagerly, and a model tensor that
moves after capture is refused."""
import pytest
import torch

from models import BatchedEngine, make_engine, meta_train_step, predict_query
from modules.cuda_graphs import GraphedEngine
from tests.conftest import TINY_FEATURES, random_batch, small_config
from tests.test_models import build

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def train_and_predict(engine_factory, device, dtype=torch.float64, users=(3, 3, 3, 2)):
    """Train a fresh model on batches of `users` users (a shorter last one), then predict a batch
    twice -> (per-step losses, predictions, final state), all on the CPU."""
    model = build(small_config(), dtype=dtype).to(device)
    engine = engine_factory(model)
    optimizer = torch.optim.Adam(model.meta_parameters(), lr=0.01)
    losses = [meta_train_step(model, engine, to_device(random_batch(n, seed=step), device), optimizer)
              for step, n in enumerate(users)]
    test = to_device(random_batch(4, seed=50), device)
    predictions = [predict_query(model, engine, test) for _ in range(3)]
    state = {name: value.cpu() for name, value in model.state_dict().items()}
    return [loss.cpu() for loss in losses], [p.cpu() for p in predictions], state


def to_device(batch, device):
    return type(batch)(batch.user_codes.to(device), {k: v.to(device) for k, v in batch.item_features.items()},
                       batch.ratings.to(device), batch.scenarios.to(device), batch.support_size)


def assert_identical(first, second, atol=0.0):
    """Same losses at every step, predictions and final state (to atol; 0: bit for bit)."""
    losses_a, predictions_a, state_a = first
    losses_b, predictions_b, state_b = second
    assert len(losses_a) == len(losses_b) and len(predictions_a) == len(predictions_b)
    for a, b in zip(losses_a + predictions_a, losses_b + predictions_b):
        assert torch.allclose(a, b, atol=atol, rtol=0)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.allclose(state_a[name], state_b[name], atol=atol, rtol=0), name


def test_buffered_calls_give_exactly_the_eager_numbers_on_cpu():
    """Without capture the graphed engine runs the buffered path (copies in, same kernels): the
    losses of every step (the shorter last batch included), predictions and the final parameters
    and memories equal the plain engine's bit for bit."""
    eager = train_and_predict(BatchedEngine, "cpu")
    buffered = train_and_predict(lambda model: GraphedEngine(BatchedEngine(model), capture=False), "cpu")
    assert_identical(eager, buffered)


def test_a_shape_is_buffered_the_second_time_it_is_seen():
    model = build(small_config())
    engine = GraphedEngine(BatchedEngine(model), capture=False)
    for n_users in (3, 3, 2):
        predict_query(model, engine, random_batch(n_users))
    assert len(engine.calls) == 1 and len(engine.seen) == 2


def test_a_memory_replaced_after_capture_is_refused():
    model = build(small_config())
    engine = GraphedEngine(BatchedEngine(model), capture=False)
    for _ in range(2):
        predict_query(model, engine, random_batch(3))
    model.memories.task = model.memories.task + 0.0  # a new tensor: a graph would read the old one
    with pytest.raises(RuntimeError, match="moved since the CUDA graph was captured"):
        predict_query(model, engine, random_batch(3))


def test_compile_modes_resolve_per_device_and_engine():
    model = build(small_config())
    assert type(make_engine(model)) is BatchedEngine  # auto on CPU: eager
    assert type(make_engine(model, compile="none")) is BatchedEngine
    for name in ("batched", "reference"):
        with pytest.raises(ValueError, match="^compile='cuda-graphs' needs the batched engine on a CUDA device") as error:
            make_engine(model, name, compile="cuda-graphs")
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="^compile must be one of"):
        make_engine(model, compile="inductor")


@CUDA
def test_cuda_graphs_give_exactly_the_eager_cuda_numbers():
    """Captured and replayed on the GPU (float32, the default dtype): every step's losses (so no
    step's result is overwritten by the next replay), the predictions and the final state equal
    the eager CUDA run's (the same kernels: expected bit for bit; 1e-6 leaves room for a library
    that picks another algorithm under capture, far below what a stale input would change)."""
    eager = train_and_predict(lambda model: make_engine(model, compile="none"), "cuda", torch.float32)
    graphed = train_and_predict(lambda model: make_engine(model, compile="cuda-graphs"), "cuda", torch.float32)
    assert_identical(eager, graphed, atol=1e-6)


@CUDA
def test_auto_compile_on_cuda_uses_graphs():
    model = build(small_config(), dtype=torch.float32).to("cuda")
    assert isinstance(make_engine(model), GraphedEngine)
    assert type(make_engine(model, "reference")).__name__ == "ReferenceEngine"
