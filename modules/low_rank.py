"""Linear layers of B users kept as a shared base plus the low-rank history of their local updates.

With plain gradient descent a local step changes a linear layer's weight by -rho * kappa * dz^T x,
of rank at most the step's m rows. The batched engine keeps each user's layer as its initial
weight (shared, or an attention mixture of shared matrices) plus these factors: no per-user weight
matrix is ever formed, and the attention-weighted sums the memory writes need come from the
factors too. Shapes: B users, m or n rows, `out` x `in` weights, K attention weights per user.
"""
import torch


def outer_product_sum(weights, deltas, rows):
    """Attention-weighted sum of per-user products sum_b weights[b, k] * deltas_b^T rows_b.

    weights [B, K], deltas [B, r, out], rows [B, r, in] -> [K, out, in]. Takes the order with fewer
    multiply-adds: for rank r > K / (K - 1) form the B per-user products once ((r + K) * out * in
    per user), else weight the factors and contract over users and rows in one GEMM
    (K * r * out * in per user, no per-user matrix).
    """
    n_users, rank, n_out = deltas.shape
    n_slots, n_in = weights.shape[1], rows.shape[-1]
    if rank * (n_slots - 1) > n_slots:
        per_user = torch.bmm(deltas.transpose(1, 2), rows)
        return (weights.t() @ per_user.view(n_users, -1)).view(n_slots, n_out, n_in)
    weighted = deltas.unsqueeze(2) * weights.view(n_users, 1, n_slots, 1)  # [B, r, K, out]
    total = weighted.reshape(n_users * rank, n_slots * n_out).t() @ rows.reshape(n_users * rank, n_in)
    return total.view(n_slots, n_out, n_in)


class OuterProducts:
    """Per-user matrices deltas_b^T rows_b [B, out, in], kept factored.

    deltas [B, r, out], rows [B, r, in]. Only their attention-weighted sums are ever needed.
    """

    def __init__(self, deltas, rows):
        self.deltas, self.rows = deltas, rows

    def weighted_sum(self, weights):
        """Attention-weighted sum over users: weights [B, K] -> sum_b weights[b, k] * deltas_b^T rows_b [K, out, in]."""
        return outer_product_sum(weights, self.deltas, self.rows)


class LowRankLinear:
    """One linear layer of B users: W_b = base_b + sum_s D_s[b]^T X_s[b], with a dense bias_b.

    base [out, in] is shared by all users (phi), or with coef [B, J] base_b is the mixture
    sum_j coef[b, j] * base[j] of J shared matrices base [J, out, in], applied as one GEMM against
    the J stacked matrices and never formed per user (B per-user matrices would be read from
    memory at every step; the J shared ones stay in cache). bias [B, out]. Each local step appends
    its input rows X_s [B, m, in] and scaled output gradients D_s [B, m, out] to buffers of
    `capacity` rows: the update -rho * kappa * dz^T x is never materialised either.
    """

    def __init__(self, base, bias, capacity, coef=None):
        self.base, self.bias, self.coef = base, bias, coef
        n_users, (n_out, n_in) = bias.shape[0], base.shape[-2:]
        self.row_buffer = bias.new_empty(n_users, capacity, n_in)
        self.delta_buffer = bias.new_empty(n_users, capacity, n_out)
        self.rows = self.deltas = None

    def base_forward(self, x, columns=slice(None)):
        """Product of the input with the base weight, on the base's `columns` only.

        x [B, n, w] (w = the width of `columns`) -> x base_b[:, columns]^T: [B, n, out]. A column
        slice of the base is a strided view: no copy.
        """
        n_users, n, width = x.shape
        base = self.base[..., columns]
        if self.coef is not None:
            n_bases, n_out = base.shape[:2]
            per_base = (x.reshape(n_users * n, width) @ base.reshape(-1, width).t()).view(n_users, n, n_bases, n_out)
            return (per_base * self.coef.view(n_users, 1, n_bases, 1)).sum(2)
        return (x.reshape(n_users * n, width) @ base.t()).view(n_users, n, -1)

    def forward(self, x, base_out=None):
        """The layer's outputs: x [B, n, in] -> x W_b^T + bias_b [B, n, out]; base_out: base_forward(x), if known."""
        out = self.base_forward(x) if base_out is None else base_out
        if self.rows is not None:
            out = out + torch.bmm(torch.bmm(x, self.rows.transpose(1, 2)), self.deltas)
        return out + self.bias.unsqueeze(1)

    def input_grad(self, out_grad, columns=slice(None)):
        """Gradient of sum(out_grad * forward(x)) with respect to x[..., columns].

        out_grad [B, n, out] -> [B, n, w] (w = the width of `columns`).
        """
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
        """One local step theta <- theta + step_scale * grad, in place.

        grad_W = out_grad^T x and grad_bias = the sum of out_grad's rows; x [B, m, in],
        out_grad [B, m, out], step_scale [B] (-rho times the user's clip factor).
        """
        start = 0 if self.rows is None else self.rows.shape[1]
        end = start + x.shape[1]
        self.row_buffer[:, start:end] = x
        torch.mul(out_grad, step_scale.view(-1, 1, 1), out=self.delta_buffer[:, start:end])
        self.rows, self.deltas = self.row_buffer[:, :end], self.delta_buffer[:, :end]
        self.bias = self.bias + step_scale.view(-1, 1) * out_grad.sum(1)

    def update(self):
        """The weight change of the local steps so far (at least one), W_b - base_b: OuterProducts [B, out, in]."""
        return OuterProducts(self.deltas, self.rows)

    def weighted_sum(self, weights):
        """Attention-weighted sum over users, from the factors.

        weights [B, K] -> sum_b weights[b, k] * W_b [K, out, in].
        """
        if self.coef is not None:
            total = ((weights.t() @ self.coef) @ self.base.flatten(1)).view(-1, *self.base.shape[1:])
        else:
            total = weights.sum(0).view(-1, 1, 1) * self.base
        return total if self.rows is None else total + self.update().weighted_sum(weights)


def grad_sq_norm(x, out_grad):
    """Squared norm of one linear layer's per-user gradient, from m x m Gram matrices.

    x [B, m, in], out_grad [B, m, out] -> ||out_grad_b^T x_b||_F^2 + ||sum of out_grad_b's rows||^2: [B].
    """
    gram = torch.bmm(x, x.transpose(1, 2)) * torch.bmm(out_grad, out_grad.transpose(1, 2))
    return gram.sum((1, 2)) + out_grad.sum(1).pow(2).sum(1)
