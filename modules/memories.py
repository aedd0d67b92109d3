"""MAMO's memories: buffers of a module, written without autograd history.

- profile memory M_P [K, D_u]: attention a_u = softmax_k(cos(p_u, M_P[k]) / T).
- embedding memory M_U: K slots shaped like theta_u; bias term b_u = sum_k a_u[k] M_U[k].
- task memory M_UI [K, out, in] (out x in: the mem_layer weight's shape): the mem_layer fast
  weight W_u = sum_k a_u[k] M_UI[k].

Writes for a batch of B users use the attention each user read at the batch start and apply the
users' writes in user order, computed in closed form; a batch of one user is exactly the
sequential algorithm. Rules (rate r = alpha, beta or gamma; v_b the value user b writes):
- decayed (every memory as published): M[k] <- r * a_b[k] * v_b + (1 - r) * M[k];
- increment (task memory option): M[k] <- M[k] + gamma * a_b[k] * (W'_b - W_b), the user's
  adapted mem_layer weight minus the weight it read.
"""
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

TASK_WRITES = ("published", "increment")


class PerUserValues(Protocol):
    """One value [*S] per user of a batch of B, of which attention-weighted sums can be taken."""

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """Attention-weighted sum over users: weights [B, K] -> sum_b weights[b, k] * v_b [K, *S]."""


class DenseUserValues:
    """Per-user values held as one tensor values [B, *S]."""

    def __init__(self, values):
        self.values = values

    def weighted_sum(self, weights):
        """Attention-weighted sum over users: weights [B, K] -> sum_b weights[b, k] * values[b] [K, *S]."""
        return torch.einsum("bk,b...->k...", weights, self.values.detach())


def decayed_write(memory, rate, attention, values):
    """B sequential writes M[k] <- rate * a_b[k] * v_b + (1 - rate) * M[k], in one step.

    memory [K, *S], attention [B, K], values: PerUserValues [B, *S] -> new memory [K, *S].
    """
    n_users = attention.shape[0]
    steps_after = torch.arange(n_users - 1, -1, -1, device=memory.device, dtype=memory.dtype)
    user_weights = rate * (1.0 - rate) ** steps_after
    return (1.0 - rate) ** n_users * memory + values.weighted_sum(user_weights.unsqueeze(1) * attention)


def buffer_name(theta_name):
    """Buffer name of a theta_u tensor's slots: user.layers.0.weight -> embedding_user_layers_0_weight."""
    return "embedding_" + theta_name.replace(".", "_")


class Memories(nn.Module):
    """Profile, embedding and task memories of K slots each.

    profile_dim: D_u; embedding_shapes: {theta_u name: shape}; task_shape: the mem_layer weight's
    (out, in). `feature_memory` switches the personalised theta_u start (M_U), `task_memory` the
    personalised mem_layer weight (M_UI); the profile memory exists whenever either is on (it gives
    the attention). temperature: T of the attention softmax; task_write: 'published' | 'increment';
    task_start: a weight [out, in] every task slot starts at, or None for N(0, 1) slots.
    """

    def __init__(self, n_k, profile_dim, embedding_shapes, task_shape, feature_memory, task_memory,
                 generator=None, temperature=1.0, task_write="published", task_start=None):
        super().__init__()

        def normal(*shape, std=1.0):
            return torch.randn(*shape, generator=generator).mul_(std)

        self.temperature, self.task_write = temperature, task_write
        self.register_buffer("profile", normal(n_k, profile_dim))
        self.embedding_names = list(embedding_shapes) if feature_memory else []
        for name in self.embedding_names:
            self.register_buffer(buffer_name(name), normal(n_k, *embedding_shapes[name], std=0.05))
        if not task_memory:
            task = None
        elif task_start is None:
            task = normal(n_k, *task_shape)
        else:
            task = task_start.detach().clone().expand(n_k, *task_shape).clone()
        self.register_buffer("task", task)

    @property
    def embedding(self):
        """The embedding-memory slots: {theta_u name: [K, *shape]} (empty without the feature memory)."""
        return {name: getattr(self, buffer_name(name)) for name in self.embedding_names}

    def attention(self, profiles):
        """The read's attention: p_u [B, D_u] -> a_u [B, K], softmax of the cosine similarities to the slots over T."""
        cosine = F.cosine_similarity(profiles.unsqueeze(1), self.profile.unsqueeze(0), dim=-1)
        return torch.softmax(cosine / self.temperature, dim=-1)

    def bias_term(self, attention):
        """The personalised bias terms: a_u [B, K] -> {theta_u name: b_u [B, *shape]}."""
        return {name: torch.einsum("bk,k...->b...", attention, slots) for name, slots in self.embedding.items()}

    def task_weight(self, attention):
        """The mem_layer weights the users read: a_u [B, K] -> [B, out, in]."""
        return torch.einsum("bk,kij->bij", attention, self.task)

    @torch.no_grad()
    def write(self, attention, profiles, user_grads, task_weights, task_updates, alpha, beta, gamma):
        """Training-only writes of B users, in user order (see the module docstring), in place:
        the buffers keep their storage (a captured CUDA graph reads them there).

        attention [B, K] and profiles [B, D_u] as read at the batch start; user_grads {theta_u
        name: g_u}, task_weights W'_u (the adapted mem_layer weights) and task_updates W'_u - W_u
        are PerUserValues; the task values may be None without the task memory.
        """
        attention = attention.detach()
        self.profile.copy_(decayed_write(self.profile, alpha, attention, DenseUserValues(profiles)))
        for name, slots in self.embedding.items():
            slots.copy_(decayed_write(slots, beta, attention, user_grads[name]))
        if self.task is None:
            return
        if self.task_write == "increment":
            self.task.copy_(self.task + gamma * task_updates.weighted_sum(attention))
        else:
            self.task.copy_(decayed_write(self.task, gamma, attention, task_weights))
