"""MAMO: model, local update and global update (SPEC §2-§4), as a small functional core.

Parameters are split in two:
- psi: the input loading (shared feature embeddings), global and never adapted per user;
- phi: the global values of theta = (theta_u, theta_i, theta_r), named like `user.layers.0.weight`.

For a batch of users (`utils.TaskBatch`) every user starts from its own theta (phi - tao * b_u,
and its task-memory mem_layer weight), adapts it on its support set and is scored on its query
set; no shared state is mutated until the batch's global step and memory writes. Two engines
compute the same thing:
- `ReferenceEngine`: one user at a time with `torch.func.functional_call` and `torch.func.grad`,
  written for reading. Supports Adam local updates and second-order meta-gradients.
- `BatchedEngine`: all users of a batch at once. With plain gradient descent each local step
  changes a linear layer by a low-rank update (-rho * kappa * dz^T x), so a layer is kept as its
  initial weight (shared phi, or the user's attention mixture of K shared memory slots, applied
  without forming it) plus the history of those updates; no per-user weight matrix is formed,
  and the memory writes take their attention-weighted sums from these factors.
Tests check that both give the same numbers.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from modules.info_embedding import EmbeddingNetwork, activate, activation_slope
from modules.input_loading import InputLoading
from modules.memories import Memories
from modules.rec_model import MEM_LAYER, RecModel

MEM_WEIGHT = f"rec.{MEM_LAYER}.weight"
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class ThetaNet(nn.Module):
    """The adapted part of the model: user and item embedding networks and the rating model."""

    def __init__(self, user_dim, item_dim, embedding_dim, n_layer, n_y, activation):
        super().__init__()
        self.user = EmbeddingNetwork(user_dim, embedding_dim, n_layer, activation)
        self.item = EmbeddingNetwork(item_dim, embedding_dim, n_layer, activation)
        self.rec = RecModel(embedding_dim, n_y, activation)

    def forward(self, profile, item_profiles):
        """p_u [..., D_u], p_i [..., n, D_i] -> outputs [..., n, n_y]."""
        return self.rec(self.user(profile).unsqueeze(-2), self.item(item_profiles))

    def stacks(self):
        """(name prefix, LinearStack) in forward order."""
        return [("user", self.user), ("item", self.item), ("rec", self.rec)]


class MAMO(nn.Module):
    """Global parameters (psi, phi) and memories of one MAMO model.

    features: the manifest's feature schema; n_y: rating classes (or 1 for regression);
    rating_min: the rating of class 0.
    """

    def __init__(self, features, n_y, rating_min, config, generator=None):
        super().__init__()
        self.config = dict(config)
        d = config["embedding_dim"]
        self.n_y, self.rating_min = n_y, rating_min
        self.regression = config["head"] == "regression"
        if config["head"] not in ("classification", "regression"):
            raise ValueError(f"head must be 'classification' or 'regression', got {config['head']!r}")
        self.input_loading = InputLoading(features, d)
        self.theta_net = ThetaNet(self.input_loading.user_dim, self.input_loading.item_dim, d,
                                  config["n_layer"], 1 if self.regression else n_y, config["activation"])
        self.memories = None
        if config["feature_memory"] or config["task_memory"]:
            user_shapes = {f"user.{name}": p.shape for name, p in self.theta_net.user.named_parameters()}
            self.memories = Memories(config["n_k"], self.input_loading.user_dim, user_shapes, 2 * d,
                                     config["feature_memory"], config["task_memory"], generator)

    def phi(self):
        """{theta name: global value}."""
        return dict(self.theta_net.named_parameters())

    def meta_parameters(self):
        """What the global step updates: psi and phi, without the mem_layer weight when it comes
        from the task memory or is frozen (config freeze_mem_layer: kept at its initial value)."""
        fixed = self.config["task_memory"] or self.config.get("freeze_mem_layer")
        return [p for name, p in self.named_parameters() if not (fixed and name == f"theta_net.{MEM_WEIGHT}")]

    def targets(self, ratings):
        """Ratings -> classes (long) or float ratings (regression)."""
        return ratings.float() if self.regression else ratings - self.rating_min

    def loss(self, outputs, targets):
        """Mean loss over the last (row) dimension: outputs [..., n, n_y], targets [..., n] -> [...]."""
        if self.regression:
            return (outputs[..., 0] - targets).pow(2).mean(-1)
        log_probs = torch.log_softmax(outputs, -1)
        return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1)

    def output_grad(self, outputs, targets):
        """d loss / d outputs for the mean loss of `loss` (per user): [..., n, n_y]."""
        n = outputs.shape[-2]
        if self.regression:
            return (2.0 / n) * (outputs - targets.unsqueeze(-1))
        return (torch.softmax(outputs, -1) - F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)) / n

    def predictions(self, outputs):
        """outputs [..., n, n_y] -> (class probabilities [..., n, n_y] or None, expected rating [..., n])."""
        if self.regression:
            return None, outputs[..., 0]
        probs = torch.softmax(outputs, -1)
        values = torch.arange(self.n_y, device=outputs.device, dtype=probs.dtype) + self.rating_min
        return probs, probs @ values

    def read(self, profiles):
        """Memory read for B users: p_u [B, D_u] -> attention [B, K] or None (no memory)."""
        return None if self.memories is None else self.memories.attention(profiles.detach())

    def initial_theta(self, attention, n_users):
        """Dense personalised initial theta: {name: [B, *shape]} (SPEC §3)."""
        theta = {name: p.expand(n_users, *p.shape) for name, p in self.phi().items()}
        if self.config["feature_memory"]:
            for name, bias_term in self.memories.bias_term(attention).items():
                theta[name] = theta[name] - self.config["tao"] * bias_term
        if self.config["task_memory"]:
            theta[MEM_WEIGHT] = self.memories.task_weight(attention)
        return theta


def clip_scale(sq_norm, max_norm):
    """Gradient-norm clipping factor from squared norms [B] (clip_grad_norm_'s formula)."""
    if max_norm is None:
        return torch.ones_like(sq_norm)
    return (max_norm / (sq_norm.sqrt() + CLIP_EPS)).clamp(max=1.0)


def support_batches(support_size, batch_size, n_passes):
    """Row slices of the local update: n_passes passes over the support set, in order."""
    starts = range(0, support_size, batch_size)
    return [slice(s, min(s + batch_size, support_size)) for _ in range(n_passes) for s in starts]


@dataclass
class MetaGradients:
    """What one batch of B training users gives the global step and the memory writes."""
    query_loss: torch.Tensor  # [B]
    phi_grads: dict  # theta name -> mean over users of d L_b / d theta (adapted), theta-shaped
    profile_grads: torch.Tensor  # [B, D_u]: d (mean_b L_b) / d p_u
    item_grads: torch.Tensor  # [B, N, D_i]: d (mean_b L_b) / d p_i (support rows zero if first order)
    user_grads: dict  # user theta name -> [B, *shape]: g_u = d L_b / d adapted theta_u (maybe factored)
    mem_weights: object  # [B, 2d, 2d] adapted mem_layer weights, maybe factored (None without task memory)


class ReferenceEngine:
    """One user at a time, dense theta, torch.func. Readable; the batched engine is tested against it."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def theta_loss(self, theta, profile, item_profiles, targets):
        outputs = functional_call(self.model.theta_net, theta, (profile, item_profiles))
        return self.model.loss(outputs, targets)

    def adapt(self, theta, profile, item_profiles, targets):
        """Local update of one user's theta on its support rows (SPEC §4.2)."""
        cfg = self.config
        loss_grad = grad(self.theta_loss)
        adam_state = {name: (torch.zeros_like(v), torch.zeros_like(v)) for name, v in theta.items()}
        for step, rows in enumerate(support_batches(item_profiles.shape[0], cfg["batch_size"], cfg["n_inner_loop"])):
            grads = loss_grad(theta, profile, item_profiles[rows], targets[rows])
            sq_norm = sum(g.pow(2).sum() for g in grads.values())
            scale = clip_scale(sq_norm, cfg["grad_clip"])
            grads = {name: g * scale for name, g in grads.items()}
            if cfg["local_optimizer"] == "sgd":
                theta = {name: theta[name] - cfg["rho"] * grads[name] for name in theta}
            else:
                theta = adam_update(theta, grads, adam_state, step + 1, cfg["rho"])
        return theta

    def meta_gradients(self, batch, profiles, item_profiles, attention):
        """profiles [B, D_u], item_profiles [B, N, D_i] (detached) -> MetaGradients."""
        model, cfg = self.model, self.config
        n_users, support = profiles.shape[0], batch.support_size
        targets = model.targets(batch.ratings)
        theta0 = model.initial_theta(attention, n_users)
        if cfg["first_order"]:
            theta0 = {name: v.detach() for name, v in theta0.items()}
        else:
            profiles = profiles.detach().requires_grad_()
            item_profiles = item_profiles.detach().requires_grad_()
        query_grad = grad(lambda *args: (self.theta_loss(*args),) * 2, argnums=(0, 1, 2), has_aux=True)
        adapted, losses, grads = [], [], []
        for b in range(n_users):
            theta_b = self.adapt({name: v[b] for name, v in theta0.items()},
                                 profiles[b], item_profiles[b, :support], targets[b, :support])
            query = (profiles[b], item_profiles[b, support:], targets[b, support:])
            if cfg["first_order"]:
                user_grads, loss = query_grad(theta_b, *query)
            else:
                loss = self.theta_loss(theta_b, *query)
                user_grads = (grad(self.theta_loss)({k: v.detach() for k, v in theta_b.items()}, *query),)
            adapted.append(theta_b)
            losses.append(loss)
            grads.append(user_grads)
        theta_grads = {name: torch.stack([g[0][name] for g in grads]) for name in theta0}
        if cfg["first_order"]:
            item_grads = torch.zeros_like(item_profiles)
            item_grads[:, support:] = torch.stack([g[2] for g in grads]) / n_users
            phi_grads = {name: g.mean(0) for name, g in theta_grads.items()}
            profile_grads = torch.stack([g[1] for g in grads]) / n_users
        else:
            phi = model.phi()
            mean_loss = torch.stack(losses).mean()
            flat = torch.autograd.grad(mean_loss, list(phi.values()) + [profiles, item_profiles],
                                       allow_unused=True)
            phi_grads = {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(phi.items(), flat)}
            profile_grads, item_grads = flat[-2], flat[-1]
        return MetaGradients(
            query_loss=torch.stack(losses).detach(),
            phi_grads=phi_grads,
            profile_grads=profile_grads,
            item_grads=item_grads,
            user_grads={name: g for name, g in theta_grads.items() if name.startswith("user.")},
            mem_weights=torch.stack([t[MEM_WEIGHT].detach() for t in adapted]) if cfg["task_memory"] else None,
        )

    def predict(self, batch, profiles, item_profiles, attention):
        """Adapt every user on its support set, return query outputs [B, Q, n_y]."""
        model, support = self.model, batch.support_size
        targets = model.targets(batch.ratings)
        theta0 = model.initial_theta(attention, profiles.shape[0])
        outputs = []
        for b in range(profiles.shape[0]):
            theta_b = self.adapt({name: v[b] for name, v in theta0.items()},
                                 profiles[b], item_profiles[b, :support], targets[b, :support])
            outputs.append(functional_call(model.theta_net, theta_b, (profiles[b], item_profiles[b, support:])))
        return torch.stack(outputs)


def adam_update(theta, grads, state, step, lr, betas=(0.9, 0.999), eps=1e-8):
    """One functional Adam step (torch.optim.Adam's defaults); updates `state` {name: (m, v)}."""
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


def outer_product_sum(weights, deltas, rows):
    """sum_b weights[b, k] * deltas_b^T rows_b: weights [B, K], deltas [B, r, out], rows [B, r, in]
    -> [K, out, in]. Takes the order with fewer multiply-adds: for rank r > K / (K - 1) form the
    B per-user products once ((r + K) * out * in per user), else weight the factors and contract
    over users and rows in one GEMM (K * r * out * in per user, no per-user matrix)."""
    n_users, rank, n_out = deltas.shape
    n_slots, n_in = weights.shape[1], rows.shape[-1]
    if rank * (n_slots - 1) > n_slots:
        per_user = torch.bmm(deltas.transpose(1, 2), rows)
        return (weights.t() @ per_user.view(n_users, -1)).view(n_slots, n_out, n_in)
    weighted = deltas.unsqueeze(2) * weights.view(n_users, 1, n_slots, 1)  # [B, r, K, out]
    total = weighted.reshape(n_users * rank, n_slots * n_out).t() @ rows.reshape(n_users * rank, n_in)
    return total.view(n_slots, n_out, n_in)


class OuterProducts:
    """Per-user matrices deltas_b^T rows_b [B, out, in], kept factored: the memory writes only
    need their attention-weighted sums (`modules.memories.weighted_user_sum`)."""

    def __init__(self, deltas, rows):
        self.deltas, self.rows = deltas, rows

    def weighted_sum(self, weights):
        return outer_product_sum(weights, self.deltas, self.rows)


class LowRankLinear:
    """One linear layer for B users: W_b = base_b + sum_s D_s[b]^T X_s[b], bias_b dense.

    base_b is `base` [out, in] shared by all users (phi), or, with `coef` [B, J], the mixture
    sum_j coef[b, j] * base[j] of J shared matrices [J, out, in], applied as one GEMM against the
    J stacked matrices and never formed per user (B per-user matrices would be read from memory
    at every step; the J shared ones stay in cache). Each local step appends its input rows
    X_s [B, m, in] and scaled output gradients D_s [B, m, out] to buffers of `capacity` rows: the
    update -rho * kappa * dz^T x is never materialised either.
    """

    def __init__(self, base, bias, capacity, coef=None):
        self.base, self.bias, self.coef = base, bias, coef
        n_users, (n_out, n_in) = bias.shape[0], base.shape[-2:]
        self.row_buffer = bias.new_empty(n_users, capacity, n_in)
        self.delta_buffer = bias.new_empty(n_users, capacity, n_out)
        self.rows = self.deltas = None

    def base_forward(self, x, columns=slice(None)):
        """x [B, n, w]: the input's `columns` only -> x base_b[:, columns]^T: [B, n, out]
        (a column slice of the base is a strided view: no copy)."""
        n_users, n, width = x.shape
        base = self.base[..., columns]
        if self.coef is not None:
            n_bases, n_out = base.shape[:2]
            per_base = (x.reshape(n_users * n, width) @ base.reshape(-1, width).t()).view(n_users, n, n_bases, n_out)
            return (per_base * self.coef.view(n_users, 1, n_bases, 1)).sum(2)
        return (x.reshape(n_users * n, width) @ base.t()).view(n_users, n, -1)

    def forward(self, x, base_out=None):
        """x [B, n, in] -> x W_b^T + bias_b: [B, n, out]. base_out: base_forward(x) if already known."""
        out = self.base_forward(x) if base_out is None else base_out
        if self.rows is not None:
            out = out + torch.bmm(torch.bmm(x, self.rows.transpose(1, 2)), self.deltas)
        return out + self.bias.unsqueeze(1)

    def input_grad(self, out_grad, columns=slice(None)):
        """d/dx[..., columns] of sum(out_grad * forward(x)): out_grad [B, n, out] -> [B, n, w]."""
        n_users, n, n_out = out_grad.shape
        base = self.base[..., columns]
        if self.coef is not None:
            mixed = out_grad.unsqueeze(2) * self.coef.view(n_users, 1, -1, 1)
            grad_in = (mixed.reshape(n_users * n, -1) @ base.reshape(-1, base.shape[-1])).view(n_users, n, -1)
        else:
            grad_in = (out_grad.reshape(n_users * n, n_out) @ base).view(n_users, n, -1)
        if self.rows is not None:
            grad_in = grad_in + torch.bmm(torch.bmm(out_grad, self.deltas.transpose(1, 2)), self.rows[..., columns])
        return grad_in

    def step(self, x, out_grad, step_scale):
        """theta <- theta + step_scale * grad, grad_W = out_grad^T x, grad_b = sum of out_grad rows.
        x [B, m, in], out_grad [B, m, out], step_scale [B] (= -rho * clip factor)."""
        start = 0 if self.rows is None else self.rows.shape[1]
        end = start + x.shape[1]
        self.row_buffer[:, start:end] = x
        torch.mul(out_grad, step_scale.view(-1, 1, 1), out=self.delta_buffer[:, start:end])
        self.rows, self.deltas = self.row_buffer[:, :end], self.delta_buffer[:, :end]
        self.bias = self.bias + step_scale.view(-1, 1) * out_grad.sum(1)

    def weighted_sum(self, weights):
        """sum_b weights[b, k] * W_b for weights [B, K] -> [K, out, in], from the factors."""
        if self.coef is not None:
            total = ((weights.t() @ self.coef) @ self.base.flatten(1)).view(-1, *self.base.shape[1:])
        else:
            total = weights.sum(0).view(-1, 1, 1) * self.base
        return total if self.rows is None else total + outer_product_sum(weights, self.deltas, self.rows)


def grad_sq_norm(x, out_grad):
    """||out_grad^T x||_F^2 + ||sum_rows out_grad||^2 per user, from m x m Gram matrices: [B]."""
    gram = torch.bmm(x, x.transpose(1, 2)) * torch.bmm(out_grad, out_grad.transpose(1, 2))
    return gram.sum((1, 2)) + out_grad.sum(1).pow(2).sum(1)


class BatchedEngine:
    """All users of a batch at once, in low-rank form (plain gradient descent, first order)."""

    def __init__(self, model):
        cfg = model.config
        if cfg["local_optimizer"] != "sgd" or not cfg["first_order"]:
            raise ValueError("the batched engine needs local_optimizer='sgd' and first_order=True; "
                             "use the reference engine for Adam or second-order updates")
        self.model, self.config = model, cfg

    def initial_layers(self, attention, n_users, support_size):
        """{stack name: [(layer name, LowRankLinear, activated)]} at the personalised initial theta,
        with room for the update history of a local update on support_size rows."""
        model, cfg = self.model, self.config
        n_steps = len(support_batches(support_size, cfg["batch_size"], cfg["n_inner_loop"]))
        layers = {}
        for prefix, stack in model.theta_net.stacks():
            layers[prefix] = []
            for j, (layer, activated) in enumerate(zip(stack.layers, stack.activated)):
                name = f"{prefix}.layers.{j}"
                base, bias, coef = layer.weight.detach(), layer.bias.detach().expand(n_users, -1), None
                if prefix == "user" and cfg["feature_memory"]:
                    slots = model.memories.embedding
                    base = torch.cat([base.unsqueeze(0), slots[f"{name}.weight"]])
                    coef = torch.cat([attention.new_ones(n_users, 1), -cfg["tao"] * attention], 1)
                    bias = torch.addmm(bias, -cfg["tao"] * attention, slots[f"{name}.bias"])
                if f"{name}.weight" == MEM_WEIGHT and cfg["task_memory"]:
                    base, coef = model.memories.task, attention
                rows_per_step = 1 if prefix == "user" else cfg["batch_size"]
                layers[prefix].append((name, LowRankLinear(base, bias, rows_per_step * n_steps, coef), activated))
        return layers

    def forward(self, layers, profiles, item_profiles, user_base_out, item_base_out):
        """profiles [B, D_u], item_profiles [B, n, D_i]; user_base_out [B, 1, out], item_base_out
        [B, n, out]: the first user and item layers' base outputs for these inputs, which the local
        update does not change -> (outputs [B, n, n_y], tape).
        tape: {stack: [(layer name, layer, input, pre-activation, activated)]}."""
        activation = self.config["activation"]
        tape = {}

        def run(prefix, h, first_base_out=None):
            tape[prefix] = []
            for depth, (name, layer, activated) in enumerate(layers[prefix]):
                z = layer.forward(h, first_base_out if depth == 0 else None)
                tape[prefix].append((name, layer, h, z, activated))
                h = activate(z, activation) if activated else z
            return h

        e_u = run("user", profiles.unsqueeze(1), user_base_out)
        e_i = run("item", item_profiles, item_base_out)
        # x = [e_u; e_i] repeats e_u on every row: its product with the first rec layer is taken once.
        first_rec, d = layers["rec"][0][1], e_u.shape[-1]
        rec_base_out = first_rec.base_forward(e_u, slice(0, d)) + first_rec.base_forward(e_i, slice(d, None))
        return run("rec", torch.cat([e_u.expand(-1, e_i.shape[1], -1), e_i], -1), rec_base_out), tape

    def backward(self, tape, out_grad, profile_grads=True):
        """Backpropagate d loss / d outputs through the tape.
        Returns ([(layer name, layer, input, d pre-activation)], d profiles [B, D_u], d item profiles
        [B, n, D_i]); the last two are None when not `profile_grads` (the local update needs neither)."""
        activation = self.config["activation"]
        grads = []

        def back(prefix, g):
            """-> d loss / d pre-activation of the stack's first layer."""
            for depth, (name, layer, x, z, activated) in reversed(list(enumerate(tape[prefix]))):
                if activated:
                    g = g * activation_slope(z, activation)
                grads.append((name, layer, x, g))
                if depth > 0:
                    g = layer.input_grad(g)
            return g

        d = self.model.config["embedding_dim"]
        first_rec = tape["rec"][0][1]
        rec_grad = back("rec", out_grad)
        item_grad = back("item", first_rec.input_grad(rec_grad, slice(d, None)))
        # e_u feeds every row with the same weights: sum the rows' gradients before the product.
        user_grad = back("user", first_rec.input_grad(rec_grad.sum(1, keepdim=True), slice(0, d)))
        if not profile_grads:
            return grads, None, None
        return (grads, tape["user"][0][1].input_grad(user_grad).squeeze(1),
                tape["item"][0][1].input_grad(item_grad))

    def adapt(self, layers, profiles, item_profiles, user_base_out, item_base_out, targets):
        """Local update on the support rows of item_profiles / item_base_out / targets (in place on `layers`)."""
        cfg, model = self.config, self.model
        for rows in support_batches(item_profiles.shape[1], cfg["batch_size"], cfg["n_inner_loop"]):
            outputs, tape = self.forward(layers, profiles, item_profiles[:, rows], user_base_out, item_base_out[:, rows])
            grads, _, _ = self.backward(tape, model.output_grad(outputs, targets[:, rows]), profile_grads=False)
            sq_norm = sum(grad_sq_norm(x, g) for _, _, x, g in grads)
            step_scale = -cfg["rho"] * clip_scale(sq_norm, cfg["grad_clip"])
            for _, layer, x, g in grads:
                layer.step(x, g, step_scale)

    def adapted_query(self, batch, profiles, item_profiles, attention):
        """Adapt every user on its support rows, then run its query rows -> (layers, outputs, tape)."""
        support = batch.support_size
        targets = self.model.targets(batch.ratings)
        layers = self.initial_layers(attention, profiles.shape[0], support)
        user_base_out = layers["user"][0][1].base_forward(profiles.unsqueeze(1))
        item_base_out = layers["item"][0][1].base_forward(item_profiles)  # phi_i is shared: once for all rows
        self.adapt(layers, profiles, item_profiles[:, :support], user_base_out, item_base_out[:, :support],
                   targets[:, :support])
        outputs, tape = self.forward(layers, profiles, item_profiles[:, support:], user_base_out,
                                     item_base_out[:, support:])
        return layers, outputs, tape

    def meta_gradients(self, batch, profiles, item_profiles, attention):
        model, cfg = self.model, self.config
        n_users, support = profiles.shape[0], batch.support_size
        layers, outputs, tape = self.adapted_query(batch, profiles, item_profiles, attention)
        query_targets = model.targets(batch.ratings[:, support:])
        grads, profile_grad, item_grad = self.backward(tape, model.output_grad(outputs, query_targets))
        phi_grads, user_grads = {}, {}
        for name, layer, x, g in grads:
            phi_grads[f"{name}.weight"] = torch.einsum("bno,bni->oi", g, x) / n_users
            phi_grads[f"{name}.bias"] = g.sum((0, 1)) / n_users
            if name.startswith("user."):
                user_grads[f"{name}.weight"] = OuterProducts(g, x)
                user_grads[f"{name}.bias"] = g.sum(1)
        item_grads = torch.zeros_like(item_profiles)
        item_grads[:, support:] = item_grad / n_users
        mem_layer = next(layer for name, layer, _ in layers["rec"] if f"{name}.weight" == MEM_WEIGHT)
        return MetaGradients(
            query_loss=model.loss(outputs, query_targets),
            phi_grads=phi_grads,
            profile_grads=profile_grad / n_users,
            item_grads=item_grads,
            user_grads=user_grads,
            mem_weights=mem_layer if cfg["task_memory"] else None,
        )

    def predict(self, batch, profiles, item_profiles, attention):
        return self.adapted_query(batch, profiles, item_profiles, attention)[1]


def make_engine(model, name="auto"):
    """'batched' | 'reference' | 'auto' (batched when plain gradient descent and first order)."""
    if name == "auto":
        cfg = model.config
        name = "batched" if cfg["local_optimizer"] == "sgd" and cfg["first_order"] else "reference"
    if name == "batched":
        return BatchedEngine(model)
    if name == "reference":
        return ReferenceEngine(model)
    raise ValueError(f"engine must be 'auto', 'batched' or 'reference', got {name!r}")


def meta_train_step(model, engine, batch, optimizer):
    """One global step on a batch of training users (SPEC §4): every user reads the memories as
    they stand now, adapts, and gives its meta-gradient; phi and psi take one optimiser step on
    their mean; then the memories are written in user order. Returns the users' query losses [B]."""
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
        model.memories.write(attention, profiles_graph, meta.user_grads, meta.mem_weights,
                             cfg["alpha"], cfg["beta"], cfg["gamma"])
    return meta.query_loss.detach()


@torch.no_grad()
def predict_query(model, engine, batch):
    """Evaluation (SPEC §5): memory read, local update on the support set, query outputs
    [B, Q, n_y]. Changes no parameter and no memory."""
    profiles = model.input_loading.user_profile(batch.user_codes)
    item_profiles = model.input_loading.item_profile(batch.item_features)
    return engine.predict(batch, profiles, item_profiles, model.read(profiles))
