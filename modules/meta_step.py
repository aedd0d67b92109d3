"""Settings of the global (meta) step as a function of the number of users per step.

configs.py states `lambda`, and the meta optimiser's other settings (Adam's betas and eps: torch's
defaults), for REFERENCE_USERS_PER_STEP = 32 users per step. `meta_step_scaling` says how they
change with kappa = users_per_step / 32:
- "none":   unchanged (with Adam, a small step size gives more steps of the same length per epoch);
- "sqrt":   lambda * sqrt(kappa);
- "linear": lambda * kappa;
- "sde":    the rule that keeps the optimiser's stochastic-differential-equation approximation the
            same (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms",
            NeurIPS 2022). Adam: lambda * sqrt(kappa), (1 - beta1) and (1 - beta2) times kappa,
            eps / sqrt(kappa). SGD: lambda * kappa.
At 32 users per step every rule returns the configured settings exactly.
"""

REFERENCE_USERS_PER_STEP = 32
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8
SCALINGS = ("none", "sqrt", "linear", "sde")
LR_POWERS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def meta_step_settings(optimizer: str, reference_lr: float, users_per_step: int, scaling: str) -> dict:
    """Keyword arguments of the meta optimiser ('adam' or 'sgd') at `users_per_step` users per
    step, given lambda = `reference_lr` at 32: {"lr"} for SGD, {"lr", "betas", "eps"} for Adam."""
    if scaling not in SCALINGS:
        raise ValueError(f"meta_step_scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    if users_per_step < 1:
        raise ValueError(f"users_per_step must be at least 1, got {users_per_step}")
    kappa = users_per_step / REFERENCE_USERS_PER_STEP
    power = (0.5 if optimizer == "adam" else 1.0) if scaling == "sde" else LR_POWERS[scaling]
    settings = {"lr": reference_lr * kappa ** power}
    if optimizer == "adam":
        betas, eps = ADAM_BETAS, ADAM_EPS
        if scaling == "sde":
            betas = tuple(1.0 - (1.0 - beta) * kappa for beta in ADAM_BETAS)
            eps = ADAM_EPS / kappa ** 0.5
            if betas[0] < 0.0:
                most = round(REFERENCE_USERS_PER_STEP / (1.0 - ADAM_BETAS[0]))
                raise ValueError(f"meta_step_scaling 'sde' with Adam allows at most {most} users per step "
                                 f"(beta1 must not become negative), got users_per_step = {users_per_step}")
        settings.update(betas=betas, eps=eps)
    return settings
