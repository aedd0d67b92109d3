"""MAMO's memories (SPEC §3), plain tensors without autograd history.

- profile memory M_P [K, D_u]: attention a_u = softmax_k(cos(p_u, M_P[k])).
- embedding memory M_U: K slots shaped like theta_u; bias term b_u = sum_k a_u[k] M_U[k].
- task memory M_UI [K, 2d, 2d]: mem_layer fast weight W_mem = sum_k a_u[k] M_UI[k].

Writes for a batch of B users use the attention each user read at the batch start and apply
the users' writes in order: M <- rate * a_b[k] * v_b + (1 - rate) * M for b = 0..B-1, computed in
closed form. A batch of one user is exactly the sequential algorithm.
"""
import torch
import torch.nn.functional as F


def weighted_user_sum(values, weights):
    """sum_b weights[b, k] * v_b: [K, *S]. weights [B, K]; values: a tensor [B, *S], or per-user
    values kept in factored form (the batched engine's) with the same `weighted_sum(weights)`."""
    if isinstance(values, torch.Tensor):
        return torch.einsum("bk,b...->k...", weights, values.detach())
    return values.weighted_sum(weights)


def decayed_write(memory, rate, attention, values):
    """Apply B sequential writes M[k] <- rate*a_b[k]*v_b + (1-rate)*M[k] in one step.

    memory [K, *S], attention [B, K], values [B, *S] (see `weighted_user_sum`) -> new memory [K, *S].
    """
    n_users = attention.shape[0]
    steps_after = torch.arange(n_users - 1, -1, -1, device=memory.device, dtype=memory.dtype)
    user_weights = rate * (1.0 - rate) ** steps_after
    return (1.0 - rate) ** n_users * memory + weighted_user_sum(values, user_weights.unsqueeze(1) * attention)


class Memories:
    """Profile, embedding and task memories. `feature_memory` switches the personalised
    theta_u initialisation (M_U); `task_memory` switches the personalised mem_layer weight
    (M_UI). The profile memory exists whenever either is on (it gives the attention)."""

    def __init__(self, n_k, profile_dim, embedding_shapes, task_dim, feature_memory, task_memory,
                 generator=None, device="cpu"):
        def normal(*shape, std=1.0):
            return torch.randn(*shape, generator=generator).mul_(std).to(device)

        self.feature_memory, self.task_memory = feature_memory, task_memory
        self.profile = normal(n_k, profile_dim)
        self.embedding = ({name: normal(n_k, *shape, std=0.05) for name, shape in embedding_shapes.items()}
                          if feature_memory else {})
        self.task = normal(n_k, task_dim, task_dim) if task_memory else None

    def attention(self, profiles):
        """p_u [B, D_u] -> a_u [B, K]: softmax over the cosine similarities to the K slots."""
        cosine = F.cosine_similarity(profiles.unsqueeze(1), self.profile.unsqueeze(0), dim=-1)
        return torch.softmax(cosine, dim=-1)

    def bias_term(self, attention):
        """a_u [B, K] -> {theta_u name: b_u [B, *shape]}."""
        return {name: torch.einsum("bk,k...->b...", attention, slots) for name, slots in self.embedding.items()}

    def task_weight(self, attention):
        """a_u [B, K] -> initial mem_layer weights [B, 2d, 2d]."""
        return torch.einsum("bk,kij->bij", attention, self.task)

    def write(self, attention, profiles, user_grads, mem_weights, alpha, beta, gamma):
        """Training-only writes for B users in order. attention [B, K], profiles [B, D_u],
        user_grads {theta_u name: g_u [B, *shape]}, mem_weights: adapted W_mem' [B, 2d, 2d]
        (per-user values as `weighted_user_sum` takes them)."""
        attention, profiles = attention.detach(), profiles.detach()
        self.profile = decayed_write(self.profile, alpha, attention, profiles)
        for name in self.embedding:
            self.embedding[name] = decayed_write(self.embedding[name], beta, attention, user_grads[name])
        if self.task_memory:
            self.task = decayed_write(self.task, gamma, attention, mem_weights)

    def state_dict(self):
        return {"profile": self.profile, "embedding": dict(self.embedding), "task": self.task}

    def load_state_dict(self, state):
        self.profile = state["profile"]
        self.embedding = dict(state["embedding"])
        self.task = state["task"]

    def to(self, device):
        self.load_state_dict({"profile": self.profile.to(device),
                              "embedding": {k: v.to(device) for k, v in self.embedding.items()},
                              "task": None if self.task is None else self.task.to(device)})
        return self
