"""An independent MAMO for the tests: one user at a time, plain autograd, explicit memory writes.

Written from the method's description and sharing no code with models.py, modules/memories.py or
modules/low_rank.py: only the input loading module (modules/input_loading.py) is reused, and the
parameter names of the networks. Every rule is spelled out as a loop over users and memory slots:

- read: a_u[k] = softmax_k(cos(p_u, M_P[k]) / T); theta_u = phi_u - tao * sum_k a_u[k] M_U[k];
  the mem_layer weight W_u = sum_k a_u[k] M_UI[k]; every other tensor of theta starts at phi;
- local update: n_inner_loop passes over the support rows in mini-batches of batch_size, each a
  plain gradient step with learning rate rho, the gradient's norm over all of theta clipped at
  grad_clip (torch.nn.utils.clip_grad_norm_'s rule);
- query gradient (first order): d(query loss)/d(adapted theta) and d(query loss)/d(psi) through
  the query rows' profiles; with clip_query_grad, both are scaled by the factor that clips the
  theta part's norm;
- global step: the meta-optimiser over psi and phi on the mean of the users' gradients (the
  adapted theta's gradient counts as phi's), without phi's mem_layer weight when the task memory
  gives it or it is frozen;
- writes, after the global step, user after user, with the attention and profile each user read
  at the batch start: M_P[k] <- alpha a_k p_u + (1 - alpha) M_P[k];
  M_U[k] <- beta a_k g_u + (1 - beta) M_U[k] (g_u: the user's theta_u query gradient);
  M_UI[k] <- gamma a_k W'_u + (1 - gamma) M_UI[k] (published) or M_UI[k] + gamma a_k (W'_u - W_u)
  (increment), W'_u the adapted mem_layer weight.
All users of a batch read the memories as they stood at the batch start.
"""
import copy

import torch
import torch.nn.functional as F

MEM = "rec.layers.0.weight"  # the rating model's first layer: the task memory's fast weight


def select(batch, b):
    """User b of a TaskBatch: (user codes [F_u], item features {field: [N, ...]}, ratings [N])."""
    return batch.user_codes[b], {name: value[b] for name, value in batch.item_features.items()}, batch.ratings[b]


class LoopMAMO:
    """MAMO started from a copy of an engine model's parameters and memories (not its code).

    engine_model: a models.MAMO built from `cfg`; only its tensors are read. The task memory
    starts at phi's mem_layer weight by itself when cfg['task_memory_init'] == 'phi'.
    """

    def __init__(self, engine_model, cfg, rating_min=1):
        self.cfg, self.rating_min = cfg, rating_min
        self.input_loading = copy.deepcopy(engine_model.input_loading)
        self.phi = {name[len("theta_net."):]: p.detach().clone().requires_grad_()
                    for name, p in engine_model.named_parameters() if name.startswith("theta_net.")}
        self.n_user_layers = sum(1 for name in self.phi if name.startswith("user.") and name.endswith(".weight"))
        self.n_item_layers = sum(1 for name in self.phi if name.startswith("item.") and name.endswith(".weight"))
        memories = engine_model.memories
        self.M_P = memories.profile.clone() if memories is not None else None
        self.M_U = {name: slots.clone() for name, slots in memories.embedding.items()} if cfg["feature_memory"] else {}
        self.M_UI = None
        if cfg["task_memory"]:
            if cfg["task_memory_init"] == "phi":
                self.M_UI = torch.stack([self.phi[MEM].detach().clone() for _ in range(cfg["n_k"])])
            else:
                self.M_UI = memories.task.clone()
        frozen = cfg["task_memory"] or cfg["freeze_mem_layer"]
        self.trained_phi = [name for name in self.phi if not (frozen and name == MEM)]
        optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        self.optimizer = optimizers[cfg["meta_optimizer"]](
            list(self.input_loading.parameters()) + [self.phi[name] for name in self.trained_phi], lr=cfg["lambda"])
        self.clipped_local_steps = 0  # how often each clip changed something: tests check that it bites
        self.clipped_query_grads = 0

    # --- the networks, written out ---------------------------------------------------------------

    def act(self, x):
        return F.leaky_relu(x, 0.1) if self.cfg["activation"] == "leaky_relu" else F.relu(x)

    def forward(self, theta, p_u, p_i):
        """One user: profile [D_u], item profiles [n, D_i] -> outputs [n, n_y]."""
        e_u = p_u
        for j in range(self.n_user_layers):
            e_u = self.act(F.linear(e_u, theta[f"user.layers.{j}.weight"], theta[f"user.layers.{j}.bias"]))
        e_i = p_i
        for j in range(self.n_item_layers):
            e_i = self.act(F.linear(e_i, theta[f"item.layers.{j}.weight"], theta[f"item.layers.{j}.bias"]))
        x = torch.cat([e_u.unsqueeze(0).expand(e_i.shape[0], -1), e_i], 1)
        x = F.linear(x, theta[MEM], theta["rec.layers.0.bias"])  # mem_layer: no activation
        x = self.act(F.linear(x, theta["rec.layers.1.weight"], theta["rec.layers.1.bias"]))
        return F.linear(x, theta["rec.layers.2.weight"], theta["rec.layers.2.bias"])

    def loss(self, outputs, ratings):
        if self.cfg["head"] == "regression":
            return F.mse_loss(outputs[:, 0], ratings.to(outputs.dtype))
        return F.cross_entropy(outputs, ratings - self.rating_min)

    # --- one user ---------------------------------------------------------------------------------

    def attention(self, p_u, M_P):
        """a_u [K] for a profile [D_u] against the slots M_P [K, D_u]."""
        cosines = torch.stack([(p_u @ slot) / (p_u.norm() * slot.norm()) for slot in M_P])
        exps = torch.exp(cosines / self.cfg["attention_temperature"])
        return exps / exps.sum()

    def initial_theta(self, a, M_U, M_UI):
        theta = {name: p.detach().clone() for name, p in self.phi.items()}
        for name, slots in M_U.items():
            theta[name] = theta[name] - self.cfg["tao"] * sum(a[k] * slots[k] for k in range(len(a)))
        if M_UI is not None:
            theta[MEM] = sum(a[k] * M_UI[k] for k in range(len(a)))
        return theta

    def clip_factor(self, grads, max_norm):
        """min(1, max_norm / (norm + 1e-6)) over all tensors of `grads`; 1 when max_norm is None."""
        if max_norm is None:
            return 1.0
        norm = torch.sqrt(sum((g * g).sum() for g in grads)).item()
        return min(1.0, max_norm / (norm + 1e-6))

    def local_update(self, theta, p_u, p_i, ratings):
        cfg = self.cfg
        n = p_i.shape[0]
        for _ in range(cfg["n_inner_loop"]):
            for start in range(0, n, cfg["batch_size"]):
                rows = slice(start, start + cfg["batch_size"])
                leaves = {name: t.detach().requires_grad_() for name, t in theta.items()}
                loss = self.loss(self.forward(leaves, p_u, p_i[rows]), ratings[rows])
                grads = torch.autograd.grad(loss, list(leaves.values()))
                factor = self.clip_factor(grads, cfg["grad_clip"])
                self.clipped_local_steps += factor < 1.0
                theta = {name: (leaves[name] - cfg["rho"] * factor * g).detach() for name, g in zip(leaves, grads)}
        return theta

    def adapt(self, codes, items, ratings, M_P, M_U, M_UI):
        """Read and local update of one user -> (profile with graph, item profiles with graph,
        attention, initial theta, adapted theta)."""
        support = self.cfg["support_size"]
        p_u = self.input_loading.user_profile(codes)
        p_i = self.input_loading.item_profile(items)
        a = self.attention(p_u.detach(), M_P) if M_P is not None else None
        theta0 = self.initial_theta(a, M_U, M_UI)
        theta = self.local_update(theta0, p_u.detach(), p_i[:support].detach(), ratings[:support])
        return p_u, p_i, a, theta0, theta

    # --- training and evaluation ------------------------------------------------------------------

    def train_step(self, batch):
        """One global step on the batch's users, then their memory writes -> query losses [B]."""
        cfg = self.cfg
        support = cfg["support_size"]
        M_P0 = None if self.M_P is None else self.M_P.clone()  # what every user of the batch reads
        M_U0 = {name: slots.clone() for name, slots in self.M_U.items()}
        M_UI0 = None if self.M_UI is None else self.M_UI.clone()
        psi = list(self.input_loading.parameters())
        n_users = batch.ratings.shape[0]
        phi_sum = {name: torch.zeros_like(p) for name, p in self.phi.items()}
        psi_sum = [torch.zeros_like(p) for p in psi]
        losses, reads = [], []
        for b in range(n_users):
            codes, items, ratings = select(batch, b)
            p_u, p_i, a, theta0, theta = self.adapt(codes, items, ratings, M_P0, M_U0, M_UI0)
            leaves = {name: t.detach().requires_grad_() for name, t in theta.items()}
            loss = self.loss(self.forward(leaves, p_u, p_i[support:]), ratings[support:])
            grads = torch.autograd.grad(loss, list(leaves.values()) + psi, allow_unused=True)
            theta_grads = dict(zip(leaves, grads[:len(leaves)]))
            psi_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(psi, grads[len(leaves):])]
            factor = self.clip_factor(list(theta_grads.values()), cfg["clip_query_grad"])
            self.clipped_query_grads += factor < 1.0
            theta_grads = {name: factor * g for name, g in theta_grads.items()}
            for name, g in theta_grads.items():
                phi_sum[name] += g
            for total, g in zip(psi_sum, psi_grads):
                total += factor * g
            losses.append(loss.detach())
            reads.append(dict(a=a, p_u=p_u.detach(), g_u={name: theta_grads[name] for name in self.M_U},
                              W_read=theta0[MEM], W_adapted=theta[MEM]))
        self.optimizer.zero_grad()
        for p, total in zip(psi, psi_sum):
            p.grad = total / n_users
        for name in self.trained_phi:
            self.phi[name].grad = phi_sum[name] / n_users
        self.optimizer.step()
        for read in reads:
            self.write(read)
        return torch.stack(losses)

    def write(self, read):
        """One user's memory writes, slot by slot."""
        cfg, a = self.cfg, read["a"]
        if a is None:
            return
        for k in range(len(a)):
            self.M_P[k] = cfg["alpha"] * a[k] * read["p_u"] + (1 - cfg["alpha"]) * self.M_P[k]
            for name, slots in self.M_U.items():
                slots[k] = cfg["beta"] * a[k] * read["g_u"][name] + (1 - cfg["beta"]) * slots[k]
            if self.M_UI is None:
                continue
            if cfg["task_memory_write"] == "increment":
                self.M_UI[k] = self.M_UI[k] + cfg["gamma"] * a[k] * (read["W_adapted"] - read["W_read"])
            else:
                self.M_UI[k] = cfg["gamma"] * a[k] * read["W_adapted"] + (1 - cfg["gamma"]) * self.M_UI[k]

    @torch.no_grad()
    def predict(self, batch):
        """Read, adapt and predict every user's query rows -> outputs [B, Q, n_y]; writes nothing."""
        outputs = []
        for b in range(batch.ratings.shape[0]):
            codes, items, ratings = select(batch, b)
            with torch.enable_grad():
                p_u, p_i, _, _, theta = self.adapt(codes, items, ratings, self.M_P, self.M_U, self.M_UI)
            outputs.append(self.forward(theta, p_u.detach(), p_i[self.cfg["support_size"]:].detach()))
        return torch.stack(outputs)

    def named_parameters(self):
        """{name as in models.MAMO.named_parameters(): tensor}."""
        params = {f"input_loading.{name}": p for name, p in self.input_loading.named_parameters()}
        params.update({f"theta_net.{name}": p for name, p in self.phi.items()})
        return params
