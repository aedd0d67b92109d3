"""The rating model theta_r: [e_u; e_i] -> mem_layer (no activation; its weight is the
personal fast weight from the task memory) -> Linear(2d, d) -> act -> Linear(d, n_y) logits."""
import torch

from modules.info_embedding import LinearStack

MEM_LAYER = "layers.0"


class RecModel(LinearStack):
    """The rating model theta_r: e_u [..., d], e_i [..., d] -> logits [..., n_y] (n_y classes, or 1 for regression)."""

    def __init__(self, embedding_dim, n_y, activation):
        d = embedding_dim
        super().__init__([2 * d, 2 * d, d, n_y], [False, True, False], activation)

    def forward(self, e_u, e_i):
        """Logits of user-item pairs: e_u [..., 1, d] (or [..., n, d]), e_i [..., n, d] -> [..., n, n_y]."""
        return super().forward(torch.cat([e_u.expand_as(e_i), e_i], -1))
