"""Named training recipes (`--recipe`): changes to the model and training configs chosen on validation splits
of the training rows (bench/recipe_val.py; choices and their measurements in docs/decisions.md), adapting to
measured properties of those rows, never to a data set's name.

- `paper` (the default): the paper's recipe, unchanged.
- `recommended`: the best frozen recipe without labels; `recommended+labels` its twin with same-class positives.
- `recommended-v1`, `recommended-v1+labels`: the earlier recommended recipes, kept for comparison.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from csr.io import CSRError, warn
from csr.values import parse_bool, parse_fraction

if TYPE_CHECKING:  # the CLI imports the names below before torch is loaded
    from csr.train import TrainConfig

# Each recipe is {row kind: (model config changes, train config changes)}; the kind is measured on the rows:
# - non-negative features (post-ReLU CNN embeddings) share a large common mean, which leaves most units dead with
#   b_pre = 0: centre with the geometric median, untie the decoder (unit-norm rows, parallel gradient removed),
#   normalise the reconstruction loss by Var(x), keep the self-contrastive term, resample dead units;
# - signed features (sentence embeddings) lose accuracy and cluster quality with those changes: keep the paper's
#   centring and tied decoder, no contrastive term, no resampling (few units die, and a tied decoder can diverge).
RESAMPLE = dict(resample_every=14, resample_until=0.9)
V1_NONNEG = (dict(tied=False), dict(bpre_init="geometric_median", recon_loss="nmse", cl="self", **RESAMPLE))
V1_SIGNED = ({}, dict(cl="none"))
LABELS = dict(cl="label", cl_coef=1.0)  # same-class positives, at the weight of the reconstruction term
# What `recommended` changes on top of v1: non-negative rows stop resampling at half of the steps (units moved
# later have no time to settle and die again); signed rows are centred on their mean, as PCA is.
V2_CHANGES = {"nonnegative": {"resample_until": 0.5}, "signed": {"bpre_init": "mean"}}


def _with(branches: dict[str, tuple[dict, dict]], **train_changes: Any) -> dict[str, tuple[dict, dict]]:
    return {kind: (m, {**t, **train_changes}) for kind, (m, t) in branches.items()}


V1 = {"nonnegative": V1_NONNEG, "signed": V1_SIGNED}
V2 = {kind: (m, {**t, **V2_CHANGES[kind]}) for kind, (m, t) in V1.items()}
RECIPES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "paper": {"nonnegative": ({}, {}), "signed": ({}, {})},
    "recommended": V2,
    "recommended+labels": _with(V2, **LABELS),
    "recommended-v1": V1,
    "recommended-v1+labels": _with(V1, **LABELS),
}
# the result row each named recipe (besides "paper") gets in a sweep, and its label in tables
RECIPE_ROWS = {"recommended": "csr_rec", "recommended+labels": "csr_rec_label", "recommended-v1": "csr_rec_v1",
               "recommended-v1+labels": "csr_rec_v1_label"}
# names of earlier releases: still accepted, with a one-line pointer to the current name
RENAMED = {"adaptive": "recommended", "adaptive+labels": "recommended+labels"}
RECIPE_CHOICES = ["paper", *RECIPE_ROWS, *RENAMED]
# recommended-v1 sizes the model at one unit per ROWS_PER_UNIT training rows at most (more units than that learn
# codes that do not generalise); recommended sizes it from the rows and k: each unit should fire for about
# FIRES_PER_UNIT training rows (rows·k / hidden; signed rows want fewer, busier units, at most SIGNED_UNITS unless
# 2·k is more: k pairs of ± principal directions), and an epoch should hold at least STEPS_PER_EPOCH optimiser
# steps (batch halved down to MIN_BATCH).
ROWS_PER_UNIT = 4
FIRES_PER_UNIT = {"nonnegative": 64, "signed": 256}
SIGNED_UNITS = 48
STEPS_PER_EPOCH = 16
MIN_BATCH = 256
# recommended starts the encoder from training rows (`data`: each unit wins for the inputs near its row) when the
# code is sparser than one unit in DATA_INIT_UNITS_PER_K·k, else from the ± principal directions (`pca`: the code
# starts as PCA-k); with every unit a principal direction in a sparse code, the low-variance ones never win.
DATA_INIT_UNITS_PER_K = 32


def resolve_recipe(name: str) -> str:
    """The current name of recipe `name` (a renamed one is accepted with a one-line warning)."""
    if name in RENAMED:
        warn(f"--recipe {name} is now called {RENAMED[name]} (same recipe)")
        return RENAMED[name]
    if name not in RECIPES:
        raise CSRError(f"--recipe must be one of {list(RECIPES)}, got {name!r}")
    return name


def recommended_sizes(rows: int, k: int, hidden: int, batch: int, fires: int,
                   most: int | None = None) -> tuple[int, int]:
    """(hidden size, batch size) of the recommended recipe for `rows` training rows at k (`hidden`, `batch`: the
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
    no cap). An explicit --hidden-size (`hidden_fixed`) is kept. A recipe that leaves no more units than k (too few
    rows for a sparse code) is an error."""
    name = resolve_recipe(name)
    kind = "nonnegative" if x is None or is_nonnegative(x) else "signed"
    mchange, tchange = RECIPES[name][kind]
    model_cfg, train_cfg = replace(model_cfg, **mchange), replace(train_cfg, **tchange)
    if name in ("recommended", "recommended+labels") and x is not None:
        hidden, batch = recommended_sizes(len(x), model_cfg.topk, model_cfg.hidden_size, train_cfg.batch_size,
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
    if name != "paper" and model_cfg.hidden_size <= model_cfg.topk:
        rows = "" if x is None else f" from {len(x)} training rows"
        raise CSRError(f"--recipe {name}: {model_cfg.hidden_size} units{rows} at k={model_cfg.topk} give dense "
                       f"codes, not sparse ones; use more rows (at least {ROWS_PER_UNIT * (2 * model_cfg.topk)}), "
                       f"a smaller --topk, or an explicit --hidden-size")
    return model_cfg, train_cfg


# ----------------------------------------------------------------------------- variants
# One syntax for every CSR row of a sweep (--recipes, --ablations) and the panel's candidate (--recipe, --try):
# `RECIPE[,FIELD=VALUE...]` or `FIELD=VALUE[,FIELD=VALUE...]` (on the flags' recipe), FIELD a field of CSRConfig or
# TrainConfig. Earlier sweep shorthands are still read, with a one-line pointer to the spelling of today.
LEGACY_VARIANTS = {"recon=nmse": "recon_loss=nmse", "bpre=geometric_median": "bpre_init=geometric_median",
                   "untied": "tied=False", "resample": "resample_every=14,resample_until=0.9",
                   "k_anneal=64": "k_start=64,k_anneal_fraction=0.7"}
POSITIVE_FIELDS = {"input_dim", "hidden_size", "topk", "dead_threshold", "batch_size", "epochs"}  # counts: >= 1
SHARE_FIELDS = {"k_anneal_fraction", "resample_until"}  # shares of the steps: at most 1


def canonical_variant(spec: str, flag: str = "--ablations") -> str:
    """`spec` spelled as today: an earlier shorthand or recipe name is rewritten, with a one-line pointer."""
    new = LEGACY_VARIANTS.get(spec, spec)
    head, sep, rest = new.partition(",")
    new = RENAMED.get(head, head) + sep + rest
    if new != spec:
        warn(f"{flag} {spec} is now written {new} (same variant)")
    return new


def split_variant(spec: str, flag: str) -> tuple[str, list[str]]:
    """(recipe name, FIELD=VALUE changes) of variant `spec`; the recipe is "paper" (the flags) when not named."""
    parts = [p.strip() for p in spec.split(",")]
    if not spec or any(not p for p in parts):
        raise CSRError(f"{flag} {spec!r}: expected RECIPE[,FIELD=VALUE...] or FIELD=VALUE[,FIELD=VALUE...]")
    recipe = "paper"
    if "=" not in parts[0]:
        if parts[0] not in RECIPES and parts[0] not in RENAMED:
            raise CSRError(f"{flag} {spec}: {parts[0]!r} is neither a recipe ({', '.join(RECIPE_CHOICES)}) nor "
                           f"FIELD=VALUE")
        recipe = resolve_recipe(parts.pop(0))
    return recipe, parts


def _field_value(change: str, raw: str, cur: Any, flag: str) -> Any:
    """`raw` parsed strictly as the type of the field's current value `cur` (a bool: true/false/1/0/...)."""
    kind = type(cur).__name__
    try:
        if isinstance(cur, bool):
            return parse_bool(raw)
        if isinstance(cur, int):
            return int(raw)
        if isinstance(cur, float):
            val = parse_fraction(raw)
            if not math.isfinite(val):
                raise ValueError(raw)
            return val
        return type(cur)(raw)
    except ValueError:
        raise CSRError(f"{flag} {change}: {raw!r} is not a {'finite ' if kind == 'float' else ''}{kind}"
                       + (" (true/false/1/0)" if kind == "bool" else "")) from None


def parse_changes(changes: list[str], model_cfg: Any, train_cfg: Any, flag: str = "--try") -> tuple[dict, dict]:
    """FIELD=VALUE changes as (model config changes, train config changes), typed like the fields and checked by
    the configs themselves (a value they refuse is a one-line error naming `flag`)."""
    from dataclasses import fields
    mf = {f.name for f in fields(model_cfg)}
    tf = {f.name for f in fields(train_cfg)}
    mch: dict[str, Any] = {}
    tch: dict[str, Any] = {}
    for c in changes:
        key, sep, raw = c.partition("=")
        if not sep or (key not in mf and key not in tf):
            raise CSRError(f"{flag} {c}: expected FIELD=VALUE with a field of CSRConfig or TrainConfig")
        val = _field_value(c, raw, getattr(model_cfg, key) if key in mf else getattr(train_cfg, key), flag)
        low = 1 if key in POSITIVE_FIELDS else 0
        if isinstance(val, (int, float)) and not isinstance(val, bool) and key != "seed" and val < low:
            raise CSRError(f"{flag} {c}: {key} must be >= {low}, got {raw}")
        if key in SHARE_FIELDS and val > 1:
            raise CSRError(f"{flag} {c}: {key} must be in [0, 1], got {raw}")
        (mch if key in mf else tch)[key] = val
        try:
            replace(train_cfg, **tch)
        except (ValueError, CSRError) as e:
            raise CSRError(f"{flag} {c}: {e}") from None
    return mch, tch


def variant_configs(spec: str, model_cfg: Any, train_cfg: TrainConfig, x: np.ndarray | None = None,
                    hidden_fixed: bool = False, flag: str = "--ablations") -> tuple[Any, TrainConfig]:
    """(model config, train config) of variant `spec` on top of the flags' configs for training rows `x`: its
    recipe applied first (sizing the model from the rows and k), then its FIELD=VALUE changes."""
    recipe, changes = split_variant(spec, flag)
    mch, tch = parse_changes(changes, model_cfg, train_cfg, flag)
    mcfg, tcfg = apply_recipe(recipe, model_cfg, train_cfg, x, hidden_fixed or "hidden_size" in mch)
    try:
        return replace(mcfg, **mch), replace(tcfg, **tch)
    except (ValueError, CSRError) as e:
        raise CSRError(f"{flag} {spec}: {e} (at k={mcfg.topk}, d={mcfg.input_dim})") from None


def variant_row(spec: str) -> str:
    """The result row of CSR variant `spec` (as canonical_variant spells it) in a sweep table (csr_rec for
    `recommended`, ...)."""
    if spec in RECIPE_ROWS:
        return RECIPE_ROWS[spec]
    return "csr_" + "".join(ch if ch.isalnum() or ch in "._+" else "-" for ch in spec)
