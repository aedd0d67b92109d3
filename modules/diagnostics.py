"""How personal MAMO's memory reads are: statistics of a set of users' reads, from the model's
public state (memory buffers, `read`, phi). Reading them changes nothing and draws no random number.

For B users with attention a [B, K] (K slots):
- attention_max_mean: mean over users of the largest attention weight (1/K: uniform attention);
- attention_spread: the largest, over slots, of the standard deviation over users (population
  form, divided by B) of that slot's attention weight; 0 when every user reads the same mixture;
- slot_usage: mean attention per slot [K];
- profile_slot_spread: largest distance between two profile-memory slots / mean slot norm;
- task_slot_spread: the same on the task memory's slots (each flattened to one vector);
- task_read_norm: mean over users of the Frobenius norm of the mem_layer weight read from the task
  memory; phi_mem_weight_norm: the Frobenius norm of phi's own mem_layer weight (with the task
  memory on it is not meta-learned, so it keeps its initial value: the scale a mem_layer weight
  starts at); task_read_ratio: their ratio;
- bias_term_ratio: mean over users of |tao * b_u| / |phi_u|, the size of the personalised term of
  theta_u's start relative to phi_u (norms over all of theta_u's tensors together).
Fields of a switched-off memory are None.

The attention has collapsed when attention_spread < COLLAPSE_SPREAD: every user then reads (almost)
the same memories. docs/results.md explains why the published profile-memory write does that.
"""
from dataclasses import asdict, dataclass

import torch

from models import MEM_WEIGHT

COLLAPSE_SPREAD = 1e-3  # attention_spread below this: the attention no longer tells users apart
COLLAPSE_DOCS = "docs/results.md#why-the-profile-memory-collapses"


@dataclass
class MemoryDiagnostics:
    """Statistics of B users' memory reads (see the module docstring); plain floats."""
    attention_max_mean: float
    attention_spread: float
    slot_usage: list[float]  # [K]
    profile_slot_spread: float
    task_slot_spread: float | None
    task_read_norm: float | None
    phi_mem_weight_norm: float | None
    task_read_ratio: float | None
    bias_term_ratio: float | None


def diagnostic_columns(n_slots):
    """Column names of MemoryDiagnostics in a flat table of K slots (slot_usage_1 .. slot_usage_K)."""
    names = []
    for name in MemoryDiagnostics.__dataclass_fields__:
        names += [f"{name}_{k + 1}" for k in range(n_slots)] if name == "slot_usage" else [name]
    return names


def diagnostic_values(record, n_slots):
    """A diagnostics dict (asdict of MemoryDiagnostics) or None -> the values of diagnostic_columns(K),
    "" for a missing record or a switched-off memory's field."""
    if record is None:
        return [""] * len(diagnostic_columns(n_slots))
    values = []
    for name in MemoryDiagnostics.__dataclass_fields__:
        values += record[name] if name == "slot_usage" else [record[name]]
    return ["" if value is None else value for value in values]


def slot_spread(slots):
    """Largest distance between two slots / mean slot norm: slots [K, ...] -> float."""
    flat = slots.flatten(1).double()
    return (torch.cdist(flat, flat).max() / flat.norm(dim=1).mean()).item()


def mixture_norms(attention, slots):
    """Norms of the attention mixtures sum_k a_b[k] slots[k], without forming them.

    attention [B, K], slots: [K, ...] tensors whose flattened concatenation is each slot -> [B]
    (from the slots' Gram matrix: |sum_k a_k s_k|^2 = a^T G a, in float64).
    """
    gram = sum(s.flatten(1).double() @ s.flatten(1).double().t() for s in slots)
    a = attention.double()
    return torch.einsum("bk,kl,bl->b", a, gram, a).clamp(min=0).sqrt()


@torch.no_grad()
def memory_diagnostics(model, profiles):
    """MemoryDiagnostics of the reads of users with profiles p_u [B, D_u] (B >= 1); None without memories."""
    if model.memories is None:
        return None
    memories, phi = model.memories, model.phi()
    attention = model.read(profiles)
    task = dict(task_slot_spread=None, task_read_norm=None, phi_mem_weight_norm=None, task_read_ratio=None)
    if memories.task is not None:
        read_norm = mixture_norms(attention, [memories.task]).mean().item()
        phi_norm = phi[MEM_WEIGHT].norm().item()
        task = dict(task_slot_spread=slot_spread(memories.task), task_read_norm=read_norm,
                    phi_mem_weight_norm=phi_norm, task_read_ratio=read_norm / phi_norm)
    bias_term_ratio = None
    if memories.embedding:
        phi_user_norm = sum(phi[name].double().pow(2).sum() for name in memories.embedding).sqrt()
        bias_norms = model.config["tao"] * mixture_norms(attention, list(memories.embedding.values()))
        bias_term_ratio = (bias_norms / phi_user_norm).mean().item()
    return MemoryDiagnostics(
        attention_max_mean=attention.max(1).values.double().mean().item(),
        attention_spread=attention.double().std(0, correction=0).max().item(),
        slot_usage=attention.double().mean(0).tolist(),
        profile_slot_spread=slot_spread(memories.profile),
        bias_term_ratio=bias_term_ratio,
        **task,
    )


def is_collapsed(record):
    """Whether a diagnostics dict shows collapsed attention (attention_spread < COLLAPSE_SPREAD)."""
    return record["attention_spread"] < COLLAPSE_SPREAD


def collapse_warning(method, epoch, record, temperature):
    """The one-line warning printed when a model's attention has collapsed."""
    return (f"warning: {method} epoch {epoch}: the memory attention has collapsed (its spread over the test "
            f"users is {record['attention_spread']:.1e}, below {COLLAPSE_SPREAD:g}): every user reads the same "
            f"memories, so they personalise nothing. Cause: the profile-memory write pulls every slot to the same "
            f"vector whenever attention_temperature ({temperature:g}) is above the profiles' critical temperature "
            f"(about 0.2-0.3 on MovieLens); see {COLLAPSE_DOCS}")


def as_record(diagnostics):
    """A MemoryDiagnostics (or None) as the plain dict metrics.json and checkpoints keep."""
    return None if diagnostics is None else asdict(diagnostics)


@torch.no_grad()
def critical_temperature(profiles):
    """The attention temperature below which the profile memory can keep distinct slots: rho_max(J).

    With every slot at E[p]/K (the collapsed state) a small difference between two slots grows or
    shrinks under the write by (1 - alpha) I + (alpha / T) J, J = E[p p^T / |p|] (I - P_mu) / |mu|
    (mu = E[p], P_mu the projection on mu); so the collapse is stable iff rho_max(J) < T, whatever
    alpha (docs/results.md). profiles p [N, D_u] -> rho_max(J), from the symmetric matrix
    (I - P_mu) E[p p^T / |p|] (I - P_mu) / |mu|, which has J's eigenvalues.
    """
    p = profiles.double()
    mu = p.mean(0)
    second = (p / p.norm(dim=1, keepdim=True)).t() @ p / p.shape[0]  # E[p p^T / |p|]
    unit = mu / mu.norm()
    off_mu = torch.eye(p.shape[1], dtype=p.dtype) - torch.outer(unit, unit)
    return torch.linalg.eigvalsh(off_mu @ second @ off_mu / mu.norm()).max().item()
