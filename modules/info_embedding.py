"""User and item embedding networks (theta_u, theta_i): stacks of Linear layers, each followed
by the activation."""
import torch
from torch import nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.1


def activate(x, activation):
    """The hidden activation: leaky_relu (slope 0.1) or relu."""
    if activation == "leaky_relu":
        return F.leaky_relu(x, LEAKY_SLOPE)
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"activation must be 'leaky_relu' or 'relu', got {activation!r}")


def activation_grad(grad, x, activation):
    """Backpropagate grad through `activate` at the pre-activation x: grad times its slope there
    (1 above zero, the negative slope at and below zero), in one fused operation."""
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(grad, x, LEAKY_SLOPE, False)
    return torch.ops.aten.threshold_backward(grad, x, 0.0)


class LinearStack(nn.Module):
    """Linear layers `dims[0] -> dims[1] -> ...`; layer j is followed by the activation iff
    `activated[j]`. Parameter names: layers.<j>.weight [out, in], layers.<j>.bias [out]."""

    def __init__(self, dims, activated, activation):
        super().__init__()
        if len(activated) != len(dims) - 1:
            raise ValueError("need one activation flag per layer")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activated = list(activated)
        self.activation = activation

    def forward(self, x):
        """The stack's outputs: x [..., dims[0]] -> [..., dims[-1]]."""
        for layer, activated in zip(self.layers, self.activated):
            x = layer(x)
            if activated:
                x = activate(x, self.activation)
        return x


def embedding_dims(in_dim, out_dim, n_layer):
    """Widths of an embedding network: in -> in/2 (n_layer - 1 times) -> out (user, 2 layers: 3d -> 3d/2 -> d)."""
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    return [in_dim] + [in_dim // 2] * (n_layer - 1) + [out_dim]


class EmbeddingNetwork(LinearStack):
    """An embedding network, every layer activated: p [..., in_dim] -> e [..., d] (user: theta_u, item: theta_i)."""

    def __init__(self, in_dim, embedding_dim, n_layer, activation):
        dims = embedding_dims(in_dim, embedding_dim, n_layer)
        super().__init__(dims, [True] * (len(dims) - 1), activation)
