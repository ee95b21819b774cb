"""The one library module that knows argparse: what the stage scripts share for flags and parsing.

It holds boolean flags as the paper writes them (`--use_CL True`), typed flag values, the CSR training flags
(`add_train_args`) and their mapping to configs, and the one-line errors of every script: `ArgumentParser`
for a bad flag, `run` for a `CSRError` (`error: ...` on stderr, exit code 2). One run from the parsed training
flags is csr/train_run.py's. Every other module of `csr/` is free of argparse and print(): it takes plain
arguments and returns values (progress lines through `csr.io.info`, warnings through `csr.io.warn`); the
scripts parse flags, call the library and print what it returned.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Sequence

from csr.io import CSRError
from csr.recipes import RECIPE_CHOICES
from csr.values import parse_bool, parse_fraction


def str2bool(s: str | bool) -> bool:
    """Parse `True/False/1/0/yes/no` so `--use_CL True` works as in the paper's README."""
    try:
        return parse_bool(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bool_flag(parser: argparse._ActionsContainer, *names: str, default: bool, help: str) -> None:
    """`--flag` alone means True; `--flag True|False|1|0` sets it explicitly."""
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=f"{help} (default {default})")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the stages' error contract: a bad flag is ONE line `error: ...` and exit code 2
    (argparse's default prints the whole usage first)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _number(s: str, cast: Callable[[str], Any]) -> Any:
    try:
        return cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def positive_int(s: str) -> int:
    v = _number(s, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(s: str) -> int:
    v = _number(s, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


SEED_MAX = 2**63 - 2  # torch takes 64-bit seeds, and the resampling generator is seeded with seed + 1


def seed_int(s: str) -> int:
    """A random seed: an integer in [0, SEED_MAX] (numpy refuses negative seeds, torch ones past 64 bits)."""
    v = _number(s, int)
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 2], got {v}")
    return v


def _float_above(s: str, strict: bool) -> float:
    v = fraction(s)
    if not math.isfinite(v) or v < 0 or (strict and v == 0):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} 0, got {s}")
    return v


def positive_float(s: str) -> float:
    """A finite float > 0 (learning rates, temperatures: 0, negative, NaN or Inf can only give NaN)."""
    return _float_above(s, strict=True)


def nonneg_float(s: str) -> float:
    """A finite float >= 0 (loss weights, weight decay, clipping norms)."""
    return _float_above(s, strict=False)


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main`, turning `CSRError` into a one-line message and exit code 2."""
    try:
        main(argv)
    except CSRError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)




def unit_interval(s: str) -> float:
    """A number in [0, 1] (a share of the training steps)."""
    v = fraction(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s!r}")
    return v


def adam_beta(s: str) -> float:
    """An Adam/AdamW beta: a number in [0, 1) (1 or more never forgets, a negative one is meaningless)."""
    v = fraction(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s!r}")
    return v


def fraction(s: str) -> float:
    """A float that may be written as a fraction, e.g. `1/32`."""
    try:
        return parse_fraction(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


PRECISION_HELP = ("CSR encoder matmul: fp32 (paper, default), bf16 = bf16 operands with fp32 accumulation for the "
                  "dense encoder and the selected units' backward (master weights fp32; codes chosen the same way in "
                  "training and encoding), auto = bf16 where the hardware has it (CUDA, CPU AMX / AVX-512 BF16)")


def add_precision_arg(group: argparse._ActionsContainer, *names: str, dest: str = "precision",
                      default: str | None = "fp32", help: str = PRECISION_HELP) -> None:
    """The one `--precision fp32|bf16|auto` flag of every trainer, the encoder script and the sweep."""
    from csr.precision import PRECISIONS
    group.add_argument(*(names or ("--precision",)), dest=dest, default=default, choices=PRECISIONS, help=help)


def precision_from_args(value: str, device: str = "auto", say: bool = True) -> str:
    """Resolve a `--precision` value for `--device` to fp32 or bf16, printing once which path runs."""
    import torch

    from csr.precision import resolve_precision
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(dev.split(":")[0])
    except RuntimeError:
        raise CSRError(f"--device {device}: expected auto, cpu, cuda or cuda:N") from None
    chosen, line = resolve_precision(value, where)
    if say and os.environ.get("RANK", "0") == "0":
        print(line, flush=True)
    return chosen


def schedule_name(s: str) -> str:
    """An LR schedule: `constant` (open_clip's spelling `const` too) or `cosine`."""
    return "constant" if s == "const" else s


def resume_value(s: str) -> bool | str:
    """`--resume`: a boolean (True = continue OUT/last.pt when it exists), `latest` (open_clip's spelling of
    True) or the path of a checkpoint to continue from (which must exist)."""
    if s == "latest":
        return True
    try:
        return str2bool(s)
    except argparse.ArgumentTypeError:
        return s


def add_train_args(p: argparse.ArgumentParser, cl_coef: float = 0.1, cl: str = "self",
                   precision_flag: str = "--precision") -> None:
    """The CSR model / optimisation / contrastive / runtime flags shared by every training script: the one
    definition of them (a script with other defaults calls `p.set_defaults`, one with other spellings
    `add_aliases`).

    Defaults are the paper's recipe (main_visual.py of the reference); deviations are flags, off by default.
    """
    m = p.add_argument_group("model")
    _model_flags(m)
    _dead_unit_flags(m)
    _optimisation_flags(p.add_argument_group("optimisation"))
    _contrastive_flags(p.add_argument_group("contrastive"), cl, cl_coef)
    _runtime_flags(p.add_argument_group("runtime"), precision_flag)


def _model_flags(m: argparse._ArgumentGroup) -> None:
    """The model's shape and the recipe: k, AuxK units, width, deadness, tied decoder, input standardising."""
    m.add_argument("--topk", type=positive_int, default=8, help="active units k per code (paper: 8..256)")
    m.add_argument("--auxk", type=nonneg_int, default=512, help="dead units used by the AuxK loss (paper: 512)")
    m.add_argument("--hidden-size", "--hidden_size", dest="hidden_size", type=positive_int, default=None,
                   help="number of latent units (default 4·d, d read from the embeddings)")
    m.add_argument("--dead_threshold", "--dead-threshold", dest="dead_threshold", type=positive_int, default=30,
                   help="a unit is dead after this many training STEPS without firing (reference counted "
                        "forward calls, 3 per step)")
    bool_flag(m, "--tied", default=True, help="decoder = encoder^T (reference); False: untied unit-norm decoder")
    bool_flag(m, "--normalize", default=False, help="standardise each input (sentence-transformers' option)")
    m.add_argument("--recipe", default="paper", choices=RECIPE_CHOICES,
                   help="paper (default: the paper's recipe); recommended: the best recipe without labels, which "
                        "adapts to the training rows (sign, count) and k; recommended+labels: with same-class "
                        "positives (--cl label --cl_coef 1); recommended-v1[+labels]: the earlier recommended recipe "
                        "(adaptive[+labels] is recommended[+labels]'s earlier name). Applied on top of the other "
                        "flags; what each changes: csr/recipes.py")


def _dead_unit_flags(m: argparse._ArgumentGroup) -> None:
    """Initialisation, k annealing and dead-unit resampling: the levers against dead units (off by default)."""
    m.add_argument("--encoder-init", "--encoder_init", dest="encoder_init", default="random", choices=["random", "data", "pca"],
                   help="encoder (and untied decoder) rows: random (reference); data = centred, unit-norm training "
                        "rows, so that every unit starts alive; pca = ±principal directions around b_pre, so that "
                        "training starts from PCA's information at every k")
    m.add_argument("--bpre-init", "--bpre_init", dest="bpre_init", default="zeros",
                   choices=["zeros", "mean", "geometric_median"], help="initial pre-encoder bias b_pre")
    m.add_argument("--k-start", "--k_start", dest="k_start", type=nonneg_int, default=0,
                   help="k annealing (off by default): start training with this many active units, decreasing "
                        "linearly to --topk over --k-anneal-steps (against dead latents; CSRv2); at most "
                        "hidden_size/4, and a value not above --topk leaves annealing off (with a warning)")
    m.add_argument("--k-anneal-steps", "--k_anneal_steps", dest="k_anneal_steps", type=nonneg_int, default=0,
                   help="steps of the k annealing (0 = --k-anneal-fraction of all training steps)")
    m.add_argument("--k-anneal-fraction", type=unit_interval, default=0.5,
                   help="share of all steps the k annealing lasts when --k-anneal-steps is 0 (CSRv2: 0.7)")
    m.add_argument("--resample-every", type=nonneg_int, default=0,
                   help="every N steps, move units idle for N steps onto the worst reconstructed inputs of the "
                        "batch, with their Adam state reset (0 = off: the reference has no resampling)")
    m.add_argument("--resample-until", type=unit_interval, default=0.5,
                   help="resample during this share of all steps only, so the moved units can settle")


def _optimisation_flags(o: argparse._ArgumentGroup) -> None:
    """Adam, batches, epochs, LR schedule, clipping and the reconstruction / AuxK loss terms."""
    o.add_argument("--lr", type=positive_float, default=4e-4, help="Adam learning rate (paper: 4e-4)")
    o.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=4096,
                   help="global batch size (paper: 4096)")
    o.add_argument("--epochs", type=positive_int, default=10, help="epochs (paper: 10)")
    o.add_argument("--max-steps", "--max_steps", dest="max_steps", type=nonneg_int, default=0,
                   help="stop after this many optimiser steps (0 = all epochs)")
    o.add_argument("--wd", type=nonneg_float, default=0.0, help="Adam weight decay")
    o.add_argument("--adam-eps", type=positive_float, default=6.25e-10, help="Adam epsilon (reference: 6.25e-10)")
    bool_flag(o, "--fused-adam", default=True,
              help="torch's fused Adam kernel: the same update up to float rounding, one kernel per parameter "
                   "(False = torch's default per-op Adam, as the reference)")
    o.add_argument("--schedule", type=schedule_name, default="constant", choices=["constant", "cosine"],
                   help="LR schedule (reference: constant, a StepLR with gamma 1; const = constant)")
    o.add_argument("--warmup-steps", type=nonneg_int, default=0, help="linear LR warm-up steps")
    o.add_argument("--grad-clip", "--grad-clip-norm", dest="grad_clip", type=nonneg_float, default=0.0,
                   help="clip the gradient norm (0 = off)")
    o.add_argument("--recon-loss", "--recon_loss", dest="recon_loss", default="mse", choices=["mse", "nmse"],
                   help="reconstruction loss: mse (reference) or nmse = MSE / Var(x)")
    o.add_argument("--auxk_coef", "--auxk-coef", dest="auxk_coef", type=nonneg_float, default=1 / 32,
                   help="AuxK loss weight beta (paper: 1/32)")
    o.add_argument("--multi-k-coef", type=nonneg_float, default=1 / 8, help="weight of the 4k reconstruction (1/8)")


def _contrastive_flags(c: argparse._ArgumentGroup, cl: str, cl_coef: float) -> None:
    """The contrastive term (`cl`, `cl_coef`: the script's defaults) and the kNN-preserving term."""
    bool_flag(c, "--use_CL", "--use-cl", default=True, help="add the contrastive term (paper: True)")
    c.add_argument("--cl", default=cl, choices=["self", "label", "pair", "none"],
                   help="contrastive positives: self (reference), label (same class), pair, none")
    c.add_argument("--cl_coef", "--cl-coef", dest="cl_coef", type=nonneg_float, default=cl_coef,
                   help=f"contrastive weight gamma (default {cl_coef})")
    c.add_argument("--temperature", type=positive_float, default=0.2, help="contrastive temperature (reference: 0.2)")
    c.add_argument("--sim-coef", type=nonneg_float, default=0.0,
                   help="weight of the kNN-preserving term: codes' in-batch cosine similarities matched to the "
                        "inputs' (ours; 0 = off, the paper's recipe)")
    c.add_argument("--sim-loss", default="rank", choices=["rank", "gram"],
                   help="rank: KL of each row's softmax neighbour distribution (inputs' as target); gram: MSE of "
                        "the cosine matrices (the label-free MRL objective)")
    c.add_argument("--sim-temperature", type=positive_float, default=0.05,
                   help="temperature of the rank term's neighbour distributions")


def _runtime_flags(r: argparse._ArgumentGroup, precision_flag: str) -> None:
    """Seed, device, DDP, AMP, the encoder's precision (flag named `precision_flag`), resume and outputs."""
    r.add_argument("--seed", type=seed_int, default=1227, help="random seed (0 to 2**63 - 2)")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    r.add_argument("--gpu", type=nonneg_int, default=None, help="CUDA device index for a single-process run")
    bool_flag(r, "--use_ddp", "--use-ddp", default=False, help="DistributedDataParallel under torchrun")
    bool_flag(r, "--amp", default=True, help="bfloat16 autocast of the loss arithmetic on CUDA")
    add_precision_arg(r, precision_flag, dest=precision_flag.lstrip("-").replace("-", "_"))
    r.add_argument("--resume", type=resume_value, nargs="?", const=True, default=False, metavar="BOOL|latest|PATH",
                   help="continue a killed run from OUT/last.pt (True or latest) or from a checkpoint PATH, or a "
                        "finished one when --epochs asks for more (a finished run has nothing to resume otherwise; "
                        "default False). It continues with the run's own settings: only --epochs and --max-steps "
                        "may differ (to train on); another --batch-size, --seed, --lr, ... is refused. With the same "
                        "flags on the same device type it draws the batches and random numbers the uninterrupted run "
                        "would have")
    bool_flag(r, "--overwrite", default=False,
              help="start over in an existing OUT: the old run (csr.pt, last.pt, log.jsonl, epoch checkpoints) is "
                   "removed only when the new run writes its first checkpoint, so a run that fails before that "
                   "keeps the old one")
    bool_flag(r, "--keep-epochs", default=False, help="keep a checkpoint of every epoch (OUT/epochNNN.pt)")


def add_aliases(p: argparse.ArgumentParser, aliases: dict[str, Sequence[str]], title: str, about: str) -> None:
    """More spellings of flags already on `p` (e.g. the paper's names in one script): `aliases` maps a flag's
    dest to its other option strings, which parse the same way into the same dest. Listed in their own group."""
    actions = {a.dest: a for a in p._actions}
    g = p.add_argument_group(title, about)
    for dest, names in aliases.items():
        a = actions[dest]
        g.add_argument(*names, dest=dest, type=a.type, nargs=a.nargs, const=a.const, choices=a.choices,
                       metavar=a.metavar, default=argparse.SUPPRESS, help=f"= {a.option_strings[0]}")


def reject_unused(p: argparse.ArgumentParser, args: argparse.Namespace, why: dict[str, str]) -> None:
    """Shared flags this script does not use must keep their defaults: `why` maps a dest to what to use
    instead; a changed one is a one-line error."""
    for dest, instead in why.items():
        if getattr(args, dest) != p.get_default(dest):
            raise CSRError(f"{p.prog}: {'/'.join(a.option_strings[0] for a in p._actions if a.dest == dest)} "
                           f"is not used here: {instead}")


def configs_from_args(args: argparse.Namespace, input_dim: int, x=None):
    """Build (CSRConfig, TrainConfig) from the flags of `add_train_args` (`x`: the training rows, for --recipe)."""
    from csr.model import CSRConfig
    from csr.train import TrainConfig
    hidden = args.hidden_size or 4 * input_dim
    if args.topk > hidden:
        raise CSRError(f"--topk {args.topk} is larger than --hidden-size {hidden}")
    try:
        model_cfg = CSRConfig(input_dim=input_dim, hidden_size=hidden, topk=args.topk, auxk=args.auxk,
                              dead_threshold=args.dead_threshold, tied=args.tied, normalize=args.normalize,
                              precision=precision_from_args(getattr(args, "csr_precision", args.precision), args.device))
    except ValueError as e:
        raise CSRError(str(e)) from None
    train_cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                            cl=args.cl if args.use_CL else "none", cl_coef=args.cl_coef,
                            temperature=args.temperature, sim_coef=args.sim_coef, sim_loss=args.sim_loss,
                            sim_temperature=args.sim_temperature, auxk_coef=args.auxk_coef,
                            multi_k_coef=args.multi_k_coef, recon_loss=args.recon_loss, wd=args.wd,
                            adam_eps=args.adam_eps, fused_adam=args.fused_adam, schedule=args.schedule, warmup_steps=args.warmup_steps,
                            grad_clip=args.grad_clip, bpre_init=args.bpre_init,
                            encoder_init=args.encoder_init, k_start=args.k_start,
                            k_anneal_steps=args.k_anneal_steps, k_anneal_fraction=args.k_anneal_fraction,
                            resample_every=args.resample_every, resample_until=args.resample_until, seed=args.seed, amp=args.amp,
                            max_steps=args.max_steps, keep_epochs=args.keep_epochs)
    if getattr(args, "recipe", "paper") != "paper":
        from csr.recipes import apply_recipe
        model_cfg, train_cfg = apply_recipe(args.recipe, model_cfg, train_cfg, x, args.hidden_size is not None)
    return model_cfg, train_cfg
