"""Checkpoints load with `weights_only=True`: a pickle that would run code is refused before anything in it is
built, and every checkpoint the project writes (visual, text, image-text, epoch, last.pt) still loads."""
from pathlib import Path

import numpy as np
import pytest
import torch

import main_multimodal
import main_visual
from csr.checkpoint import load_model, plain, read_checkpoint, save_checkpoint
from csr.io import CSRError
from csr.model import CSR, CSRConfig


class _Payload:
    """Unpickling this creates the file `marker` (what a malicious checkpoint could do with any call)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    model = CSR(CSRConfig(8, 32, topk=2))
    state = {"format": "csr-checkpoint-v1", "config": model.cfg.to_dict(), "state_dict": model.state_dict(),
             "args": {"hook": _Payload(marker)}}
    torch.save(state, tmp_path / "evil.pt")
    assert not marker.exists()
    for load in (read_checkpoint, load_model):
        with pytest.raises(CSRError, match=r"evil\.pt: refused.*could run code") as e:
            load(tmp_path / "evil.pt")
        assert "\n" not in str(e.value)
        assert not marker.exists()


def test_plain_keeps_plain_types_and_refuses_objects(tmp_path):
    got = plain({"p": tmp_path, "n": np.int64(3), "f": np.float32(0.5), "t": (1, [2.0, None]), "s": "x"})
    assert got == {"p": str(tmp_path), "n": 3, "f": 0.5, "t": (1, [2.0, None]), "s": "x"}
    assert type(got["n"]) is int
    with pytest.raises(CSRError, match=r"checkpoint\['args'\]\['hook'\]: a _Payload cannot be stored"):
        save_checkpoint(tmp_path / "x.pt", CSR(CSRConfig(8, 32, topk=2)), args={"hook": _Payload(tmp_path / "m")})
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "m").exists()


def _all_load(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.glob("*.pt"))
    for name in names:
        ckpt = read_checkpoint(folder / name)
        assert ckpt["state_dict"] and ckpt["config"]
    return names


def test_every_visual_checkpoint_loads_weights_only(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_emb.npy", rng.random((300, 16), dtype=np.float32))
    np.save(tmp_path / "train_labels.npy", rng.integers(0, 3, 300))
    out = tmp_path / "run"
    main_visual.main(["--pretrained_emb", str(tmp_path / "train_emb.npy"), "--topk", "4", "--hidden-size", "64",
                      "--batch-size", "100", "--epochs", "2", "--keep-epochs", "--cl", "label", "--out", str(out)])
    names = _all_load(out)
    assert {"csr.pt", "last.pt"} <= set(names) and len(names) >= 4  # + one checkpoint per epoch
    model, ckpt = load_model(out / "csr.pt")
    assert ckpt["complete"] and isinstance(ckpt["args"], dict) and model.cfg.hidden_size == 64


def test_every_image_text_checkpoint_loads_weights_only(tmp_path):
    from csr.fmnist_captions import build_fixtures
    fx = build_fixtures(tmp_path / "fx", n_train=64, per_shard=32, n_eval=8, seed=0)
    main_multimodal.main(["--train-data", fx["train_data"], "--model", fx["model"], "--pretrained", fx["pretrained"],
                          "--csr-hidden-size", "64", "--csr-topk", "4", "--csr-auxk", "16", "--batch-size", "16",
                          "--workers", "0", "--out", str(tmp_path / "run"), "--device", "cpu", "--progress", "False",
                          "--max-steps", "2", "--epochs", "3", "--csr-input-dim", "32"])
    names = _all_load(tmp_path / "run")
    assert {"csr.pt", "last.pt"} <= set(names) and any(n.startswith("epoch_") for n in names)
