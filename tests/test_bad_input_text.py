"""The bad-input contract (tests/test_bad_input.py) for the text, image-text, export and recipe-panel scripts
(issue 37): each bad input is ONE line `error: ...` naming the file, flag or shape at fault, exit code 2, no
traceback and nothing new on disk; a legal but suspicious input is one `warning: ...` line and succeeds."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

import export_csr
import main_multimodal
import main_text
import main_visual
from bench import recipe_val
from csr.checkpoint import save_checkpoint
from csr.cli import run
from csr.clip import TINY_CLIP_CONFIG
from csr.io import write_sidecar
from csr.model import CSR, CSRConfig
from csr.model_card import eval_markdown
from csr.train import TrainConfig
from tests.test_bad_input import TRAIN, expect_error, rows, save_split, snapshot


def text_folder(folder, corpus, labels: np.ndarray | None = None, sides=("train", "test")) -> None:
    """An embedding folder as `main_text.py embed` writes it, with `corpus` as its corpus.json."""
    save_split(folder, sides[0], rows(200, 0), labels)
    save_split(folder, sides[1], rows(60, 1), None if labels is None else labels[:60])
    (folder / "corpus.json").write_text(json.dumps(corpus))


@pytest.fixture(scope="module")
def t(tmp_path_factory):
    """A small world: broken text folders, a finished main_visual.py and main_text.py run, evaluation files
    good and bad, a tiny webdataset shard with feature caches of the wrong width, a tiny Flickr30k-style set."""
    d = tmp_path_factory.mktemp("bad_text")
    f = {"dir": d}
    text_folder(d / "text", {"name": "text", "task": "labelled"})
    text_folder(d / "listcorpus", [{"name": "text", "task": "labelled"}])
    text_folder(d / "notask", {"name": "notask"})
    text_folder(d / "oneclass", {"name": "oneclass", "task": "labelled"}, np.zeros(200, np.int64))
    text_folder(d / "noqrels", {"name": "noqrels", "task": "retrieval", "qrels": {"train": [[0, 0, 1]]}},
                sides=("corpus", "queries"))
    f["run"] = d / "run"
    main_visual.main(["--pretrained_emb", str(d / "text" / "train_emb.npy"), *TRAIN, "--out", str(f["run"])])
    f["textrun"] = d / "textrun"
    main_text.main(["train", "--emb-dir", str(d / "text"), *TRAIN, "--out", str(f["textrun"])])
    f["bare"] = d / "bare.pt"  # saved outside any training run: nothing recorded about its data
    save_checkpoint(f["bare"], CSR.seeded(CSRConfig(32, 64, 4, 8), 0))
    # evaluation files for the model card
    ev = d / "eval"
    ev.mkdir()
    (ev / "notes.txt").write_text("we ran it and it looked fine\n")
    (ev / "prose.md").write_text("# Results\n\nTop-1 was good.\n")
    (ev / "binary.md").write_bytes(bytes(range(256)) * 4)
    (ev / "binary.json").write_bytes(bytes(range(256)) * 4)
    (ev / "other.json").write_text(json.dumps({"protocol": "text", "note": "no numbers here"}))
    (ev / "norow.json").write_text(json.dumps({"neighbors": "nn.npy", "metrics": {}}))
    (ev / "nn_metrics.json").write_text(json.dumps({"neighbors": "nn.npy", "n_queries": 60,
                                                    "metrics": {"top1": 87.5, "mAP@10": 71.25}}))
    (ev / "table.md").write_text("| k | top1 |\n|---|---|\n| 4 | 50.00 |\n")
    # a webdataset shard, the tiny CLIP, feature caches whose arrays are not what their sidecars say
    f["shard"] = d / "shard-0000.tar"
    with tarfile.open(f["shard"], "w") as tar:
        for n in ("0.jpg", "0.txt"):
            (d / n).write_bytes(b"x")
            tar.add(d / n, arcname=n)
    f["clip"] = d / "tiny-clip.json"
    f["clip"].write_text(json.dumps(TINY_CLIP_CONFIG))
    want = {"clip_model": "tiny-clip", "pretrained": "none", "train_data": str(f["shard"]), "limit": None}
    for name, width, recorded in (("fcache_wide", 48, 32), ("fcache_48", 48, 48)):
        cache = d / name
        cache.mkdir()
        for kind in ("image", "text"):
            np.save(cache / f"{kind}_emb.npy", rows(10, 7, width))
            write_sidecar(cache / f"{kind}_emb.npy", **want, n=10, d=recorded, dtype="float32")
    # a Flickr30k-style retrieval set: 4 images, 2 captions each
    fl = d / "flickr"
    (fl / "flickr30k-images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(fl / "flickr30k-images" / f"{i}.png")
    (fl / "dataset_flickr30k.json").write_text(json.dumps(
        [{"image": f"{i}.png", "caption": [f"picture {i}", f"image number {i}"]} for i in range(4)]))
    f["flickr"] = fl
    return f


def cases(f):
    """(script main, argv, text the one error line must contain)."""
    d, ev = f["dir"], f["dir"] / "eval"
    new = d / "new"  # never exists: outputs of cases that must fail
    te = ["eval", "--methods", "truncation", "--dims", "8", "--out", new / "r.json", "--emb-dir"]
    rv = [recipe_val.main, "--sets", f"s={d / 'text'}", "--ks", "2", "--hidden-size", "32", "--auxk", "8",
          "--epochs", "1", "--batch-size", "64", "--mrl-epochs", "1", "--runs", new]
    ex = [export_csr.main, "save-pretrained", "--out", new, "--ckpt", f["run"] / "csr.pt", "--eval"]
    mmt = [main_multimodal.main, "--train-data", f["shard"], "--model", f["clip"], "--pretrained", "none", "--out",
           new, "--feature-cache"]
    mme = [main_multimodal.main, "eval", "--dataset", "flickr30k", "--dataset_root", f["flickr"], "--model",
           f["clip"], "--pretrained", "none", "--output", new / "r.json", "--csr", "true", "--csr_ckpt"]
    return [
        # --- main_text.py: corpus.json of another shape, a single-class corpus, no test qrels
        (main_text.main, *te, d / "listcorpus", "listcorpus/corpus.json: expected a JSON object with name and task, "
         "got a list"),
        (main_text.main, *te, d / "notask", "notask/corpus.json: no task, expected labelled or retrieval"),
        (main_text.main, "train", "--emb-dir", d / "notask", *TRAIN, "--out", new, "notask/corpus.json: no task"),
        (main_text.main, *te, d / "oneclass", "oneclass/train_labels.npy: 200 labels of one class (0); "
         "classification and clustering need at least 2 classes"),
        (main_text.main, *te, d / "noqrels", "noqrels/corpus.json: no test qrels"),
        # --- bench/recipe_val.py: --try typed by its field and checked by the configs, --val-fraction in (0, 1)
        (*rv, "--try", "tied=maybe", "--try tied=maybe: 'maybe' is not a bool (true/false/1/0)"),
        (*rv, "--try", "topk=0", "--try topk=0: topk must be >= 1, got 0"),
        (*rv, "--try", "hidden_size=-5", "--try hidden_size=-5: hidden_size must be >= 1, got -5"),
        (*rv, "--try", "topk=64", "--try recommended,topk=64: topk must be in [1, hidden_size=32], got 64"),
        (*rv, "--try", "lr=fast", "--try lr=fast: 'fast' is not a finite float"),
        (*rv, "--try", "lr=0", "--try lr=0: --lr must be a finite number > 0"),
        (*rv, "--val-fraction", "0", "argument --val-fraction: must be in (0, 1), got '0'"),
        (*rv, "--val-fraction", "0.001", "--val-fraction 0.001: 0 query rows of the 200 rows of set s"),
        # --- export_csr.py --eval: a metrics JSON or a markdown table, nothing else
        (*ex, ev / "notes.txt", "notes.txt: expected a metrics .json"),
        (*ex, ev / "prose.md", "prose.md: no markdown table"),
        (*ex, ev / "binary.md", "binary.md: not UTF-8 text (byte 0x80 at offset 128)"),
        (*ex, ev / "binary.json", "binary.json: not valid JSON"),
        (*ex, ev / "other.json", "other.json: not an evaluation table"),
        (*ex, ev / "norow.json", "norow.json: a row without any numeric metric"),
        (*ex, ev / "nn_metrics.json", ev / "missing.json", "missing.json: evaluation file not found"),
        # --- main_multimodal.py: a feature cache that is not what its sidecar says; another trainer's checkpoint
        (*mmt, d / "fcache_wide", "fcache_wide/image_emb.npy: shape (10, 48) but its sidecar"),
        (*mmt, d / "fcache_48", "fcache_48/image_emb.npy: features of width 48 but tiny-clip embeds to 32"),
        (*mme, f["run"] / "csr.pt", f"--csr_ckpt {f['run'] / 'csr.pt'}: trained by main_visual.py on "
         f"{(d / 'text' / 'train_emb.npy').resolve()}, not on CLIP image-text features"),
        (*mme, f["textrun"] / "csr.pt", "textrun/csr.pt: trained by main_text.py"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_leaves_nothing(t, capsys):
    for main, *argv, needle in cases(t):
        expect_error(main, argv, needle, capsys, t["dir"])
    assert not (t["dir"] / "new").exists()


def test_try_values_parse_strictly_by_type():
    """--try tied=false really trains an untied candidate; numbers keep their field's type."""
    m, tr = CSRConfig(8, 32, 4), TrainConfig()
    for raw, want in (("false", False), ("0", False), ("False", False), ("true", True), ("1", True)):
        assert recipe_val.parse_changes([f"tied={raw}"], m, tr) == ({"tied": want}, {})
    assert recipe_val.parse_changes(["topk=16", "auxk_coef=1/16", "cl=label"], m, tr) == (
        {"topk": 16}, {"auxk_coef": 1 / 16, "cl": "label"})


def test_eval_files_of_every_writer_make_the_model_card(t, tmp_path, capsys):
    """compute_metrics', the sweep's, main_text.py's and main_multimodal.py's JSON and a .md table are accepted
    (no warning); the card shows them."""
    ev = t["dir"] / "eval"
    export_csr.main(["save-pretrained", "--out", str(tmp_path / "hf"), "--ckpt", str(t["run"] / "csr.pt"),
                     "--eval", str(ev / "nn_metrics.json"), str(ev / "table.md")])
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| nn_metrics | 87.50 | 71.25 |" in card and "| 4 | 50.00 |" in card
    assert "warning" not in capsys.readouterr().err
    shapes = {"sweep": {"parts": [{"method": "pca", "dims": 8, "top1": 61.5, "config": {"k": 8}}], "ablation": []},
              "text": {"protocol": "x", "results": [{"dataset": "r8", "rows": [{"method": "pca", "dims": 8,
                                                                                   "knn10_acc": 90.0}]}]},
              "mm": {"metrics": None,
                     "results": [{"representation": "csr", "active_dims": 4, "image_to_text_R@1": 25.0}]}}
    for name, obj in shapes.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    table = eval_markdown([tmp_path / f"{n}.json" for n in shapes])
    assert "| pca | 8 | 61.50 |" in table and "knn10_acc" in table and "image_to_text_R@1" in table
    assert "config" not in table  # nested provenance is no column


def test_checkpoint_without_a_training_record_is_evaluated_with_a_warning(t, tmp_path, capsys):
    """main_multimodal.py eval of a CSR saved outside any training run: one warning line, and it succeeds."""
    before = snapshot(t["dir"])
    capsys.readouterr()
    run(main_multimodal.main, ["eval", "--dataset", "flickr30k", "--dataset_root", str(t["flickr"]), "--model",
                               str(t["clip"]), "--pretrained", "none", "--output", str(tmp_path / "r.json"),
                               "--csr_ckpt", str(t["bare"]), "--recall_k", "1", "2", "--device", "cpu"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("warning", "error"))]
    assert err == [f"warning: {t['bare']} records no training run (saved outside main_multimodal.py or imported): "
                   "nothing says it was trained on tiny-clip features"]
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["active_dims"] == 4
    assert snapshot(t["dir"]) == before
