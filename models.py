"""MAMO: the model, the local update and the global step, as a small functional core.

Parameters are split in two:
- psi: the input loading (shared feature embeddings), global and never adapted per user;
- phi: the global values of theta = (theta_u, theta_i, theta_r), named like `user.layers.0.weight`.

For a batch of users (`utils.TaskBatch`) every user starts from its own theta (phi - tao * b_u,
and the mem_layer weight read from the task memory), adapts it on its support set and is scored
on its query set; no shared state changes until the batch's global step and memory writes. Two
engines compute the same thing:
- `ReferenceEngine`: one user at a time with `torch.func`, written for reading. Supports Adam
  local updates and second-order meta-gradients.
- `BatchedEngine`: all users of a batch at once, plain gradient descent, first order. Each local
  step changes a linear layer by a low-rank update; each layer is kept in the form that costs
  least (`modules.low_rank`): a shared weight plus the updates' factors, the first layers' fixed
  inputs with their products computed once, or one weight per user where a memory read gives
  each user its own start.
Tests check both against each other and against an independent loop-based implementation.
`modules.cuda_graphs.GraphedEngine` replays the batched engine's calls as CUDA graphs; `make_engine` picks.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value

from modules.info_embedding import EmbeddingNetwork, activate, activation_grad
from modules.cuda_graphs import GraphedEngine
from modules.input_loading import InputLoading
from modules.low_rank import DenseLinear, FixedInputLinear, LowRankLinear, OuterProducts
from modules.memories import TASK_WRITES, DenseUserValues, Memories, PerUserValues
from modules.rec_model import MEM_LAYER, RecModel

MEM_WEIGHT = f"rec.{MEM_LAYER}.weight"
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
TASK_INITS = ("normal", "phi")
COMPILE_MODES = ("auto", "none", "cuda-graphs")


def is_positive_number(value):
    """Whether `value` is a finite int or float above zero (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_compile(compile):
    """Raise a one-line ValueError unless `compile` is one of COMPILE_MODES."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILE_MODES))}, got {compile!r}")


def check_options(config):
    """Raise a one-line ValueError naming the config key when a model option has a bad value."""
    check_compile(config["compile"])
    if config["head"] not in ("classification", "regression"):
        raise ValueError(f"head must be 'classification' or 'regression', got {config['head']!r}")
    if not is_positive_number(config["attention_temperature"]):
        raise ValueError(f"attention_temperature must be a positive number, got {config['attention_temperature']!r}")
    if config["task_memory_write"] not in TASK_WRITES:
        raise ValueError(f"task_memory_write must be 'published' or 'increment', got {config['task_memory_write']!r}")
    if config["task_memory_init"] not in TASK_INITS:
        raise ValueError(f"task_memory_init must be 'normal' or 'phi', got {config['task_memory_init']!r}")
    if config["clip_query_grad"] is not None and not is_positive_number(config["clip_query_grad"]):
        raise ValueError(f"clip_query_grad must be None or a positive norm, got {config['clip_query_grad']!r}")
    if not isinstance(config["freeze_mem_layer"], bool):
        raise ValueError(f"freeze_mem_layer must be True or False, got {config['freeze_mem_layer']!r}")


class ThetaNet(nn.Module):
    """The adapted part of the model: user and item embedding networks and the rating model."""

    def __init__(self, user_dim, item_dim, embedding_dim, n_layer, n_y, activation):
        super().__init__()
        self.user = EmbeddingNetwork(user_dim, embedding_dim, n_layer, activation)
        self.item = EmbeddingNetwork(item_dim, embedding_dim, n_layer, activation)
        self.rec = RecModel(embedding_dim, n_y, activation)

    def forward(self, profile, item_profiles):
        """Outputs of the networks at their own parameters: p_u [..., D_u], p_i [..., n, D_i] -> [..., n, n_y]."""
        return self.rec(self.user(profile).unsqueeze(-2), self.item(item_profiles))

    def stacks(self):
        """The three stacks in forward order: [(name prefix, LinearStack)]."""
        return [("user", self.user), ("item", self.item), ("rec", self.rec)]

    def rec_input_columns(self):
        """Columns of the rating model's input [e_u; e_i] holding e_u and those holding e_i (slices)."""
        d = self.user.layers[-1].weight.shape[0]
        return slice(0, d), slice(d, None)


class MAMO(nn.Module):
    """Global parameters (psi, phi) and memories of one MAMO model.

    features: the manifest's feature schema; n_y: rating classes (or 1 for regression);
    rating_min: the rating of class 0; generator: draws the memories' initial slots.
    """

    def __init__(self, features, n_y, rating_min, config, generator=None):
        super().__init__()
        check_options(config)
        self.config = dict(config)
        d = config["embedding_dim"]
        self.n_y, self.rating_min = n_y, rating_min
        self.regression = config["head"] == "regression"
        self.input_loading = InputLoading(features, d)
        self.theta_net = ThetaNet(self.input_loading.user_dim, self.input_loading.item_dim, d,
                                  config["n_layer"], 1 if self.regression else n_y, config["activation"])
        self.memories = None
        if config["feature_memory"] or config["task_memory"]:
            user_shapes = {f"user.{name}": p.shape for name, p in self.theta_net.user.named_parameters()}
            mem_weight = self.phi()[MEM_WEIGHT]
            self.memories = Memories(config["n_k"], self.input_loading.user_dim, user_shapes, mem_weight.shape,
                                     config["feature_memory"], config["task_memory"], generator,
                                     temperature=config["attention_temperature"],
                                     task_write=config["task_memory_write"],
                                     task_start=mem_weight if config["task_memory_init"] == "phi" else None)

    def phi(self):
        """The global values of theta: {theta name: parameter}."""
        return dict(self.theta_net.named_parameters())

    def meta_parameters(self):
        """What the global step updates: psi and phi, without the mem_layer weight when it comes
        from the task memory or is kept at its initial value (freeze_mem_layer)."""
        fixed = self.config["task_memory"] or self.config["freeze_mem_layer"]
        return [p for name, p in self.named_parameters() if not (fixed and name == f"theta_net.{MEM_WEIGHT}")]

    def targets(self, ratings):
        """Training targets of ratings [...]: classes (long), or float ratings (regression)."""
        return ratings.float() if self.regression else ratings - self.rating_min

    def loss(self, outputs, targets):
        """Mean loss over the rows: outputs [..., n, n_y], targets [..., n] -> [...]."""
        if self.regression:
            return (outputs[..., 0] - targets).pow(2).mean(-1)
        log_probs = torch.log_softmax(outputs, -1)
        return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1)

    def output_targets(self, ratings, dtype):
        """What `output_grad` compares the outputs with, for ratings [...]: the one-hot classes
        [..., n_y], or the ratings [..., 1] (regression); floats of `dtype`."""
        if self.regression:
            return ratings.to(dtype).unsqueeze(-1)
        return F.one_hot(ratings - self.rating_min, self.n_y).to(dtype)

    def output_grad(self, outputs, output_targets):
        """Gradient of `loss` (per user) with respect to the outputs [..., n, n_y], given the rows'
        `output_targets` -> [..., n, n_y]."""
        n = outputs.shape[-2]
        if self.regression:
            return (2.0 / n) * (outputs - output_targets)
        return torch.softmax(outputs, -1).sub_(output_targets).div_(n)

    def predictions(self, outputs):
        """Predictions of outputs [..., n, n_y].

        -> (class probabilities [..., n, n_y], or None for regression; expected rating [..., n]).
        """
        if self.regression:
            return None, outputs[..., 0]
        probs = torch.softmax(outputs, -1)
        values = torch.arange(self.n_y, device=outputs.device, dtype=probs.dtype) + self.rating_min
        return probs, probs @ values

    def read(self, profiles):
        """Memory read for B users: p_u [B, D_u] -> attention [B, K], or None without memories."""
        return None if self.memories is None else self.memories.attention(profiles.detach())

    def initial_theta(self, attention, n_users):
        """The users' personalised initial theta, dense: {name: [B, *shape]}."""
        theta = {name: p.expand(n_users, *p.shape) for name, p in self.phi().items()}
        if self.config["feature_memory"]:
            for name, bias_term in self.memories.bias_term(attention).items():
                theta[name] = theta[name] - self.config["tao"] * bias_term
        if self.config["task_memory"]:
            theta[MEM_WEIGHT] = self.memories.task_weight(attention)
        return theta


def clip_scale(sq_norm, max_norm):
    """Gradient-norm clipping factors from squared norms [B] (clip_grad_norm_'s rule): [B]."""
    if max_norm is None:
        return torch.ones_like(sq_norm)
    return (max_norm / (sq_norm.sqrt() + CLIP_EPS)).clamp(max=1.0)


def clip_user_grads(grads, max_norm):
    """One user's gradient {name: tensor}, clipped to norm max_norm over all its tensors -> (grads, factor)."""
    scale = clip_scale(sum(g.pow(2).sum() for g in grads.values()), max_norm)
    return {name: g * scale for name, g in grads.items()}, scale


def support_batches(support_size, batch_size, n_passes):
    """Row slices of the local update: n_passes passes over the support set, in order."""
    starts = range(0, support_size, batch_size)
    return [slice(s, min(s + batch_size, support_size)) for _ in range(n_passes) for s in starts]


@dataclass
class MetaGradients:
    """What one batch of B training users gives the global step and the memory writes.

    L_b is user b's query loss, times its query-gradient clip factor when clip_query_grad is set.
    """
    query_loss: torch.Tensor  # [B], never clipped
    phi_grads: dict[str, torch.Tensor]  # theta name -> mean over users of d L_b / d theta, theta-shaped
    profile_grads: torch.Tensor  # [B, D_u]: d (mean_b L_b) / d p_u
    item_grads: torch.Tensor  # [B, N, D_i]: d (mean_b L_b) / d p_i (support rows zero if first order)
    user_grads: dict[str, PerUserValues]  # theta_u name -> g_u = d L_b / d adapted theta_u [B, *shape]
    mem_weights: PerUserValues | None  # adapted mem_layer weights W'_u [B, out, in]; None without task memory
    mem_updates: PerUserValues | None  # W'_u minus the weight read from the task memory [B, out, in]


def dense_meta_gradients(losses, theta_grads, phi_grads, profile_grads, item_grads, theta0, adapted, task_memory):
    """MetaGradients from one user at a time's results: losses [B], theta_grads {name: [B, *shape]},
    theta0 {name: [B, *shape]} and adapted [{name: tensor}] per user."""
    mem_weights = mem_updates = None
    if task_memory:
        adapted_weights = torch.stack([theta[MEM_WEIGHT].detach() for theta in adapted])
        mem_weights = DenseUserValues(adapted_weights)
        mem_updates = DenseUserValues(adapted_weights - theta0[MEM_WEIGHT].detach())
    return MetaGradients(
        query_loss=torch.stack(losses).detach(),
        phi_grads=phi_grads,
        profile_grads=profile_grads,
        item_grads=item_grads,
        user_grads={name: DenseUserValues(g) for name, g in theta_grads.items() if name.startswith("user.")},
        mem_weights=mem_weights,
        mem_updates=mem_updates,
    )


class ReferenceEngine:
    """One user at a time, dense theta, torch.func: written for reading; the batched engine is tested against it."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def theta_loss(self, theta, profile, item_profiles, targets):
        """One user's loss at theta: profile [D_u], item_profiles [n, D_i], targets [n] -> scalar."""
        outputs = functional_call(self.model.theta_net, theta, (profile, item_profiles))
        return self.model.loss(outputs, targets)

    def adapt(self, theta, profile, item_profiles, targets):
        """Local update of one user's theta {name: tensor} on its support rows -> adapted theta."""
        cfg = self.config
        loss_grad = grad(self.theta_loss)
        adam_state = {name: (torch.zeros_like(v), torch.zeros_like(v)) for name, v in theta.items()}
        for step, rows in enumerate(support_batches(item_profiles.shape[0], cfg["batch_size"], cfg["n_inner_loop"])):
            grads, _ = clip_user_grads(loss_grad(theta, profile, item_profiles[rows], targets[rows]), cfg["grad_clip"])
            if cfg["local_optimizer"] == "sgd":
                theta = {name: theta[name] - cfg["rho"] * grads[name] for name in theta}
            else:
                theta = adam_update(theta, grads, adam_state, step + 1, cfg["rho"])
        return theta

    def adapt_user(self, theta0, b, profiles, item_profiles, targets, support):
        """User b of the batch, adapted from theta0 {name: [B, *shape]} on its first `support` rows."""
        return self.adapt({name: v[b] for name, v in theta0.items()},
                          profiles[b], item_profiles[b, :support], targets[b, :support])

    def meta_gradients(self, batch, profiles, item_profiles, attention):
        """Adapt every user on its support rows and differentiate its query loss -> MetaGradients.

        profiles [B, D_u], item_profiles [B, N, D_i] (detached), attention [B, K] or None.
        """
        if self.config["first_order"]:
            return self.first_order_meta_gradients(batch, profiles, item_profiles, attention)
        return self.second_order_meta_gradients(batch, profiles, item_profiles, attention)

    def first_order_meta_gradients(self, batch, profiles, item_profiles, attention):
        """The query loss's gradient at the adapted theta (no gradient through the local update)."""
        model, max_norm = self.model, self.config["clip_query_grad"]
        n_users, support = profiles.shape[0], batch.support_size
        targets = model.targets(batch.ratings)
        theta0 = {name: v.detach() for name, v in model.initial_theta(attention, n_users).items()}
        query_grad_and_loss = grad_and_value(self.theta_loss, argnums=(0, 1, 2))
        adapted, losses, theta_grads, profile_grads, query_item_grads = [], [], [], [], []
        for b in range(n_users):
            theta_b = self.adapt_user(theta0, b, profiles, item_profiles, targets, support)
            (theta_grad, profile_grad, item_grad), loss = query_grad_and_loss(
                theta_b, profiles[b], item_profiles[b, support:], targets[b, support:])
            if max_norm is not None:
                theta_grad, scale = clip_user_grads(theta_grad, max_norm)
                profile_grad, item_grad = profile_grad * scale, item_grad * scale
            adapted.append(theta_b)
            losses.append(loss)
            theta_grads.append(theta_grad)
            profile_grads.append(profile_grad)
            query_item_grads.append(item_grad)
        theta_grads = {name: torch.stack([g[name] for g in theta_grads]) for name in theta0}
        item_grads = torch.zeros_like(item_profiles)
        item_grads[:, support:] = torch.stack(query_item_grads) / n_users
        return dense_meta_gradients(losses, theta_grads, {name: g.mean(0) for name, g in theta_grads.items()},
                                    torch.stack(profile_grads) / n_users, item_grads, theta0, adapted,
                                    self.config["task_memory"])

    def second_order_meta_gradients(self, batch, profiles, item_profiles, attention):
        """The gradient of the mean query loss through the local update, with respect to phi and the profiles."""
        model, max_norm = self.model, self.config["clip_query_grad"]
        n_users, support = profiles.shape[0], batch.support_size
        targets = model.targets(batch.ratings)
        theta0 = model.initial_theta(attention, n_users)
        profiles = profiles.detach().requires_grad_()
        item_profiles = item_profiles.detach().requires_grad_()
        adapted, losses, weighted_losses, theta_grads = [], [], [], []
        for b in range(n_users):
            theta_b = self.adapt_user(theta0, b, profiles, item_profiles, targets, support)
            query = (profiles[b], item_profiles[b, support:], targets[b, support:])
            loss = self.theta_loss(theta_b, *query)
            theta_grad = grad(self.theta_loss)({name: v.detach() for name, v in theta_b.items()}, *query)
            if max_norm is not None:
                theta_grad, scale = clip_user_grads(theta_grad, max_norm)
                weighted_losses.append(loss * scale.detach())
            adapted.append(theta_b)
            losses.append(loss)
            theta_grads.append(theta_grad)
        mean_loss = torch.stack(weighted_losses if max_norm is not None else losses).mean()
        phi = model.phi()
        flat = torch.autograd.grad(mean_loss, list(phi.values()) + [profiles, item_profiles], allow_unused=True)
        phi_grads = {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(phi.items(), flat)}
        theta_grads = {name: torch.stack([g[name] for g in theta_grads]) for name in theta0}
        return dense_meta_gradients(losses, theta_grads, phi_grads, flat[-2], flat[-1], theta0, adapted,
                                    self.config["task_memory"])

    def predict(self, batch, profiles, item_profiles, attention):
        """Adapt every user on its support rows and run its query rows -> outputs [B, Q, n_y]."""
        model, support = self.model, batch.support_size
        targets = model.targets(batch.ratings)
        theta0 = model.initial_theta(attention, profiles.shape[0])
        outputs = []
        for b in range(profiles.shape[0]):
            theta_b = self.adapt_user(theta0, b, profiles, item_profiles, targets, support)
            outputs.append(functional_call(model.theta_net, theta_b, (profiles[b], item_profiles[b, support:])))
        return torch.stack(outputs)


def adam_update(theta, grads, state, step, lr, betas=(0.9, 0.999), eps=1e-8):
    """One functional Adam step (torch.optim.Adam's defaults) -> new theta; updates `state` {name: (m, v)}."""
    new_theta = {}
    for name, g in grads.items():
        m, v = state[name]
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        state[name] = (m, v)
        m_hat = m / (1 - betas[0] ** step)
        v_hat = v / (1 - betas[1] ** step)
        new_theta[name] = theta[name] - lr * m_hat / (v_hat.sqrt() + eps)
    return new_theta


class Layer(NamedTuple):
    """One linear layer of a stack, for all users of a batch."""
    name: str  # theta name prefix, e.g. "rec.layers.0"
    linear: LowRankLinear | FixedInputLinear | DenseLinear
    activated: bool  # followed by the activation


class TapeEntry(NamedTuple):
    """What the backward pass needs of one layer's forward pass."""
    layer: Layer
    input: torch.Tensor  # [B, n, in]
    rows: slice | None  # a FixedInputLinear's input rows; None for the other forms
    pre_activation: torch.Tensor  # [B, n, out]


class LayerGrad(NamedTuple):
    """One layer's per-user gradient, factored.

    d loss / d W_b = out_grad_b^T input_b and d loss / d bias_b = the sum of out_grad_b's rows.
    """
    layer: Layer
    input: torch.Tensor  # [B, n, in]
    rows: slice | None  # as TapeEntry.rows
    out_grad: torch.Tensor  # [B, n, out]: d loss / d pre-activation

    @property
    def step_input(self):
        """What the layer's step and gradient norm read: its input rows' indices for a
        FixedInputLinear (it keeps its inputs), else the inputs."""
        return self.input if self.rows is None else self.rows


USER_ROWS = slice(0, 1)  # the user stack reads one row: the profile


class BatchedEngine:
    """All users of a batch at once, each layer in the form of `modules.low_rank` that suits it
    (plain gradient descent, first order).

    Its calls run in inference mode: no autograd bookkeeping on its thousand small operations
    (version counters, view records), measured 0.92-0.94 of the time of a call without it, with
    bit-identical results (`bench/engine_ab.py`). So the tensors of a MetaGradients are inference
    tensors: usable anywhere, but not changed in place outside inference mode."""

    def __init__(self, model):
        cfg = model.config
        if cfg["local_optimizer"] != "sgd" or not cfg["first_order"]:
            raise ValueError("the batched engine needs local_optimizer='sgd' and first_order=True; "
                             "use the reference engine for Adam or second-order updates")
        self.model, self.config = model, cfg
        self.user_columns, self.item_columns = model.theta_net.rec_input_columns()
        self.storages = {}  # per-user weights of the DenseLinear layers, by layer and batch shape

    def storage(self, name, n_users, bases):
        """A reused tensor for the per-user weights of layer `name` [B, out, in] (contents undefined).
        The results of a call hold it until the next call (as a CUDA graph's outputs do)."""
        key = (name, n_users, bases.shape[1:], bases.dtype, bases.device)
        if key not in self.storages:
            with torch.inference_mode(False):  # an ordinary tensor: in place also outside inference mode
                self.storages[key] = torch.empty(n_users, *bases.shape[1:], dtype=bases.dtype, device=bases.device)
        return self.storages[key]

    def initial_layers(self, profiles, item_profiles, attention, support_size):
        """The users' personalised initial layers: {stack name: [Layer]}, ready for a local update
        on the first support_size of item_profiles' rows.

        profiles [B, 1, D_u], item_profiles [B, N, D_i], attention [B, K] or None. The first user
        and item layers read fixed inputs (FixedInputLinear); a layer that starts at a per-user
        mixture (memory reads) keeps a weight per user (DenseLinear); the others start at phi
        (LowRankLinear).
        """
        model, cfg = self.model, self.config
        n_users = profiles.shape[0]
        n_steps = len(support_batches(support_size, cfg["batch_size"], cfg["n_inner_loop"]))
        layers = {}
        for prefix, stack in model.theta_net.stacks():
            layers[prefix] = []
            for j, (layer, activated) in enumerate(zip(stack.layers, stack.activated)):
                name = f"{prefix}.layers.{j}"
                base, bias = layer.weight.detach(), layer.bias.detach()
                bases = coef = None
                if prefix == "user" and cfg["feature_memory"]:
                    slots = model.memories.embedding
                    bases = torch.cat([base.unsqueeze(0), slots[f"{name}.weight"]])
                    coef = torch.cat([attention.new_ones(n_users, 1), -cfg["tao"] * attention], 1)
                    bias = torch.addmm(bias, -cfg["tao"] * attention, slots[f"{name}.bias"])
                if f"{name}.weight" == MEM_WEIGHT and cfg["task_memory"]:
                    bases, coef = model.memories.task, attention
                if j == 0 and prefix == "user":
                    linear = FixedInputLinear(profiles, 1, base if coef is None else bases,
                                              bias.expand(n_users, -1), coef)
                elif j == 0 and prefix == "item":
                    linear = FixedInputLinear(item_profiles, support_size, base, bias.expand(n_users, -1))
                elif coef is not None:
                    linear = DenseLinear(bases, coef, bias.expand(n_users, -1), self.storage(name, n_users, bases))
                else:
                    rows_per_step = 1 if prefix == "user" else cfg["batch_size"]
                    linear = LowRankLinear(base, bias, n_users, rows_per_step * n_steps)
                layers[prefix].append(Layer(name, linear, activated))
        return layers

    def forward(self, layers, profiles, item_profiles, rows):
        """Outputs of every user's current theta on item rows `rows` (a slice)
        -> (outputs [B, n, n_y], tape {stack: [TapeEntry]}).

        profiles [B, 1, D_u], item_profiles [B, N, D_i]: the inputs the first layers were built with.
        """
        activation = self.config["activation"]
        tape = {}

        def run(prefix, h, first_rows, z):
            """Run one stack from its input h and its first layer's outputs z -> its output."""
            tape[prefix] = []
            for depth, layer in enumerate(layers[prefix]):
                if depth > 0:
                    z = layer.linear.forward(h)
                tape[prefix].append(TapeEntry(layer, h, first_rows if depth == 0 else None, z))
                h = activate(z, activation) if layer.activated else z
            return h

        e_u = run("user", profiles, USER_ROWS, layers["user"][0].linear.forward(USER_ROWS))
        e_i = run("item", item_profiles[:, rows], rows, layers["item"][0].linear.forward(rows))
        # x = [e_u; e_i] repeats e_u on every row: its product with the first rec layer is taken once.
        x = torch.cat([e_u.expand(-1, e_i.shape[1], -1), e_i], -1)
        return run("rec", x, None, layers["rec"][0].linear.forward_pair(e_u, e_i, x)), tape

    def backward(self, tape, out_grad, profile_grads=True):
        """Backpropagate d loss / d outputs [B, n, n_y] through the tape.

        Returns ([LayerGrad], d profiles [B, D_u], d item profiles [B, n, D_i]); the last two are
        None when not `profile_grads` (the local update needs neither).
        """
        activation = self.config["activation"]
        grads = []

        def back(prefix, g):
            """Backpropagate g through one stack -> d loss / d pre-activation of its first layer."""
            for depth, entry in reversed(list(enumerate(tape[prefix]))):
                if entry.layer.activated:
                    g = activation_grad(g, entry.pre_activation, activation)
                grads.append(LayerGrad(entry.layer, entry.input, entry.rows, g))
                if depth > 0:
                    g = entry.layer.linear.input_grad(g)
            return g

        first_rec = tape["rec"][0].layer.linear
        rec_grad = back("rec", out_grad)
        item_grad = back("item", first_rec.input_grad(rec_grad, self.item_columns))
        # e_u feeds every row with the same weights: sum the rows' gradients before the product.
        user_grad = back("user", first_rec.input_grad(rec_grad.sum(1, keepdim=True), self.user_columns))
        if not profile_grads:
            return grads, None, None
        return (grads, tape["user"][0].layer.linear.input_grad(user_grad).squeeze(1),
                tape["item"][0].layer.linear.input_grad(item_grad))

    def adapt(self, layers, profiles, item_profiles, output_targets, support_size):
        """Local update on the first support_size rows of item_profiles / output_targets
        (`MAMO.output_targets`), in place on `layers`."""
        cfg, model = self.config, self.model
        for rows in support_batches(support_size, cfg["batch_size"], cfg["n_inner_loop"]):
            outputs, tape = self.forward(layers, profiles, item_profiles, rows)
            grads, _, _ = self.backward(tape, model.output_grad(outputs, output_targets[:, rows]), profile_grads=False)
            if cfg["grad_clip"] is None:
                step_scale = profiles.new_full(profiles.shape[:1], -cfg["rho"])
            else:
                step_scale = -cfg["rho"] * clip_scale(self.grad_sq_norm(grads), cfg["grad_clip"])
            for g in grads:
                g.layer.linear.step(g.step_input, g.out_grad, step_scale)

    @staticmethod
    def grad_sq_norm(grads):
        """Squared norm of each user's gradient over all of theta: [LayerGrad] -> [B]."""
        total = grads[0].out_grad.new_zeros(grads[0].out_grad.shape[0])
        for g in grads:
            total = g.layer.linear.add_grad_sq_norm(total, g.step_input, g.out_grad)
        return total

    def adapted_query(self, batch, profiles, item_profiles, attention):
        """Adapt every user on its support rows, then run its query rows -> (layers, outputs, tape)."""
        support = batch.support_size
        output_targets = self.model.output_targets(batch.ratings[:, :support], profiles.dtype)
        profiles = profiles.unsqueeze(1)
        layers = self.initial_layers(profiles, item_profiles, attention, support)
        self.adapt(layers, profiles, item_profiles, output_targets, support)
        outputs, tape = self.forward(layers, profiles, item_profiles, slice(support, item_profiles.shape[1]))
        return layers, outputs, tape

    @torch.inference_mode()
    def meta_gradients(self, batch, profiles, item_profiles, attention):
        """Adapt every user on its support rows and differentiate its query loss -> MetaGradients.

        profiles [B, D_u], item_profiles [B, N, D_i] (detached), attention [B, K] or None. The
        per-user gradients of the weights and the adapted mem_layer weights stay factored.
        """
        model, cfg = self.model, self.config
        n_users, support = profiles.shape[0], batch.support_size
        layers, outputs, tape = self.adapted_query(batch, profiles, item_profiles, attention)
        query_targets = model.targets(batch.ratings[:, support:])
        query_grad = model.output_grad(outputs, model.output_targets(batch.ratings[:, support:], outputs.dtype))
        grads, profile_grad, item_grad = self.backward(tape, query_grad)
        if cfg["clip_query_grad"] is not None:
            scale = clip_scale(self.grad_sq_norm(grads), cfg["clip_query_grad"])
            grads = [g._replace(out_grad=g.out_grad * scale.view(-1, 1, 1)) for g in grads]
            profile_grad, item_grad = profile_grad * scale.view(-1, 1), item_grad * scale.view(-1, 1, 1)
        phi_grads, user_grads = {}, {}
        for g in grads:
            name = g.layer.name
            out_grad = g.out_grad.reshape(-1, g.out_grad.shape[-1])  # [B * n, out]: every user's rows
            phi_grads[f"{name}.weight"] = (out_grad.t() @ g.input.reshape(out_grad.shape[0], -1)).div_(n_users)
            phi_grads[f"{name}.bias"] = out_grad.sum(0).div_(n_users)
            if name.startswith("user."):
                user_grads[f"{name}.weight"] = OuterProducts(g.out_grad, g.input)
                user_grads[f"{name}.bias"] = DenseUserValues(g.out_grad.sum(1))
        item_grads = torch.zeros_like(item_profiles)
        item_grads[:, support:] = item_grad / n_users
        mem_layer = next(layer.linear for layer in layers["rec"] if f"{layer.name}.weight" == MEM_WEIGHT)
        return MetaGradients(
            query_loss=model.loss(outputs, query_targets),
            phi_grads=phi_grads,
            profile_grads=profile_grad / n_users,
            item_grads=item_grads,
            user_grads=user_grads,
            mem_weights=mem_layer if cfg["task_memory"] else None,
            mem_updates=mem_layer.update() if cfg["task_memory"] else None,
        )

    def predict(self, batch, profiles, item_profiles, attention):
        """Adapt every user on its support rows and run its query rows -> outputs [B, Q, n_y]
        (an ordinary tensor: a caller may change it in place)."""
        with torch.inference_mode():
            outputs = self.adapted_query(batch, profiles, item_profiles, attention)[1]
        return outputs.clone()


def make_engine(model, name="auto", compile=None):
    """The engine called `name`: 'batched' | 'reference' | 'auto' (batched for plain gradient
    descent, first order), run as `compile` says (None: the model's config['compile'];
    see `resolve_compile`)."""
    cfg = model.config
    if name == "auto":
        name = "batched" if cfg["local_optimizer"] == "sgd" and cfg["first_order"] else "reference"
    if name not in ("batched", "reference"):
        raise ValueError(f"engine must be 'auto', 'batched' or 'reference', got {name!r}")
    device = next(model.parameters()).device
    compile = resolve_compile(cfg["compile"] if compile is None else compile, name, device)
    if name == "reference":
        return ReferenceEngine(model)
    engine = BatchedEngine(model)
    return GraphedEngine(engine) if compile == "cuda-graphs" else engine


def resolve_compile(compile, engine_name, device):
    """What `compile` means for an engine on a device: 'none' (plain eager calls) or
    'cuda-graphs' (each batch shape's work captured once as a CUDA graph, then replayed: batched
    engine on CUDA only). 'auto' is the fastest exact one: cuda-graphs for the batched engine on
    CUDA, else none. (On CPU, torch.compile was measured no faster than eager: bench/inductor_cpu.py.)"""
    check_compile(compile)
    if compile == "auto":
        return "cuda-graphs" if engine_name == "batched" and device.type == "cuda" else "none"
    if compile == "cuda-graphs" and (engine_name != "batched" or device.type != "cuda"):
        raise ValueError(f"compile='cuda-graphs' needs the batched engine on a CUDA device, got the {engine_name} "
                         f"engine on {device}; use compile='auto' or 'none'")
    return compile


def meta_train_step(model, engine, batch, optimizer):
    """One global step on a batch of training users -> their query losses [B].

    Every user reads the memories as they stand now, adapts, and gives its meta-gradient; psi and
    phi take one optimiser step on their mean; then the memories are written in user order, with
    the profiles and attention read before the step.
    """
    profiles_graph = model.input_loading.user_profile(batch.user_codes)
    items_graph = model.input_loading.item_profile(batch.item_features)
    attention = model.read(profiles_graph)
    meta = engine.meta_gradients(batch, profiles_graph.detach(), items_graph.detach(), attention)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward([profiles_graph, items_graph], [meta.profile_grads, meta.item_grads])
    phi = model.phi()
    trainable = {id(p) for p in model.meta_parameters()}
    for name, g in meta.phi_grads.items():
        if id(phi[name]) in trainable:
            phi[name].grad = g.detach()
    optimizer.step()
    if model.memories is not None:
        cfg = model.config
        model.memories.write(attention, profiles_graph, meta.user_grads, meta.mem_weights, meta.mem_updates,
                             cfg["alpha"], cfg["beta"], cfg["gamma"])
    return meta.query_loss.detach().clone()  # a CUDA graph's output is overwritten at the next step


@torch.no_grad()
def predict_query(model, engine, batch):
    """Evaluation: memory read, local update on the support set -> query outputs [B, Q, n_y].

    Changes no parameter and no memory.
    """
    profiles = model.input_loading.user_profile(batch.user_codes)
    item_profiles = model.input_loading.item_profile(batch.item_features)
    return engine.predict(batch, profiles, item_profiles, model.read(profiles))
