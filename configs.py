"""Experiment settings. Edit this dict to change an experiment; `mamoRec.py` flags override it.

The first block holds the released MAMO keys with their released values; the second
block holds settings this implementation adds. Any default that departs from the released code
is listed, with its measured reason, in docs/fidelity.md.

The data protocol's settings (support_size ... item_cold_max_ratings) take their defaults from
data_prep/protocol.py; a prepared data folder is used only if it was prepared with exactly them.
"""
from data_prep.protocol import DEFAULT_PROTOCOL

config_settings = {
    # --- released keys (dongmanqing/Code-for-MAMO configs.py) ---
    "embedding_dim": 100,  # d: width of every field embedding and of e_u, e_i
    "n_layer": 2,  # Linear layers in the user and item embedding networks
    "n_k": 3,  # K: memory slots in every memory
    "alpha": 0.5,  # profile-memory write rate
    "beta": 0.05,  # embedding-memory (feature memory) write rate
    "gamma": 0.1,  # task-memory write rate
    "tao": 0.01,  # weight of the personalised bias term: theta_u = phi_u - tao * b_u
    "rho": 0.01,  # local (inner-loop) learning rate
    "lambda": 0.005,  # global (meta) learning rate (released: 0.05 with plain SGD; see docs/fidelity.md)
    "batch_size": 5,  # local-update mini-batch size (support ratings per step)
    "n_inner_loop": 3,  # local-update passes over the support set
    "n_epoch": 3,  # meta-training epochs
    "support_size": DEFAULT_PROTOCOL["support_size"],  # support ratings per user (first in time)
    "query_size": DEFAULT_PROTOCOL["query_size"],  # query ratings per user (last in time)
    "train_ratio": DEFAULT_PROTOCOL["train_ratio"],  # share of users used for meta-training (released: split_ratio)
    "random_state": DEFAULT_PROTOCOL["random_state"],  # seed of the train/test user split (data preparation)
    "activation": "leaky_relu",  # hidden activation: leaky_relu (slope 0.1) or relu
    # --- settings added by this implementation ---
    "time_split_ratio": DEFAULT_PROTOCOL["time_split_ratio"],  # split_time: this share of all ratings is earlier
    "item_cold_max_ratings": DEFAULT_PROTOCOL["item_cold_max_ratings"],  # an item is new iff at most this many
    "dataset": "movielens",  # movielens | movielens-100k | synthetic | synthetic-types | bookcrossing | synthetic-bookcrossing
    "data_dir": "data/processed/{dataset}",  # processed tasks (made by data_prep if missing)
    "raw_dir": "data/raw/{dataset}",  # raw files for data_prep
    "download": True,  # download missing raw MovieLens / Book-Crossing files (--no-download refuses)
    "run_dir": "runs/{dataset}/{timestamp}-seed{seed}",  # one new folder per run ({timestamp}: UTC start)
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "seed": 100,  # initialisation, user order and every other random choice in training
    "users_per_step": 32,  # training users per global step (and per vectorised batch)
    "meta_step_scaling": "sde",  # lambda is for 32 users/step; rule for others: sde | sqrt | linear | none (meta_step.py)
    "eval_batch_users": 32,  # test users evaluated together (evaluation writes nothing; 32 is fastest on CPU)
    "local_optimizer": "sgd",  # sgd (plain gradient descent) | adam (released code's choice)
    "meta_optimizer": "adam",  # optimiser of the global step: adam | sgd
    "grad_clip": 5.0,  # local-update gradient-norm clip over theta (None: no clipping)
    "head": "classification",  # classification (softmax over rating classes) | regression (MSE)
    "prediction": "expected",  # point prediction for MAE/RMSE: expected (probability-weighted) | argmax (released)
    "feature_memory": True,  # profile + embedding memory (personalised theta_u init)
    "task_memory": True,  # task memory cube (personalised mem_layer fast weight)
    # memory options: the defaults are the published method, any other value departs from it
    "attention_temperature": 1.0,  # T in the memory read a_u = softmax(cos(p_u, M_P) / T); > 0
    # task_memory_write: published: M_k <- (1 - gamma) M_k + gamma a_k W'_u (W'_u the adapted mem_layer weight)
    # | increment: M_k <- M_k + gamma a_k (W'_u - W_u), W_u the weight the user read
    "task_memory_write": "published",
    "task_memory_init": "normal",  # task slots start N(0, 1) (normal) | at phi's initial mem_layer weight (phi)
    # clip_query_grad: None | a norm. Each user's query gradient is clipped at this norm over all of the
    # adapted theta (theta_u, theta_i, theta_r: the set the local clip uses); the factor scales the user's
    # whole meta-gradient (theta and psi) and its M_U write. Released code: 5.
    "clip_query_grad": None,
    # freeze_mem_layer: keep phi's mem_layer weight at its initial value, not meta-learned (the no_memory_frozen
    # control; no effect with the task memory, which gives that weight instead)
    "freeze_mem_layer": False,
    "first_order": True,  # first-order MAML; False differentiates through the local update
    "ablation": True,  # also train the memory-free models no_memory and no_memory_frozen (--no-ablation)
    "engine": "auto",  # auto (batched when sgd + first order) | batched | reference (one user at a time)
    # compile: how the batched engine runs (same results either way): auto (cuda-graphs on CUDA, else none) |
    # none (eager) | cuda-graphs (each batch shape's step captured once as a CUDA graph and replayed; CUDA only)
    "compile": "auto",
}

#: Named sets of settings, applied over config_settings by `mamoRec.py --preset NAME` (flags still override).
#: best_departures: the three memory departures together, ahead of MAMO as published on MAE and RMSE by
#: more than the seed-to-seed spread on MovieLens-100K (docs/results.md; its task memory alone at
#: temperature 1, without personal reads, does as well): a temperature five times below the profiles'
#: critical one (~0.24) so the profile memory keeps users apart, and a task memory that starts at phi's
#: mem_layer weight and adds the users' local updates.
PRESETS = {
    "best_departures": {"attention_temperature": 0.05, "task_memory_write": "increment", "task_memory_init": "phi"},
}
