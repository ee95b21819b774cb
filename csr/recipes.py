"""Named training recipes (`--recipe`): changes to the model and training configs chosen on validation splits
of the training rows (README "Results"), adapting to measured properties of those rows, never to a data set's
name."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from csr.io import CSRError
from csr.train import TrainConfig

# Named recipes, applied on top of the flags; "paper" (the default) changes nothing. A recipe adapts to two
# measured properties of the training rows, never to a data set's name (choices made on validation splits of the
# training rows, README "Results"):
# - non-negative features (post-ReLU CNN embeddings) share a large common mean, which leaves most units dead with
#   b_pre = 0: centre with the geometric median, untie the decoder (unit-norm rows, parallel gradient
#   removed), reconstruction loss normalised by Var(x), self-contrastive term;
# - signed features (sentence embeddings) lost accuracy and cluster quality with those changes and with the
#   self-contrastive term: keep the paper's centring and tied decoder, no contrastive term;
# - non-negative rows also get dead units resampled onto badly reconstructed inputs (signed rows barely have any);
# - both: the default hidden size 4·d is capped
#   at one unit per ROWS_PER_UNIT training rows (a 1.6k-text corpus with 1536 units gets codes that do not
#   generalise). "+labels" uses same-class positives with gamma = 1 (0.1 in the paper).
RESAMPLE = dict(resample_every=14, resample_until=0.9)
NONNEG = (dict(tied=False), dict(bpre_init="geometric_median", recon_loss="nmse", cl="self", **RESAMPLE))
SIGNED = ({}, dict(cl="none"))  # no resampling: ~0 units die on text, and with a tied decoder it can diverge
RECIPES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "paper": {"nonnegative": ({}, {}), "signed": ({}, {})},
    "recommended": {"nonnegative": NONNEG, "signed": SIGNED},
    "recommended+labels": {"nonnegative": (NONNEG[0], {**NONNEG[1], "cl": "label", "cl_coef": 1.0}),
                           "signed": (SIGNED[0], {**SIGNED[1], "cl": "label", "cl_coef": 1.0})},
}
ROWS_PER_UNIT = 4
# "adaptive": the recommended branches, with the encoder started from the data or the principal directions (below) and
# sized from the rows AND k: each unit should fire for about FIRES_PER_UNIT training rows (rows·k / hidden; signed rows
# want fewer, busier units: their codes cluster better and fewer die), and an epoch should hold at least
# STEPS_PER_EPOCH optimiser steps (batch a power of two in [MIN_BATCH, the flag]; at batch 4096 a 3k-row set
# trained 10 steps in all).
# Signed rows are also centred on their mean (as PCA is): +1.2 / +1.3 points at k = 16 / 32 on R8's folds.
# Non-negative rows stop resampling at half of the steps (recommended: 90 %): units moved late have no time to settle
# and die again once it stops. Folds of fmnist30k, k = 2 / 8, mean of 3 seeds: dead 32 / 13 % -> 15 / < 10 %, top-1
# 75.24 / 80.81 -> 75.40 / 81.40; fmnist15k 74.40 / 80.34 -> 74.22 / 79.87 (seed-to-seed spread there: 2.8 points).
ADAPT = {"nonnegative": {"resample_until": 0.5}, "signed": {"bpre_init": "mean"}}
# The start follows the code's density: a code sparser than 1 unit in DATA_INIT_UNITS_PER_K·k starts from training
# rows (`--encoder-init data`: each unit wins for the inputs near its row, a dictionary), a denser one from the
# ± principal directions (`pca`: a k-term principal code, as PCA-k). With every unit a principal direction, the
# low-variance ones never win a top-k: 82 / 76 % dead at k = 2 / 8 on fmnist30k's folds without resampling, 41 / 19 %
# with it; from data 31 / 13 % and at most 7 % from k = 16 on, top-1 +3.1 / -0.2 / +0.2 / +1.2 / +1.0 at
# k = 2 / 8 / 16 / 32 / 64, fmnist15k +3.3 / +2.5 / +1.3 / +1.0 / +0.5. Only fmnist3k at k = 32 / 64 (675 units: 1 in
# 21 and 1 in 11) lost from data (-1.4 / -1.5); any threshold from 21 to 42 units per k splits the panel the same way.
# Signed rows (at most max(48, 2k) units) are always dense at k >= 2 and keep the principal start.
DATA_INIT_UNITS_PER_K = 32
RECIPES["adaptive"] = {kind: (m, {**t, **ADAPT[kind]}) for kind, (m, t) in RECIPES["recommended"].items()}
RECIPES["adaptive+labels"] = {kind: (m, {**t, **ADAPT[kind]}) for kind, (m, t) in RECIPES["recommended+labels"].items()}
FIRES_PER_UNIT = {"nonnegative": 64, "signed": 256}
# Signed rows: at most SIGNED_UNITS units unless 2·k is more (from k = 24 on: k pairs of ± principal directions, so
# the code starts as PCA-k and training refines it). The many-units regime only pays at small k (a code of 2 out of
# tens of units is close to a cluster id, far better than 2 principal coordinates); from k = 16 on fewer units
# track PCA: BBC / R8 folds, k = 16 / 32 / 64, top-1 95.26 / 95.13 / 94.88 and 95.19 / 95.32 / 95.50 with the cap
# against 93.70 / 94.32 / 94.88 and 93.86 / 95.19 / 94.77 without (20NG, not used to choose it: -0.8 from PCA at
# k = 32 instead of -1.15, V-measure up 1-4 points at every k).
SIGNED_UNITS = 48
STEPS_PER_EPOCH = 16
MIN_BATCH = 256


def adaptive_sizes(rows: int, k: int, hidden: int, batch: int, fires: int,
                   most: int | None = None) -> tuple[int, int]:
    """(hidden size, batch size) of the adaptive recipe for `rows` training rows at k (`hidden`, `batch`: the
    flags' values, never exceeded; `fires`: training rows per unit; `most`: units at most unless 2·k is more)."""
    units = rows * k // fires if most is None else min(rows * k // fires, most)
    units = min(hidden, rows // ROWS_PER_UNIT, max(units, 2 * k))
    b = batch
    while b > MIN_BATCH and rows // b < STEPS_PER_EPOCH:
        b //= 2
    return max(units, k), b


def is_nonnegative(x: np.ndarray, sample: int = 10000, seed: int = 0) -> bool:
    """Whether the rows are non-negative features (checked on a fixed sample of rows: memmaps stay cheap)."""
    n = len(x)
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    return bool(np.min(np.asarray(x[rows])) >= 0)


def apply_recipe(name: str, model_cfg: Any, train_cfg: TrainConfig, x: np.ndarray | None = None,
                 hidden_fixed: bool = False) -> tuple[Any, TrainConfig]:
    """(model config, train config) with recipe `name` applied for training rows `x` (None: non-negative rows,
    no cap). An explicit --hidden-size (`hidden_fixed`) is kept."""
    if name not in RECIPES:
        raise CSRError(f"--recipe must be one of {list(RECIPES)}, got {name!r}")
    kind = "nonnegative" if x is None or is_nonnegative(x) else "signed"
    mchange, tchange = RECIPES[name][kind]
    model_cfg, train_cfg = replace(model_cfg, **mchange), replace(train_cfg, **tchange)
    if name.startswith("adaptive") and x is not None:
        hidden, batch = adaptive_sizes(len(x), model_cfg.topk, model_cfg.hidden_size, train_cfg.batch_size,
                                       FIRES_PER_UNIT[kind], SIGNED_UNITS if kind == "signed" else None)
        train_cfg = replace(train_cfg, batch_size=batch)
        if not hidden_fixed:
            model_cfg = replace(model_cfg, hidden_size=hidden)
        sparse = model_cfg.hidden_size > DATA_INIT_UNITS_PER_K * model_cfg.topk
        train_cfg = replace(train_cfg, encoder_init="data" if sparse else "pca")
    elif name != "paper" and x is not None and not hidden_fixed:
        cap = max(len(x) // ROWS_PER_UNIT, 4 * model_cfg.topk)
        if cap < model_cfg.hidden_size:
            model_cfg = replace(model_cfg, hidden_size=cap)
    return model_cfg, train_cfg
