"""Recipe selection on a PANEL of validation splits carved from training rows (never an eval split).

    python bench/recipe_val.py --recipe recommended                       # the default panel, k = 2 8 16 32 64
    python bench/recipe_val.py --recipe recommended --sets fmnist3k bbc --ks 8 32
    python bench/recipe_val.py --recipe recommended --try encoder_init=pca epochs=30   # a lever on top of it
    python bench/recipe_val.py --recipe paper --sets mine=.cache/text/mine_128:5000 --text-sets mine
    python bench/recipe_val.py --recipe recommended --sets fmnist15k --ks 2 8 --seeds 1227 1 2   # mean of 3 seeds

The panel spans what users bring: non-negative CNN features at several sizes and signed sentence embeddings
of several corpora (PANEL below; each set reads `train_emb.npy` + `train_labels.npy` of a folder the Makefile or
`main_text.py embed` writes: BUILD says how). Each set is first subsampled to its row count (a fixed draw), then
a fixed permutation (--split-seed) puts --val-fraction of those rows aside as queries against the rest as the
database. On small sets the query block rotates over folds until --min-queries rows have been queried (models
trained per fold, cells averaged), so one query does not move a cell by half a point. The training seed moves a
cell by as much or more (docs/decisions.md): --seeds trains every model of a cell once per seed (the
MRL adaptors too) and averages, as folds are. At every k: PCA fit on the
database rows, the label-free MRL adaptor, CSR with the paper's recipe (the flags) and CSR with --recipe plus
the --try changes (the candidate); the full embedding's row (the same at every k) is the ceiling; text sets
add V-measure (k-means on the queries). Parts are cached under --runs/<set> by the sweep's digests
(csr/sweep.py), so a re-run with another candidate trains only the candidate's models. Prints one table
(1-NN top-1 %, text: top-1 / V-measure) and one summary line per baseline: the candidate's wins / ties /
losses over every (set, k) cell, |gap| <= --tie counted as a tie, and the worst gap; writes the same to
--runs/panel_<candidate>.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csr.baselines import MRLConfig  # noqa: E402
from csr.cli import ArgumentParser, add_train_args, configs_from_args, nonneg_float, positive_int, run  # noqa: E402
from csr.io import (CSRError, atomic_write_json, atomic_write_text, code_version, command_line,  # noqa: E402
                    load_embeddings, load_labels)
from csr.metrics import markdown_table  # noqa: E402
from csr.provenance import machine  # noqa: E402
from csr.recipes import canonical_variant, parse_changes, variant_configs  # noqa: E402
from csr.sweep import Sweep, array_identity  # noqa: E402

# name: (folder, rows to draw (0 = all), text set?)
PANEL: dict[str, tuple[str, int, bool]] = {
    "fmnist3k": (".cache/fmnist/emb", 3000, False),
    "fmnist15k": (".cache/fmnist/emb", 15000, False),
    "fmnist30k": (".cache/fmnist/emb", 0, False),
    "bbc": (".cache/text/bbc_128", 0, True),
    "r8": (".cache/text/r8_128", 0, True),
    "20ng": (".cache/text/20ng_128", 0, True),
}
BUILD = {".cache/fmnist/emb": "make .cache/fmnist/emb/val_emb.npy",
         **{f".cache/text/{c}_128": f"python main_text.py embed --dataset {c} --max-seq-length 128 "
                                    f"--out .cache/text/{c}_128" for c in ("bbc", "r8", "20ng")}}
BASELINES = {"pca": "PCA", "mrl_unsup": "MRL adaptor (no labels)", "paper": "CSR, paper recipe",
             "mrl": "MRL adaptor (labels)"}  # the last only against a candidate that trains with labels


@dataclass
class PanelSet:
    name: str
    folder: Path
    rows: int  # 0 = all
    text: bool


def parse_sets(names: list[str], text_sets: list[str]) -> list[PanelSet]:
    """Panel names, or `name=FOLDER[:ROWS]` for a set of one's own (text when named in --text-sets)."""
    out = []
    for s in names:
        if "=" in s:
            name, spec = s.split("=", 1)
            folder, _, rows = spec.partition(":")
            if rows and not rows.isdigit():
                raise CSRError(f"--sets {s}: ROWS must be a whole number, got {rows!r}")
            out.append(PanelSet(name, Path(folder), int(rows or 0), name in text_sets))
        elif s in PANEL:
            folder, rows, text = PANEL[s]
            out.append(PanelSet(s, Path(folder), rows, text or s in text_sets))
        else:
            raise CSRError(f"--sets: unknown set {s!r} (panel: {', '.join(PANEL)}; or name=FOLDER[:ROWS])")
    for ps in out:
        if not (ps.folder / "train_emb.npy").exists():
            how = BUILD.get(str(ps.folder))
            raise CSRError(f"{ps.folder / 'train_emb.npy'}: missing for panel set {ps.name}"
                           + (f" (build it with: {how})" if how else ""))
    return out


def val_split(x: np.ndarray, y: np.ndarray, rows: int, fraction: float, seed: int, fold: int = 0):
    """(database x, y, query x, y): `rows` drawn without replacement (0 = all), then block `fold` of a fixed
    permutation, `fraction` of the rows, are the queries (folds 0, 1, ... never share a query)."""
    n = len(x)
    take = np.arange(n) if not rows or rows >= n else np.sort(np.random.default_rng([seed, 1]).choice(n, rows, replace=False))
    perm = take[np.random.default_rng(seed).permutation(len(take))]
    nq = int(round(fraction * len(take)))
    if (fold + 1) * nq > len(take):
        raise CSRError(f"fold {fold} of {nq} queries runs past the {len(take)} rows drawn")
    q = np.sort(perm[fold * nq:(fold + 1) * nq])
    db = np.sort(np.concatenate([perm[:fold * nq], perm[(fold + 1) * nq:]]))
    return np.asarray(x[db], np.float32), y[db], np.asarray(x[q], np.float32), y[q]


def n_folds(rows: int, fraction: float, min_queries: int) -> int:
    """Folds (disjoint query blocks) so that at least `min_queries` rows are queried in all, as far as the rows
    allow: on a 1.8k-row corpus one block of 10 % is 178 queries, where one query moves top-1 by 0.56 points."""
    nq = max(1, int(round(fraction * rows)))
    return max(1, min(-(-min_queries // nq), rows // nq))


def candidate_spec(args) -> str:
    """The candidate as a variant (csr.recipes' syntax, as the sweep's --recipes): --recipe plus the --try changes."""
    return ",".join([args.recipe, *args.changes])


def preflight(sets: list[PanelSet], args) -> None:
    """Before any model is trained or cached: every set gives queries and a database at --val-fraction, and the
    candidate's configs are valid at every k (the recipe sizes the model from the rows)."""
    model_cfg, train_cfg = paper_configs(args, 8)
    for ps in sets:
        x = load_embeddings(ps.folder / "train_emb.npy")
        n = min(ps.rows or len(x), len(x))
        nq = int(round(args.val_fraction * n))
        if nq < 1 or nq >= n:
            raise CSRError(f"--val-fraction {args.val_fraction}: {nq} query rows of the {n} rows of set {ps.name} "
                           f"({ps.folder / 'train_emb.npy'}); queries and database both need rows")
        y = load_labels(ps.folder / "train_labels.npy", len(x))
        xdb = val_split(x, y, ps.rows, args.val_fraction, args.split_seed, 0)[0]
        for k in args.ks:
            variant_configs(candidate_spec(args), replace(model_cfg, input_dim=x.shape[1], topk=k), train_cfg, xdb,
                            args.hidden_size is not None, "--try")


def paper_configs(args, d: int) -> tuple[Any, Any]:
    """The flags' (model, train) configs without --recipe: the paper row's, on which the candidate is built."""
    return configs_from_args(argparse.Namespace(**{**vars(args), "recipe": "paper"}), d)


def open_fraction(s: str) -> float:
    """A share strictly between 0 and 1 (0 leaves no queries, 1 no database)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {s!r}")
    return v


def run_set(ps: PanelSet, args, candidate: str) -> list[dict]:
    """Every (method, k) cell of one panel set, as dicts with set, method, k, top1 (, v_measure, dead)."""
    x = load_embeddings(ps.folder / "train_emb.npy")
    y = load_labels(ps.folder / "train_labels.npy", len(x))
    folds = n_folds(min(ps.rows or len(x), len(x)), args.val_fraction, args.min_queries)
    seeds = args.seeds or [args.seed]
    per_fold = [fold_cells(ps, x, y, f, argparse.Namespace(**{**vars(args), "seed": s}), candidate)
                for f in range(folds) for s in seeds]
    cells = []
    for group in zip(*per_fold):  # the same (method, k) cell of every fold and seed: their mean
        c = {**group[0], **{m: float(np.mean([g[m] for g in group])) for m in ("top1", "v_measure", "dead", "seconds")
                            if m in group[0] and group[0][m] is not None}}
        c["queries"] = sum(g["queries"] for g in group) // len(seeds)
        cells.append(c)
    p = np.mean([c["top1"] for c in cells if c["method"] == "pca"]) / 100
    print(f"  {ps.name}: {folds} fold(s), {cells[0]['queries']} queries in all (one standard error of a top-1 near "
          f"{100 * p:.0f} %: {100 * np.sqrt(p * (1 - p) / cells[0]['queries']):.2f} points)", flush=True)
    return cells


def fold_cells(ps: PanelSet, x: np.ndarray, y: np.ndarray, fold: int, args, candidate: str) -> list[dict]:
    """Every (method, k) cell of one fold of one panel set, as dicts with set, method, k, top1 (, v_measure,
    dead)."""
    xdb, ydb, xq, yq = val_split(x, y, ps.rows, args.val_fraction, args.split_seed, fold)
    sw = Sweep(Path(args.runs) / (ps.name if fold == 0 else f"{ps.name}-fold{fold}"), xdb, ydb, xq, yq,
               progress=False, text=ps.text, data_id=array_identity(xdb, ydb, xq, yq))
    model_cfg, train_cfg = paper_configs(args, x.shape[1])
    mrl_cfg = MRLConfig(epochs=args.mrl_epochs, seed=args.seed)
    spec = candidate_spec(args)
    at_k = replace(model_cfg, topk=args.ks[0])
    labels = variant_configs(spec, at_k, train_cfg, xdb, args.hidden_size is not None, "--try")[1].cl == "label"
    rows = {"full": "full", "pca": "pca", "mrl_unsup": "mrl_unsup", **({"mrl": "mrl"} if labels else {}),
            "paper": "csr", candidate: spec}  # the MRL adaptor with labels only against a candidate with labels
    cells = []
    for k in args.ks:
        for method, row in rows.items():
            r = sw.cell(row, k, model_cfg, train_cfg, mrl_cfg, args.hidden_size is not None)
            cells.append({"set": ps.name, "method": method, "k": k, "top1": r["top1"], "queries": len(xq),
                          **({"v_measure": r["v_measure"]} if ps.text else {}),
                          **({"dead": 100 * r["dead_fraction"]} if "dead_fraction" in r else {}),
                          **({"seconds": r.get("train_seconds", r.get("seconds"))})})
    print(f"  {ps.name} fold {fold}: {len(xdb)} database / {len(xq)} query rows, d={x.shape[1]}; {sw.summary()}",
          flush=True)
    return cells


def compare(cells: list[dict], candidate: str, baseline: str, metric: str, tie: float) -> dict[str, Any]:
    """Wins / ties / losses of `candidate` against `baseline` over every (set, k) where both have `metric`."""
    by = {(c["set"], c["k"], c["method"]): c for c in cells}
    gaps = [(by[s, k, candidate][metric] - by[s, k, baseline][metric], s, k)
            for (s, k, m) in by if m == candidate and metric in by[s, k, m] and (s, k, baseline) in by]
    wins = sum(g > tie for g, _, _ in gaps)
    losses = sum(g < -tie for g, _, _ in gaps)
    worst = min(gaps) if gaps else (float("nan"), "", 0)
    return {"baseline": baseline, "metric": metric, "wins": wins, "ties": len(gaps) - wins - losses,
            "losses": losses, "worst_gap": round(worst[0], 2), "worst_at": f"{worst[1]} k={worst[2]}"}


def table(cells: list[dict], ks: list[int], methods: list[str], names: dict[str, str]) -> str:
    rows = []
    for s in dict.fromkeys(c["set"] for c in cells):
        for m in methods:
            line = {"set": s, "method": names.get(m, m)}
            for k in ks:
                c = next((c for c in cells if c["set"] == s and c["method"] == m and c["k"] == k), None)
                line[str(k)] = "" if c is None else (f"{c['top1']:.2f}" + (f" / {c['v_measure']:.1f}" if "v_measure" in c else "")
                                                     + (f" ({c['dead']:.0f}% dead)" if c.get("dead", 0) >= 10 else ""))
            rows.append(line)
    return markdown_table(rows, ["set", "method", *map(str, ks)])


def summary_lines(cells: list[dict], candidate: str, tie: float) -> tuple[list[str], list[dict]]:
    methods = {c["method"] for c in cells}
    comps = [compare(cells, candidate, b, "top1", tie) for b in BASELINES if b in methods]
    if any("v_measure" in c for c in cells):
        comps.append(compare(cells, candidate, "pca", "v_measure", tie))
    lines = [f"{candidate} vs {BASELINES[c['baseline']]} ({'V-measure' if c['metric'] == 'v_measure' else 'top-1'}): "
             f"{c['wins']} wins / {c['ties']} ties / {c['losses']} losses (|gap| <= {tie} is a tie), worst gap "
             f"{c['worst_gap']:+.2f} at {c['worst_at']}" for c in comps]
    dead = [(c["dead"], c["set"], c["k"]) for c in cells if c["method"] == candidate and "dead" in c]
    if dead:
        worst = max(dead)
        lines.append(f"{candidate} dead latents: at most {worst[0]:.1f} % ({worst[1]} k={worst[2]})")
    return lines, comps


def main(argv=None) -> dict:
    p = ArgumentParser(prog="recipe_val.py", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("panel")
    g.add_argument("--sets", nargs="+", default=list(PANEL), help="panel sets, or name=FOLDER[:ROWS] of one's own")
    g.add_argument("--text-sets", nargs="*", default=[], help="own sets to score as text (adds V-measure)")
    g.add_argument("--ks", type=positive_int, nargs="+", default=[2, 8, 16, 32, 64], help="k (active dims) of every cell")
    g.add_argument("--try", dest="changes", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="changes to the candidate's model or train config (a lever tried on top of --recipe)")
    g.add_argument("--val-fraction", type=open_fraction, default=0.1,
                   help="share of a set's rows used as queries, in (0, 1)")
    g.add_argument("--min-queries", type=positive_int, default=1500,
                   help="rotate the query block over folds (one model set per fold) until this many rows are queried")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the row draw and the fixed permutation")
    g.add_argument("--mrl-epochs", type=positive_int, default=20, help="epochs of the label-free MRL adaptor (its recipe)")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train every model of a cell once per seed and average (default: --seed only)")
    g.add_argument("--tie", type=nonneg_float, default=0.3, help="a gap of at most this many points is a tie")
    g.add_argument("--runs", default="runs/panel", help="cache of the parts and models; the reports go here too")
    add_train_args(p)  # its --recipe names the candidate; the paper row always uses the flags without a recipe
    p.set_defaults(recipe="recommended")
    args = p.parse_args(argv)
    t0, commit = time.time(), code_version()  # the checkout the run started from
    sets = parse_sets(args.sets, args.text_sets)
    args.recipe = canonical_variant(args.recipe, "--recipe")
    probe_m, probe_t = paper_configs(args, 8)
    tchange = parse_changes(args.changes, probe_m, probe_t, "--try")[1]
    preflight(sets, args)
    candidate = args.recipe + "".join(f" {c}" for c in args.changes)
    if args.seeds:
        if "seed" in tchange:
            raise CSRError("--seeds and --try seed=... both set the seed: use one")
        candidate += " seeds=" + ",".join(map(str, args.seeds))
    print(f"panel: {', '.join(s.name for s in sets)}; ks {args.ks}; candidate: {candidate}", flush=True)
    cells = [c for ps in sets for c in run_set(ps, args, candidate)]
    lines, comps = summary_lines(cells, candidate, args.tie)
    shown = [m for m in ("full", *BASELINES, candidate) if any(c["method"] == m for c in cells)]
    report = "\n".join([f"Panel (validation splits of training rows), candidate `{candidate}`; 1-NN top-1 % "
                        f"(text: top-1 / V-measure); command: python bench/recipe_val.py "
                        + " ".join(sys.argv[1:] if argv is None else argv), "",
                        table(cells, args.ks, shown, {"full": "full embedding (all dims)", **BASELINES,
                                                       candidate: f"CSR, {candidate}"}), "", *lines])
    print("\n" + report)
    print(f"panel done in {time.time() - t0:.0f}s wall")
    tag = candidate.replace(" ", "_").replace("=", "-").replace("/", "_")
    atomic_write_text(Path(args.runs) / f"panel_{tag}.md", report + "\n")
    atomic_write_json(Path(args.runs) / f"panel_{tag}.json", {"candidate": candidate, "cells": cells,
                                                               "comparisons": comps, "ks": args.ks,
                                                               "command": command_line(), "commit": commit,
                                                               "machine": machine(),
                                                               "wall_seconds": time.time() - t0})
    return {"cells": cells, "comparisons": comps, "summary": lines, "report": report}


if __name__ == "__main__":
    run(main)
