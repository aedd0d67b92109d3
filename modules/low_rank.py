"""Linear layers of B users during a local update by plain gradient descent, in three forms.

A local step changes a linear layer's weight by step_scale * dz^T x (dz: the gradient at the
layer's outputs, x: its inputs, m rows) and its bias by step_scale * (the sum of dz's rows), a
change of rank at most m. Each form keeps what is cheapest for its layer:
- `LowRankLinear`: a weight shared by all users plus the factors (x, step_scale * dz) of every
  step; no per-user matrix is formed. For layers that start at phi.
- `FixedInputLinear`: a layer whose inputs do not change during the update (the first layer of an
  embedding network reads the profiles): the products of the inputs with each other (a Gram
  matrix) and the initial outputs are computed once, and the steps' factors are summed per input
  row, so a step costs one small product whatever the number of steps.
- `DenseLinear`: one weight per user, changed in place. For layers that start at a per-user
  mixture of shared matrices (the memories' reads): the mixture is formed once, and the memory
  writes need the adapted weights, which are then at hand.
The bias changes are never stored apart: a bias update is the weight update of an input column
that is always 1, so the products with the inputs add 1 (`ones_gram`).
Shapes: B users, m or n rows, `out` x `in` weights, J mixture matrices, K attention weights.
"""
import torch


def ones_gram(one, x, y):
    """x y^T + 1: products of the rows of x [B, m, in] and y [B, r, in], each with a 1 appended -> [B, m, r].

    one: a 0-dimensional tensor holding 1, made once per layer (not one per call).
    """
    return torch.baddbmm(one, x, y.transpose(1, 2))


def add_grad_sq_norm(total, gram, out_grad):
    """total + the squared norm of one layer's per-user gradient (weight and bias): [B].

    The weight gradient is out_grad_b^T x_b; gram = x x^T + 1 [B, m, m] and out_grad [B, m, out]:
    ||out_grad^T x||^2 + ||sum of out_grad's rows||^2 = sum((x x^T + 1) * (out_grad out_grad^T)).
    """
    n_users = out_grad.shape[0]
    out_gram = torch.bmm(out_grad, out_grad.transpose(1, 2))
    return torch.baddbmm(total.view(n_users, 1, 1), gram.reshape(n_users, 1, -1),
                         out_gram.view(n_users, -1, 1)).view(n_users)


def mixture_forward(x, bases, coef):
    """x [B, n, in] times the per-user mixtures sum_j coef[b, j] bases[j] ([J, out, in], coef [B, J])
    -> [B, n, out]: one product with the J stacked matrices, no per-user matrix."""
    n_users, n, width = x.shape
    n_bases, n_out = bases.shape[:2]
    per_base = (x.reshape(n_users * n, width) @ bases.reshape(-1, width).t()).view(n_users, n, n_bases, n_out)
    return (per_base * coef.view(n_users, 1, n_bases, 1)).sum(2)


def mixture_input_grad(out_grad, bases, coef):
    """out_grad [B, n, out] times the per-user mixtures of `mixture_forward` -> [B, n, in]."""
    n_users, n, _ = out_grad.shape
    mixed = out_grad.unsqueeze(2) * coef.view(n_users, 1, -1, 1)
    return (mixed.reshape(n_users * n, -1) @ bases.reshape(-1, bases.shape[-1])).view(n_users, n, -1)


def mixtures(coef, bases, out):
    """The per-user mixtures sum_j coef[b, j] bases[j], written to out: coef [B, J], bases [J, S],
    out [B, S] -> out. One scaled addition per matrix: with so few matrices a matrix product
    (coef @ bases) runs several times slower (measured: 530 vs 200 us at B = 32, J = 3, S = 40,000)."""
    torch.mul(coef[:, :1], bases[0], out=out)
    for j in range(1, bases.shape[0]):
        out.addcmul_(coef[:, j:j + 1], bases[j])
    return out


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
    """One linear layer of B users: W_b = base + sum_s D_s[b]^T X_s[b], bias_b = bias + sum_s (D_s[b]'s rows).

    base [out, in] and bias [out] are shared by all users. Each local step appends its input rows
    X_s [B, m, in] and scaled output gradients D_s [B, m, out] to buffers of `capacity` rows.
    """

    def __init__(self, base, bias, n_users, capacity):
        self.base, self.bias, self.one = base, bias, base.new_ones(())
        n_out, n_in = base.shape
        self.row_buffer = base.new_empty(n_users, capacity, n_in)
        self.delta_buffer = base.new_empty(n_users, capacity, n_out)
        self.rows = self.deltas = None

    def base_forward(self, x, columns=slice(None), bias=True):
        """Product of the input with the shared weight's `columns` (plus the shared bias if `bias`).

        x [B, n, w] (w = the width of `columns`) -> [B, n, out]. A column slice is a view: no copy.
        """
        n_users, n, width = x.shape
        base = self.base[:, columns]
        flat = x.reshape(n_users * n, width)
        out = torch.addmm(self.bias, flat, base.t()) if bias else flat @ base.t()
        return out.view(n_users, n, -1)

    def forward(self, x, base_out=None):
        """The layer's outputs: x [B, n, in] -> x W_b^T + bias_b [B, n, out]; base_out: base_forward(x),
        if known (a fresh tensor: it is added to in place)."""
        out = self.base_forward(x) if base_out is None else base_out
        if self.rows is None:
            return out
        return out.baddbmm_(ones_gram(self.one, x, self.rows), self.deltas)

    def forward_pair(self, shared, rows, x):
        """Outputs for the input rows [shared; rows_r]: shared [B, 1, a] is the same for every row,
        rows [B, n, b], x [B, n, a + b] their concatenation -> [B, n, out]."""
        split = shared.shape[-1]
        shared_out = self.base_forward(shared, slice(0, split), bias=False)
        return self.forward(x, self.base_forward(rows, slice(split, None)) + shared_out)

    def input_grad(self, out_grad, columns=slice(None)):
        """Gradient of sum(out_grad * forward(x)) with respect to x[..., columns].

        out_grad [B, n, out] -> [B, n, w] (w = the width of `columns`).
        """
        n_users, n, n_out = out_grad.shape
        grad_in = (out_grad.reshape(n_users * n, n_out) @ self.base[:, columns]).view(n_users, n, -1)
        if self.rows is None:
            return grad_in
        return grad_in.baddbmm_(torch.bmm(out_grad, self.deltas.transpose(1, 2)), self.rows[..., columns])

    def add_grad_sq_norm(self, total, x, out_grad):
        """total [B] + the squared norm of the gradient out_grad^T x (and its bias part) [B]."""
        return add_grad_sq_norm(total, ones_gram(self.one, x, x), out_grad)

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


class FixedInputLinear:
    """One linear layer of B users whose N input rows never change during the local update.

    inputs [B, N, in]: every row the layer will see; the local steps read the first S of them
    (`n_slots`), the query any. base: a shared weight [out, in], or with coef [B, J] the per-user mixtures
    sum_j coef[b, j] base[j] of J matrices base [J, out, in]; bias [B, out]. A step on rows r adds
    its scaled output gradients to deltas[:, r] [B, S, out], so that W_b = base_b + deltas_b^T
    inputs_b[:S] and bias_b = bias + (the sum of deltas_b's rows).
    """

    def __init__(self, inputs, n_slots, base, bias, coef=None):
        self.inputs, self.base, self.coef = inputs, base, coef
        n_users, n, n_in = inputs.shape
        if coef is None:
            initial = inputs.reshape(n_users * n, n_in) @ base.t()
            self.initial_out = initial.view(n_users, n, -1) + bias.unsqueeze(1)
        else:
            self.initial_out = mixture_forward(inputs, base, coef) + bias.unsqueeze(1)
        self.slot_inputs = inputs[:, :n_slots]
        self.gram = ones_gram(inputs.new_ones(()), inputs, inputs)  # [B, N, N]
        self.deltas = inputs.new_zeros(n_users, n_slots, self.initial_out.shape[-1])

    def forward(self, rows):
        """The layer's outputs for input rows `rows` (a slice) -> [B, n, out]."""
        return torch.baddbmm(self.initial_out[:, rows], self.gram[:, rows, :self.deltas.shape[1]], self.deltas)

    def input_grad(self, out_grad):
        """Gradient of sum(out_grad * outputs) with respect to the inputs: out_grad [B, n, out] -> [B, n, in]."""
        if self.coef is None:
            n_users, n, n_out = out_grad.shape
            grad_in = (out_grad.reshape(n_users * n, n_out) @ self.base).view(n_users, n, -1)
        else:
            grad_in = mixture_input_grad(out_grad, self.base, self.coef)
        return grad_in.baddbmm_(torch.bmm(out_grad, self.deltas.transpose(1, 2)), self.slot_inputs)

    def add_grad_sq_norm(self, total, rows, out_grad):
        """total [B] + the squared norm of the gradient at input rows `rows` (a slice) [B]."""
        return add_grad_sq_norm(total, self.gram[:, rows, rows], out_grad)

    def step(self, rows, out_grad, step_scale):
        """One local step on input rows `rows` (a slice within the first S), in place; out_grad
        [B, m, out], step_scale [B]."""
        self.deltas[:, rows].addcmul_(out_grad, step_scale.view(-1, 1, 1))


class DenseLinear:
    """One linear layer of B users with a weight per user, started at per-user mixtures.

    bases [J, out, in], coef [B, J]: W_b = sum_j coef[b, j] bases[j], changed in place by each
    step; bias [B, out]. storage: a tensor of B * out * in elements to hold the weights (reused
    from call to call, a fresh one of several MB costs its page faults every time), or None.
    """

    def __init__(self, bases, coef, bias, storage=None):
        self.bases, self.coef = bases, coef
        n_users = coef.shape[0]
        flat = storage.view(n_users, -1) if storage is not None else bases.new_empty(n_users, bases[0].numel())
        self.weight = mixtures(coef, bases.flatten(1), flat).view(n_users, *bases.shape[1:])
        self.bias, self.one = bias.clone(), bases.new_ones(())

    def forward(self, x):
        """x [B, n, in] -> x W_b^T + bias_b [B, n, out]."""
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def forward_pair(self, shared, rows, x):
        """Outputs for the input rows [shared; rows_r]: shared [B, 1, a] is the same for every row,
        rows [B, n, b] (x, their concatenation, is not needed) -> [B, n, out]."""
        split = shared.shape[-1]
        shared_out = torch.baddbmm(self.bias.unsqueeze(1), shared, self.weight[..., :split].transpose(1, 2))
        return torch.baddbmm(shared_out, rows, self.weight[..., split:].transpose(1, 2))

    def input_grad(self, out_grad, columns=slice(None)):
        """Gradient of sum(out_grad * forward(x)) with respect to x[..., columns]: [B, n, out] -> [B, n, w]."""
        return torch.bmm(out_grad, self.weight[..., columns])

    def add_grad_sq_norm(self, total, x, out_grad):
        """total [B] + the squared norm of the gradient out_grad^T x (and its bias part) [B]."""
        return add_grad_sq_norm(total, ones_gram(self.one, x, x), out_grad)

    def step(self, x, out_grad, step_scale):
        """One local step W_b += step_scale_b out_grad_b^T x_b, bias_b += step_scale_b (the sum of
        out_grad_b's rows), in place; x [B, m, in], out_grad [B, m, out], step_scale [B]."""
        scaled = out_grad * step_scale.view(-1, 1, 1)
        self.weight.baddbmm_(scaled.transpose(1, 2), x)
        self.bias.add_(scaled.sum(1))

    def weighted_sum(self, weights):
        """Attention-weighted sum over users of the current weights: weights [B, K] -> [K, out, in]."""
        return (weights.t() @ self.weight.flatten(1)).view(-1, *self.weight.shape[1:])

    def update(self):
        """The weight change of the local steps, W_b minus its starting mixture (PerUserValues)."""
        return WeightChange(self)


class WeightChange:
    """A DenseLinear's weight change W_b - sum_j coef[b, j] bases[j], never formed per user."""

    def __init__(self, layer):
        self.layer = layer

    def weighted_sum(self, weights):
        """Attention-weighted sum over users: weights [B, K] -> [K, out, in]."""
        layer = self.layer
        start = ((weights.t() @ layer.coef) @ layer.bases.flatten(1)).view(-1, *layer.bases.shape[1:])
        return layer.weighted_sum(weights) - start
