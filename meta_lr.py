"""The global learning rate lambda as a function of the number of users per global step.

`lambda` in configs.py is the rate tuned at LAMBDA_REFERENCE_USERS_PER_STEP users per step;
`lambda_scaling` says how it changes for other step sizes:
- "none":   the same lambda whatever the users per step (more, equally long steps per epoch for
            small steps);
- "sqrt":   lambda * sqrt(users_per_step / 32), the square-root rule for Adam (the noise of a mean
            over B users shrinks as 1/sqrt(B));
- "linear": lambda * users_per_step / 32, the linear rule for SGD (the same distance per epoch).
At 32 users per step every rule returns `lambda` itself.
"""

LAMBDA_REFERENCE_USERS_PER_STEP = 32
LAMBDA_SCALING_POWERS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def meta_learning_rate(reference_rate: float, users_per_step: int, scaling: str) -> float:
    """lambda at `users_per_step` users per step, given `reference_rate` at 32 users per step."""
    if scaling not in LAMBDA_SCALING_POWERS:
        raise ValueError(f"lambda_scaling must be one of {', '.join(LAMBDA_SCALING_POWERS)}, got {scaling!r}")
    if users_per_step < 1:
        raise ValueError(f"users_per_step must be at least 1, got {users_per_step}")
    ratio = users_per_step / LAMBDA_REFERENCE_USERS_PER_STEP
    return reference_rate * ratio ** LAMBDA_SCALING_POWERS[scaling]
