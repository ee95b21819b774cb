"""Resume is exact, and the resume / checkpoint / seed / k-annealing / --overwrite inputs of issue 37 follow the
bad-input contract of tests/test_bad_input.py (one `error: ...` line naming the culprit, exit code 2, no
traceback, nothing new on disk; a suspicious but legal input: one `warning: ...` line, and the run succeeds).

Exactness: a run killed mid-epoch inside the resampling window (after at least one last.pt), then resumed with
`--resume`, must end with the uninterrupted run's weights, Adam state and log lines, for every named recipe on
non-negative and signed rows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import export_csr
import main_multimodal
import main_text
import main_visual
from csr.checkpoint import read_checkpoint, save_checkpoint
from csr.model import CSR, CSRConfig
from csr.recipes import RECIPES
from inference import csr_inference
from test_bad_input import TRAIN, expect_error, rows, save_split, save_text_folder

# 200 rows, batch 20: 10 steps per epoch, 60 in all; 256 units at k = 2 leave many idle, so resampling every 14
# steps (until 50 or 90 % of the steps) moves units at steps 14 and 28 (and 42); the kill at step 22 comes after
# epoch 2's last.pt (step 20) and before the resampling at step 28
SMALL = ["--topk", "2", "--hidden-size", "256", "--auxk", "8", "--batch-size", "20", "--epochs", "6"]
KILL_AT = 22
RESAMPLE = ["--resample-every", "14", "--resample-until", "0.9"]
TIMING = ("samples_per_s", "epoch_time_s")


class Killed(Exception):
    """What kill -9 does to the loop: it stops between two steps, after the last epoch's last.pt."""


def kinds() -> dict[str, np.ndarray]:
    x = rows(200, 11)
    return {"nonnegative": x, "signed": x - np.float32(0.6)}


def log_lines(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k not in TIMING} for ln in lines]


def same_tensors(a, b, where: str) -> None:
    """Two nested checkpoint values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            same_tensors(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            same_tensors(u, v, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


CASES = {f"{recipe}-{kind}": (recipe, kind, []) for recipe in sorted(RECIPES) for kind in ("nonnegative", "signed")}
CASES.update({"paper-nonnegative-resample": ("paper", "nonnegative", RESAMPLE),
              "paper-signed-resample": ("paper", "signed", RESAMPLE),
              "paper-nonnegative-resample-kstart-untied": ("paper", "nonnegative",
                                                           [*RESAMPLE, "--k-start", "8", "--tied", "False"])})


@pytest.mark.parametrize("recipe,kind,flags", list(CASES.values()), ids=list(CASES))
def test_killed_run_resumes_to_the_uninterrupted_result(recipe, kind, flags, tmp_path, monkeypatch, capsys):
    import csr.train as T
    emb = save_split(tmp_path / "data", "train", kinds()[kind])
    argv = ["--pretrained_emb", str(emb), *SMALL, "--recipe", recipe, *flags]
    capsys.readouterr()
    main_visual.main([*argv, "--out", str(tmp_path / "whole")])
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning", "error"))]

    step = T.train_step

    def killed_at(run, batch):
        if run.step == KILL_AT:
            raise Killed()
        return step(run, batch)
    monkeypatch.setattr(T, "train_step", killed_at)
    with pytest.raises(Killed):
        main_visual.main([*argv, "--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(T, "train_step", step)
    killed = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert killed["step"] == 20 and not (tmp_path / "resumed" / "csr.pt").exists()
    capsys.readouterr()
    main_visual.main([*argv, "--resume", "--out", str(tmp_path / "resumed")])
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning", "error"))] == said

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for name in ("csr.pt", "last.pt"):
        a, b = read_checkpoint(whole / name), read_checkpoint(resumed / name)
        same_tensors(a["state_dict"], b["state_dict"], f"{name} weights")
        same_tensors(a["optimizer"], b["optimizer"], f"{name} Adam state")
        same_tensors(a["rng"], b["rng"], f"{name} generator states")
        assert a["step"] == b["step"] == 60
    assert log_lines(whole) == log_lines(resumed)
    tc = read_checkpoint(whole / "csr.pt")["train_config"]
    if tc["resample_every"]:  # the generator was drawn from after the kill: restoring it is what is tested
        moved = [ln["resampled_units"] for ln in log_lines(whole)]
        assert sum(moved[killed["epoch"] + 1:]) > 0, moved


# ----------------------------------------------------------------------------- bad inputs (issue 37, 2-6)

@pytest.fixture(scope="module")
def r(tmp_path_factory):
    """A finished run and a killed one (last.pt + log.jsonl of its first epoch), broken checkpoints, a text
    embedding folder."""
    d = tmp_path_factory.mktemp("resume")
    f = {"dir": d, "emb": save_split(d, "train", rows(200, 0)), "val": save_split(d, "val", rows(60, 1))}
    f["huge"] = save_split(d / "huge", "train", rows(200, 5) * np.float32(1e25))  # squares overflow float32
    nan = rows(200, 4)
    nan[5, 2] = np.nan
    f["nan"] = save_split(d / "nan", "train", nan)
    f["run"] = d / "run"
    main_visual.main(["--pretrained_emb", str(f["emb"]), *TRAIN, "--epochs", "2", "--out", str(f["run"])])
    f["killed"] = d / "killed"
    f["killed"].mkdir()
    shutil.copy(f["run"] / "last.pt", f["killed"] / "last.pt")
    (f["killed"] / "log.jsonl").write_text((f["run"] / "log.jsonl").read_text().splitlines()[0] + "\n")
    ck = read_checkpoint(f["run"] / "last.pt")
    torch.save({**ck, "epoch": 0, "step": 4, "train_config": {**ck["train_config"], "epochs": 3}},
               f["killed"] / "last.pt")
    f["zero"] = d / "zero.pt"
    f["zero"].write_bytes(b"")
    f["strcfg"] = d / "strcfg.pt"
    torch.save({**read_checkpoint(f["run"] / "csr.pt"), "config": "input_dim=16"}, f["strcfg"])
    f["nostate"] = d / "nostate.pt"  # a model saved outside a training loop: nothing to resume
    save_checkpoint(f["nostate"], CSR.seeded(CSRConfig(16, 32, 4, 8), 0), complete=True)
    for name, path in (("zerorun", f["zero"]), ("strrun", f["strcfg"])):
        f[name] = d / name
        f[name].mkdir()
        shutil.copy(path, f[name] / "last.pt")
        shutil.copy(f["killed"] / "log.jsonl", f[name] / "log.jsonl")
    save_text_folder(d / "text")
    return f


def cases(f):
    """(script main, argv, text the one error line must contain)."""
    d, new = f["dir"], f["dir"] / "new"
    mv = [main_visual.main, "--pretrained_emb", f["emb"], *TRAIN, "--epochs", "3"]
    inf = [csr_inference.main, "--eval_emb_path", f["val"], "--out", new, "--csr_ckpt"]
    ex = [export_csr.main, "save-pretrained", "--out", new, "--ckpt"]
    mme = [main_multimodal.main, "eval", "--dataset", "flickr30k", "--dataset_root", d, "--output", new / "r.json",
           "--csr_ckpt"]
    te = [main_text.main, "eval", "--emb-dir", d / "text", "--methods", "csr", "--dims", "4", "--out", new / "r.json",
          "--csr"]
    one, five = save_split(d / "one", "train", rows(1, 3)), save_split(d / "five", "train", rows(5, 4))
    out = [  # too few rows: one row says nothing; a recipe sized from 5 rows would give dense codes at k = 8
        (main_visual.main, "--pretrained_emb", one, "--out", new, "one/train_emb.npy: 1 training row(s); CSR needs "
         "at least 2"),
        (main_visual.main, "--pretrained_emb", five, "--topk", "8", "--recipe", "recommended", "--out", new,
         "--recipe recommended: 8 units from 5 training rows at k=8 give dense codes"),
    ]
    for ckpt, needle in ((f["zero"], "zero.pt: empty checkpoint file (0 bytes)"),
                         (f["strcfg"], "strcfg.pt: not a CSR checkpoint ('config' is a str, expected a dict)")):
        out += [(*inf, ckpt, needle), (*ex, ckpt, needle), (*mme, ckpt, needle), (*te, ckpt, needle),
                (*mv, "--resume", ckpt, "--out", new, needle)]
    return out + [
        # 2: --resume with other settings than the run's
        (*mv, "--batch-size", "25", "--resume", "--out", f["killed"], "--batch-size 50 there, 25 now"),
        (*mv, "--seed", "7", "--resume", "--out", f["killed"], "--seed 1227 there, 7 now"),
        (*mv, "--lr", "1e-3", "--resume", "--out", f["killed"], "--lr 0.0004 there, 0.001 now"),
        (*mv, "--resample-every", "2", "--resume", "--out", f["killed"], "--resample-every 0 there, 2 now"),
        (*mv, "--resume", f["nostate"], "--out", new, "nostate.pt: not a training checkpoint (no epoch, step, "
         "optimizer, scheduler)"),
        # 3: every stage that opens a checkpoint (above), and a run's own 0-byte / foreign last.pt
        (*mv, "--resume", "--out", f["zerorun"], "zerorun/last.pt: empty checkpoint file (0 bytes)"),
        (*mv, "--resume", "--out", f["strrun"], "strrun/last.pt: not a CSR checkpoint ('config' is a str"),
        # 4: --overwrite over a finished run: inputs that fail keep the old run
        (main_visual.main, "--pretrained_emb", f["nan"], *TRAIN, "--overwrite", "--out", f["run"],
         "NaN or Inf in embeddings (first at row 5)"),
        (main_visual.main, "--pretrained_emb", f["huge"], *TRAIN, "--overwrite", "--out", f["run"],
         "non-finite training loss at step 1"),
        # 6: seeds outside what numpy and torch take
        (*mv, "--seed=-1", "--out", new, "argument --seed: must be an integer in [0, 2**63 - 2], got -1"),
        (*mv, "--seed", str(2**64), "--out", new, "argument --seed: must be an integer in [0, 2**63 - 2]"),
        (*mv, "--seed", "x", "--out", new, "argument --seed: expected a number, got 'x'"),
    ]


def test_resume_and_checkpoint_bad_inputs_are_one_line_exit_2_and_leave_nothing(r, capsys):
    before = {p.name: p.read_bytes() for p in r["run"].iterdir()}
    for main, *argv, needle in cases(r):
        expect_error(main, argv, needle, capsys, r["dir"])
    assert {p.name: p.read_bytes() for p in r["run"].iterdir()} == before  # --overwrite kept the old run
    assert not (r["dir"] / "new").exists()


def test_resume_may_change_epochs_and_max_steps_only(r, tmp_path):
    """--epochs and --max-steps (how long the run goes on) may differ on --resume; the weights then continue."""
    out = tmp_path / "run"
    shutil.copytree(r["killed"], out)
    summary = main_visual.main(["--pretrained_emb", str(r["emb"]), *TRAIN, "--epochs", "4", "--max-steps", "10",
                                "--resume", "--out", str(out)])
    assert summary["steps"] == 10 and read_checkpoint(out / "csr.pt")["complete"]


def test_k_start_not_above_topk_warns_once_and_trains(r, tmp_path, capsys):
    """--k-start <= --topk (or clamped to hidden/4 <= --topk) turns k annealing off: one warning line."""
    for i, (flags, line) in enumerate([
            (["--k-start", "3"], "warning: --k-start 3 is not above k = 4: k annealing is off (it starts above k and "
                                 "decreases to it)"),
            (["--k-start", "4"], "warning: --k-start 4 is not above k = 4: k annealing is off (it starts above k and "
                                 "decreases to it)"),
            (["--topk", "8", "--k-start", "16"], "warning: --k-start 16 clamped to hidden_size/4 = 8, not above k = "
                                                 "8: k annealing is off")]):
        capsys.readouterr()
        summary = main_visual.main(["--pretrained_emb", str(r["emb"]), *TRAIN, *flags, "--max-steps", "2",
                                    "--out", str(tmp_path / str(i))])
        assert [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning", "error"))] == [line]
        assert summary["steps"] == 2
    capsys.readouterr()
    main_visual.main(["--pretrained_emb", str(r["emb"]), *TRAIN, "--k-start", "0", "--max-steps", "2",
                      "--out", str(tmp_path / "off")])
    assert "warning" not in capsys.readouterr().err  # 0: annealing off by default, nothing to say


def test_resume_of_a_checkpoint_without_generator_states_warns_when_it_resamples(r, tmp_path, capsys):
    """A last.pt of an older version (no `rng`) still resumes; with resampling, one warning says the run then
    differs from the uninterrupted one."""
    out = tmp_path / "run"
    argv = ["--pretrained_emb", str(r["emb"]), *TRAIN, "--epochs", "3", *RESAMPLE]
    main_visual.main([*argv, "--max-steps", "4", "--out", str(out)])
    ck = read_checkpoint(out / "last.pt")
    (out / "csr.pt").unlink()
    torch.save({k: v for k, v in ck.items() if k != "rng"}, out / "last.pt")
    capsys.readouterr()
    main_visual.main([*argv, "--max-steps", "8", "--resume", "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning", "error"))]
    assert err == [f"warning: --resume {out / 'last.pt'} holds no random generator states (an older version wrote "
                   f"it): resampling picks other units and rows than the uninterrupted run would"]
    assert read_checkpoint(out / "csr.pt")["step"] == 8


def test_overwrite_replaces_the_old_run_once_the_new_one_writes(r, tmp_path):
    """--overwrite over a finished run: a new run that succeeds replaces it (csr.pt of the new data)."""
    out = tmp_path / "run"
    shutil.copytree(r["run"], out)
    old = read_checkpoint(out / "csr.pt")["state_dict"]["encoder.weight"]
    main_visual.main(["--pretrained_emb", str(r["val"]), *TRAIN, "--overwrite", "--out", str(out)])
    ck = read_checkpoint(out / "csr.pt")
    assert ck["data"]["shape"] == [60, 16] and not torch.equal(ck["state_dict"]["encoder.weight"], old)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_one_active_unit_trains_with_every_contrastive_term(r, tmp_path):
    """k = 1 (a [B, 1] slice of the top-k indices) through the contrastive terms' backward."""
    for cl in ("self", "label"):
        main_visual.main(["--pretrained_emb", str(r["emb"]), *TRAIN, "--topk", "1", "--cl", cl,
                          "--out", str(tmp_path / cl)])
        assert (tmp_path / cl / "csr.pt").exists()
