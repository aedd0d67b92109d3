"""The functional core: personalised initialisation, local and global steps against plain torch,
and the batched engine against the per-user reference engine."""
import copy

import pytest
import torch

from models import MAMO, MEM_WEIGHT, make_engine, meta_train_step, predict_query, support_batches
from modules.low_rank import DenseLinear, FixedInputLinear, LowRankLinear, OuterProducts, mixtures, outer_product_sum
from tests.conftest import TINY_FEATURES, random_batch, small_config


def build(cfg, seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    return MAMO(TINY_FEATURES, 5, 1, cfg, torch.Generator().manual_seed(seed)).to(dtype)


def snapshot(model):
    """Every parameter and memory buffer, copied."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_support_batches_are_in_order_and_repeat_per_pass():
    assert support_batches(15, 5, 2) == [slice(0, 5), slice(5, 10), slice(10, 15)] * 2
    assert support_batches(7, 5, 1) == [slice(0, 5), slice(5, 7)]


def test_initial_theta_is_phi_minus_tao_bias_and_task_memory_weight():
    cfg = small_config(tao=0.5)
    model = build(cfg)
    profiles = model.input_loading.user_profile(random_batch(2).user_codes).detach()
    a = model.read(profiles)
    theta = model.initial_theta(a, 2)
    phi = model.phi()
    for name, slots in model.memories.embedding.items():
        expected = phi[name] - 0.5 * torch.einsum("bk,k...->b...", a, slots)
        assert torch.allclose(theta[name], expected)
    assert torch.allclose(theta[MEM_WEIGHT], torch.einsum("bk,kij->bij", a, model.memories.task))
    assert torch.equal(theta["item.layers.0.weight"][1], phi["item.layers.0.weight"])
    assert torch.equal(theta["rec.layers.0.bias"][0], phi["rec.layers.0.bias"])


@pytest.mark.parametrize("head", ["classification", "regression"])
def test_output_grad_is_the_gradient_of_the_loss(head):
    """The closed form the batched engine backpropagates equals autograd's gradient of `loss`
    (classes 1..5: the lowest and the highest rating included)."""
    model = build(small_config(head=head))
    gen = torch.Generator().manual_seed(7)
    n_y = 1 if head == "regression" else 5
    outputs = torch.randn(3, 4, n_y, generator=gen, dtype=torch.float64, requires_grad=True)
    ratings = torch.tensor([[1, 5, 3, 2], [5, 5, 1, 4], [2, 3, 4, 1]])
    model.loss(outputs, model.targets(ratings)).sum().backward()
    closed_form = model.output_grad(outputs.detach(), model.output_targets(ratings, torch.float64))
    assert torch.allclose(closed_form, outputs.grad, atol=1e-15, rtol=0)


def test_output_targets_by_hand():
    classes, regression = build(small_config()), build(small_config(head="regression"))
    ratings = torch.tensor([[1, 4]])  # ratings 1..5 are classes 0..4
    assert torch.equal(classes.output_targets(ratings, torch.float32),
                       torch.tensor([[[1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0]]]))
    assert torch.equal(regression.output_targets(ratings, torch.float64),
                       torch.tensor([[[1.0], [4.0]]], dtype=torch.float64))


def test_mixtures_by_hand_and_against_a_matrix_product():
    coef = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    bases = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    out = torch.empty(2, 3)
    assert mixtures(coef, bases, out) is out
    assert torch.equal(out, torch.tensor([[21.0, 42.0, 63.0], [-9.5, -19.0, -28.5]]))
    gen = torch.Generator().manual_seed(8)
    coef = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    bases = torch.randn(4, 35, generator=gen, dtype=torch.float64)
    assert torch.allclose(mixtures(coef, bases, torch.empty(6, 35, dtype=torch.float64)), coef @ bases, atol=1e-13)


def plain_local_update(model, theta, profile, item_profiles, targets, cfg):
    """Local update with an nn.Module copy, torch.optim (SGD or Adam) and clip_grad_norm_ (independent of models.py)."""
    net = copy.deepcopy(model.theta_net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(theta[name])
    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    optimizer = optimizers[cfg["local_optimizer"]](net.parameters(), lr=cfg["rho"])
    for rows in support_batches(item_profiles.shape[0], cfg["batch_size"], cfg["n_inner_loop"]):
        optimizer.zero_grad()
        model.loss(net(profile, item_profiles[rows]), targets[rows]).backward()
        if cfg["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        optimizer.step()
    return net


@pytest.mark.parametrize("engine_name,local_optimizer", [("reference", "sgd"), ("batched", "sgd"),
                                                         ("reference", "adam")])
@pytest.mark.parametrize("grad_clip", [5.0, 0.05, None])  # None: no clipping, a path of its own in each engine
def test_local_update_matches_torch_optimizers_with_clipping(engine_name, local_optimizer, grad_clip):
    cfg = small_config(grad_clip=grad_clip, local_optimizer=local_optimizer)
    model = build(cfg)
    batch = random_batch(3)
    engine = make_engine(model, engine_name)
    outputs = predict_query(model, engine, batch)
    with torch.no_grad():
        profiles = model.input_loading.user_profile(batch.user_codes)
        items = model.input_loading.item_profile(batch.item_features)
        theta0 = model.initial_theta(model.read(profiles), 3)
    targets = model.targets(batch.ratings)
    s = batch.support_size
    for b in range(3):
        net = plain_local_update(model, {k: v[b] for k, v in theta0.items()}, profiles[b], items[b, :s],
                                 targets[b, :s], cfg)
        assert torch.allclose(outputs[b], net(profiles[b], items[b, s:]), atol=1e-10)


def test_global_step_is_sgd_on_the_mean_query_gradient():
    cfg = small_config(meta_optimizer="sgd", feature_memory=False, task_memory=False)
    model = build(cfg)
    before = {name: p.clone() for name, p in model.named_parameters()}
    batch = random_batch(2)
    optimizer = torch.optim.SGD(model.meta_parameters(), lr=cfg["lambda"])
    meta_train_step(model, make_engine(model, "batched"), batch, optimizer)
    # Hand-unrolled first-order MAML: adapt a copy per user, take d(query loss)/d(adapted weights).
    reference = build(cfg)
    targets = reference.targets(batch.ratings)
    s = batch.support_size
    mean_grads = {}
    for b in range(2):
        profiles = reference.input_loading.user_profile(batch.user_codes[b])
        items = reference.input_loading.item_profile({k: v[b] for k, v in batch.item_features.items()})
        net = plain_local_update(reference, reference.phi(), profiles.detach(), items[:s].detach(), targets[b, :s], cfg)
        loss = reference.loss(net(profiles, items[s:]), targets[b, s:]) / 2
        psi = list(reference.input_loading.parameters())
        grads = torch.autograd.grad(loss, list(net.parameters()) + psi, allow_unused=True)
        names = [f"theta_net.{n}" for n, _ in net.named_parameters()] + \
                [f"input_loading.{n}" for n, _ in reference.input_loading.named_parameters()]
        for name, g in zip(names, grads):
            mean_grads[name] = mean_grads.get(name, 0) + (0 if g is None else g)
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.allclose(after[name], value - cfg["lambda"] * mean_grads[name], atol=1e-10), name


CASES = [
    dict(),
    dict(feature_memory=False),
    dict(task_memory=False),
    dict(feature_memory=False, task_memory=False),
    dict(head="regression"),
    dict(activation="relu", n_layer=3),
    dict(attention_temperature=0.1, task_memory_write="increment", task_memory_init="phi", clip_query_grad=0.2),
]


@pytest.mark.parametrize("overrides", CASES)
@pytest.mark.parametrize("users_per_step", [1, 4])
def test_batched_engine_equals_reference_through_training(overrides, users_per_step):
    cfg = small_config(**overrides)
    models = [build(cfg), build(cfg)]
    engines = [make_engine(models[0], "reference"), make_engine(models[1], "batched")]
    optimizers = [torch.optim.Adam(m.meta_parameters(), lr=0.01) for m in models]
    for step in range(3):
        batch = random_batch(users_per_step, seed=step)
        losses = [meta_train_step(m, e, batch, o) for m, e, o in zip(models, engines, optimizers)]
        assert torch.allclose(losses[0], losses[1], atol=1e-10)
    assert_same_state(snapshot(models[0]), snapshot(models[1]), atol=1e-10)
    test = random_batch(5, seed=99)
    assert torch.allclose(predict_query(models[0], engines[0], test), predict_query(models[1], engines[1], test),
                          atol=1e-10)


def test_batched_engine_matches_reference_in_float32():
    cfg = small_config(embedding_dim=16)
    models = [build(cfg, dtype=torch.float32), build(cfg, dtype=torch.float32)]
    engines = [make_engine(models[0], "reference"), make_engine(models[1], "batched")]
    optimizers = [torch.optim.SGD(m.meta_parameters(), lr=0.05) for m in models]
    for step in range(4):
        for m, e, o in zip(models, engines, optimizers):
            meta_train_step(m, e, random_batch(3, seed=step), o)
    assert_same_state(snapshot(models[0]), snapshot(models[1]), atol=1e-5)


def test_inference_mode_changes_no_bit_and_predictions_are_ordinary_tensors():
    """The batched engine runs in inference mode (for speed): the same call without it gives the
    same bits, and what predict hands back can be changed in place like any tensor."""
    model = build(small_config(embedding_dim=16), dtype=torch.float32)
    engine, batch = make_engine(model, "batched"), random_batch(4)
    profiles = model.input_loading.user_profile(batch.user_codes).detach()
    items = model.input_loading.item_profile(batch.item_features).detach()
    weights = torch.rand(4, 3, generator=torch.Generator().manual_seed(9))

    def fingerprint(meta):  # read at once: the next call reuses the per-user weights' storage
        return [meta.query_loss, meta.profile_grads, meta.item_grads, *meta.phi_grads.values(),
                *(v.weighted_sum(weights) for v in meta.user_grads.values()),
                meta.mem_weights.weighted_sum(weights), meta.mem_updates.weighted_sum(weights)]

    fast = fingerprint(engine.meta_gradients(batch, profiles, items, model.read(profiles)))
    plain = fingerprint(type(engine).meta_gradients.__wrapped__(engine, batch, profiles, items, model.read(profiles)))
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    predictions = predict_query(model, engine, batch)
    assert not predictions.is_inference()
    predictions += 1.0


def test_two_batches_of_one_differ_from_one_batch_of_two():
    """With one user per step the second user reads the memories the first wrote (sequential
    algorithm); in a batch of two both read the memories as they stood at the batch start."""
    cfg = small_config(meta_optimizer="sgd")
    batch = random_batch(2)

    def users(index):
        return type(batch)(batch.user_codes[index], {k: v[index] for k, v in batch.item_features.items()},
                           batch.ratings[index], batch.scenarios[index], batch.support_size)

    sequential, together = build(cfg), build(cfg)
    for model, steps in ((sequential, [users(slice(0, 1)), users(slice(1, 2))]), (together, [batch])):
        optimizer = torch.optim.SGD(model.meta_parameters(), lr=cfg["lambda"])
        for step in steps:
            meta_train_step(model, make_engine(model, "batched"), step, optimizer)
    assert not torch.allclose(sequential.memories.profile, together.memories.profile)


def test_evaluation_changes_nothing():
    cfg = small_config()
    model = build(cfg)
    meta_train_step(model, make_engine(model), random_batch(4), torch.optim.Adam(model.meta_parameters(), 0.01))
    before = snapshot(model)
    for name in ("batched", "reference"):
        predict_query(model, make_engine(model, name), random_batch(6, seed=5))
    after = snapshot(model)
    assert before.keys() == after.keys() and any(key.startswith("memories.") for key in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_memories_keep_no_autograd_history():
    cfg = small_config()
    model = build(cfg, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.meta_parameters(), 0.01)
    for step in range(3):
        meta_train_step(model, make_engine(model), random_batch(4, seed=step), optimizer)
        buffers = dict(model.memories.named_buffers())
        assert len(buffers) == 1 + 4 + 1  # profile, 2 user layers x (weight, bias), task
        for tensor in buffers.values():
            assert tensor.grad_fn is None and not tensor.requires_grad


def test_adam_local_update_runs_on_the_reference_engine():
    cfg = small_config(local_optimizer="adam")
    model = build(cfg)
    engine = make_engine(model)
    assert type(engine).__name__ == "ReferenceEngine"
    with pytest.raises(ValueError, match="batched engine needs"):
        make_engine(model, "batched")
    losses = meta_train_step(model, engine, random_batch(2), torch.optim.Adam(model.meta_parameters(), 0.01))
    assert torch.isfinite(losses).all()


def test_second_order_gradient_matches_finite_differences():
    cfg = small_config(first_order=False, feature_memory=False, task_memory=True, meta_optimizer="sgd",
                       n_inner_loop=1, grad_clip=None)
    model = build(cfg)
    engine = make_engine(model)
    batch = random_batch(1)
    with torch.no_grad():
        profiles = model.input_loading.user_profile(batch.user_codes)
        items = model.input_loading.item_profile(batch.item_features)
    attention = model.read(profiles)
    meta = engine.meta_gradients(batch, profiles, items, attention)
    name = "item.layers.1.weight"
    direction = torch.randn_like(model.phi()[name])
    analytic = (meta.phi_grads[name] * direction).sum()

    def query_loss(shift):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            shifted.phi()[name].add_(shift * direction)
        return make_engine(shifted).meta_gradients(batch, profiles, items, attention).query_loss.sum()

    numeric = (query_loss(1e-6) - query_loss(-1e-6)) / 2e-6
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    first_order = make_engine(build(dict(cfg, first_order=True)), "reference")
    assert not torch.allclose(first_order.meta_gradients(batch, profiles, items, attention).phi_grads[name],
                              meta.phi_grads[name])


def test_outer_products_weighted_sum_by_hand():
    # user 0: [1, 2]^T [3, 4] = [[3, 4], [6, 8]]; user 1: [1, 0]^T [0, 1] = [[0, 1], [0, 0]]
    products = OuterProducts(torch.tensor([[[1.0, 2.0]], [[1.0, 0.0]]]), torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]]))
    weights = torch.tensor([[1.0, 0.5], [2.0, 0.0]])  # [B=2, K=2]
    expected = torch.tensor([[[3.0, 6.0], [6.0, 8.0]],  # 1 * user0 + 2 * user1
                             [[1.5, 2.0], [3.0, 4.0]]])  # 0.5 * user0
    assert torch.equal(products.weighted_sum(weights), expected)


@pytest.mark.parametrize("rank, n_slots, per_user_products", [(1, 3, False), (2, 2, False), (3, 2, True),
                                                             (45, 3, True)])
def test_outer_product_sum_equals_a_loop_over_users_and_rows(rank, n_slots, per_user_products, monkeypatch):
    """Both contraction orders, each where it costs fewer multiply-adds: per-user products (one bmm)
    when rank * (K - 1) > K, else the weighted factors (no bmm)."""
    bmm_calls = []
    monkeypatch.setattr(torch, "bmm", lambda *args: bmm_calls.append(1) or torch.matmul(*args))
    gen = torch.Generator().manual_seed(rank)
    deltas = torch.randn(4, rank, 3, generator=gen, dtype=torch.float64)
    rows = torch.randn(4, rank, 5, generator=gen, dtype=torch.float64)
    weights = torch.rand(4, n_slots, generator=gen, dtype=torch.float64)
    expected = torch.zeros(n_slots, 3, 5, dtype=torch.float64)
    for b in range(4):
        for r in range(rank):
            for k in range(n_slots):
                expected[k] += weights[b, k] * torch.outer(deltas[b, r], rows[b, r])
    assert torch.allclose(outer_product_sum(weights, deltas, rows), expected, atol=1e-12)
    assert len(bmm_calls) == per_user_products


LAYER_FORMS = ["low_rank", "fixed_input", "fixed_input_mixture", "dense"]


def layer_and_dense_weights(form, gen, n_users=4, n_out=3, n_in=5, n_rows=5, n_slots=4, n_bases=2):
    """A layer of `form` and its users' dense weights [B, out, in] and biases [B, out] (float64);
    the fixed-input forms get their n_rows inputs [B, n_rows, in], the first n_slots for steps."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = randn(n_users, n_rows, n_in)
    if form in ("fixed_input_mixture", "dense"):
        base = randn(n_bases, n_out, n_in)
        coef = torch.softmax(randn(n_users, n_bases), -1)
        dense = torch.einsum("bj,joi->boi", coef, base)
    else:
        base, coef = randn(n_out, n_in), None
        dense = base.expand(n_users, n_out, n_in)
    if form == "low_rank":
        shared_bias = randn(n_out)
        return LowRankLinear(base, shared_bias, n_users, capacity=6), dense, shared_bias.expand(n_users, -1), inputs
    bias = randn(n_users, n_out)
    if form == "dense":
        return DenseLinear(base, coef, bias), dense, bias, inputs
    return FixedInputLinear(inputs, n_slots, base, bias, coef), dense, bias, inputs


@pytest.mark.parametrize("form", LAYER_FORMS)
def test_layer_forms_equal_dense_per_user_weights_through_local_steps(form):
    """Each form's outputs, input gradients and gradient norms equal those of the users' dense
    weights W_b, bias_b, after each of three local steps W_b += s_b dz_b^T x_b, bias_b += s_b sum(dz_b)
    (the third step on the first step's rows, as the second pass over a support set)."""
    gen = torch.Generator().manual_seed(3)
    layer, dense, bias, inputs = layer_and_dense_weights(form, gen)
    n_users, n_out = bias.shape
    fixed = form.startswith("fixed_input")

    def outputs(x):
        return torch.einsum("bni,boi->bno", x, dense) + bias.unsqueeze(1)

    for rows in (slice(0, 2), slice(2, 4), slice(0, 2)):
        x = inputs[:, rows]
        for check_rows in (rows, slice(4, 5)):  # a step's rows, and a row no step reads (a query row)
            got = layer.forward(check_rows) if fixed else layer.forward(inputs[:, check_rows])
            assert torch.allclose(got, outputs(inputs[:, check_rows]), atol=1e-12)
        out_grad = torch.randn(n_users, 2, n_out, generator=gen, dtype=torch.float64)
        assert torch.allclose(layer.input_grad(out_grad), torch.einsum("bno,boi->bni", out_grad, dense), atol=1e-12)
        grad_sq = (torch.einsum("bno,bni->boi", out_grad, x).pow(2).sum((1, 2)) + out_grad.sum(1).pow(2).sum(1))
        total = torch.full((n_users,), 0.5, dtype=torch.float64)
        assert torch.allclose(layer.add_grad_sq_norm(total, rows if fixed else x, out_grad), 0.5 + grad_sq, atol=1e-12)
        step_scale = -0.1 * torch.rand(n_users, generator=gen, dtype=torch.float64)
        layer.step(rows if fixed else x, out_grad, step_scale)
        dense = dense + step_scale.view(-1, 1, 1) * torch.einsum("bno,bni->boi", out_grad, x)
        bias = bias + step_scale.view(-1, 1) * out_grad.sum(1)
    if not fixed:
        # inputs [shared; rows_r] with a shared first part (the rating model's [e_u; e_i]), and column blocks
        shared, rows = inputs[:, :1, :2], inputs[:, 1:, 2:]
        x = torch.cat([shared.expand(-1, rows.shape[1], -1), rows], -1)
        assert torch.allclose(layer.forward_pair(shared, rows, x), outputs(x), atol=1e-12)
        out_grad = torch.randn(n_users, 3, n_out, generator=gen, dtype=torch.float64)
        assert torch.allclose(layer.input_grad(out_grad, slice(2, None)),
                              torch.einsum("bno,boi->bni", out_grad, dense[..., 2:]), atol=1e-12)


def test_dense_layer_weighted_sums_of_weights_and_of_their_change():
    """The memory writes' sums: of the adapted weights, and of the adapted minus the starting mixture."""
    gen = torch.Generator().manual_seed(4)
    layer, start, _, inputs = layer_and_dense_weights("dense", gen)
    x, out_grad = inputs[:, :2], torch.randn(4, 2, 3, generator=gen, dtype=torch.float64)
    step_scale = torch.tensor([-0.1, -0.2, 0.0, -0.3], dtype=torch.float64)
    layer.step(x, out_grad, step_scale)
    adapted = start + step_scale.view(-1, 1, 1) * torch.einsum("bno,bni->boi", out_grad, x)
    weights = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(layer.weighted_sum(weights), torch.einsum("bk,boi->koi", weights, adapted), atol=1e-12)
    assert torch.allclose(layer.update().weighted_sum(weights), torch.einsum("bk,boi->koi", weights, adapted - start),
                          atol=1e-12)


@pytest.mark.parametrize("key, value", [
    ("attention_temperature", 0), ("attention_temperature", -1.0), ("attention_temperature", "1"),
    ("attention_temperature", float("inf")), ("task_memory_write", "sum"), ("task_memory_init", "zeros"),
    ("clip_query_grad", 0), ("clip_query_grad", -5.0), ("clip_query_grad", True), ("freeze_mem_layer", "yes"),
    ("head", "ranking"), ("compile", "fast")])
def test_bad_option_values_raise_one_line_errors_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"^{key} must be") as error:
        build(small_config(**{key: value}))
    assert "\n" not in str(error.value)


def test_phi_task_memory_init_starts_every_slot_at_phis_mem_layer_weight():
    model = build(small_config(task_memory_init="phi"))
    phi_weight = model.phi()[MEM_WEIGHT]
    assert all(torch.equal(slot, phi_weight) for slot in model.memories.task)
    slots = build(small_config()).memories.task
    assert not torch.equal(slots[0], slots[1]) and 0.8 < slots.std().item() < 1.2  # N(0, 1)


def test_memories_are_saved_loaded_and_converted_with_the_model():
    cfg = small_config()
    model = build(cfg)
    assert {b.dtype for b in model.memories.buffers()} == {torch.float64}
    optimizer = torch.optim.SGD(model.meta_parameters(), lr=0.1)
    meta_train_step(model, make_engine(model), random_batch(3), optimizer)
    state = model.state_dict()
    assert {"memories.profile", "memories.task", "memories.embedding_user_layers_0_weight"} <= set(state)
    restored = build(cfg, seed=2)
    restored.load_state_dict(state)
    assert_same_state(snapshot(restored), snapshot(model), atol=0)
    # the loaded model continues exactly as the original (same optimiser state: plain SGD)
    for m in (model, restored):
        meta_train_step(m, make_engine(m), random_batch(3, seed=4), torch.optim.SGD(m.meta_parameters(), lr=0.1))
    assert_same_state(snapshot(restored), snapshot(model), atol=0)


@pytest.mark.parametrize("engine_name, first_order", [("batched", True), ("reference", True), ("reference", False)])
def test_query_gradient_clip_scales_the_users_whole_meta_gradient(engine_name, first_order):
    """One user: every part of its meta-gradient is multiplied by max_norm / (|g| + 1e-6), |g| the
    norm of its query gradient over all of the adapted theta (the set the local clip uses)."""
    cfg = small_config(first_order=first_order, clip_query_grad=0.05)
    batch = random_batch(1)
    results = {}
    for max_norm in (None, 0.05):
        model = build(dict(cfg, clip_query_grad=max_norm))
        with torch.no_grad():
            profiles = model.input_loading.user_profile(batch.user_codes)
            items = model.input_loading.item_profile(batch.item_features)
        results[max_norm] = make_engine(model, engine_name).meta_gradients(batch, profiles, items, model.read(profiles))
    free, clipped = results[None], results[0.05]
    first_order_free = free if first_order else make_engine(build(dict(cfg, first_order=True, clip_query_grad=None)),
                                                            "reference").meta_gradients(
        batch, profiles, items, model.read(profiles))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in first_order_free.phi_grads.values()))
    factor = 0.05 / (norm + 1e-6)
    assert factor < 0.5  # the clip bites
    for name in free.phi_grads:
        assert torch.allclose(clipped.phi_grads[name], factor * free.phi_grads[name], atol=1e-12), name
    assert torch.allclose(clipped.profile_grads, factor * free.profile_grads, atol=1e-12)
    assert torch.allclose(clipped.item_grads, factor * free.item_grads, atol=1e-12)
    weights = torch.ones(1, 1, dtype=torch.float64)
    for name in free.user_grads:
        assert torch.allclose(clipped.user_grads[name].weighted_sum(weights),
                              factor * free.user_grads[name].weighted_sum(weights), atol=1e-12), name
    assert torch.equal(clipped.query_loss, free.query_loss)  # the reported loss is never clipped
