"""Input loading: the shared (global, never adapted per user) feature embeddings.

User profile p_u: one d-wide embedding per categorical user field, concatenated -> [..., F_u * d].
Item profile p_i: an embedding per categorical item field and sigmoid(Linear(multi-hot, d, no
bias)) per multi-hot field, concatenated in manifest order -> [..., F_i * d].
"""
import torch
from torch import nn
import torch.nn.functional as F


class MultiHotLinear(nn.Linear):
    """A multi-hot field's embedding sigmoid(Linear(multi_hot, d, bias=False)).

    It is fed with padded active indices instead of a dense multi-hot row: index `in_features` is
    padding and contributes nothing.
    """

    def __init__(self, n_values, embedding_dim):
        super().__init__(n_values, embedding_dim, bias=False)

    def forward(self, active_indices):
        """Embedding of active indices: active_indices [..., L] (padded with n_values) -> [..., d]."""
        table = torch.cat([self.weight.t(), self.weight.new_zeros(1, self.out_features)])
        return torch.sigmoid(F.embedding(active_indices, table).sum(-2))


class InputLoading(nn.Module):
    """Shared embeddings of the dataset's feature schema (`manifest["features"]`)."""

    def __init__(self, features, embedding_dim):
        super().__init__()
        for field in features["user"]:
            if field["kind"] != "categorical":
                raise ValueError(f"user field {field['name']!r}: only categorical user fields are supported")
        self.user_fields = [field["name"] for field in features["user"]]
        self.item_fields = [field["name"] for field in features["item"]]
        self.user_embeddings = nn.ModuleList(
            nn.Embedding(field["size"], embedding_dim) for field in features["user"])
        self.item_embeddings = nn.ModuleList(
            nn.Embedding(field["size"], embedding_dim) if field["kind"] == "categorical"
            else MultiHotLinear(field["size"], embedding_dim)
            for field in features["item"])
        self.user_dim = len(self.user_fields) * embedding_dim
        self.item_dim = len(self.item_fields) * embedding_dim

    def user_profile(self, user_codes):
        """User profiles: user_codes [..., F_u] (long) -> p_u [..., F_u * d]."""
        return torch.cat([emb(user_codes[..., j]) for j, emb in enumerate(self.user_embeddings)], -1)

    def item_profile(self, item_features):
        """Item profiles: item_features {field: [...] codes or [..., L] padded indices} -> p_i [..., F_i * d]."""
        return torch.cat([emb(item_features[name])
                          for name, emb in zip(self.item_fields, self.item_embeddings)], -1)
