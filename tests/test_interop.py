"""Interop with sentence-transformers and Hugging Face-style folders (csr/interop.py, export_csr.py).

A tiny CSR is trained on real all-MiniLM-L6-v2 embeddings of real sentences; its exports are loaded by the
sentence-transformers library itself (offline) and must give our codes exactly; imports must give back
identical weights; corrupt or foreign folders must fail with one clear line.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import export_csr  # noqa: E402
from csr import interop  # noqa: E402
from csr.checkpoint import load_model, save_checkpoint  # noqa: E402
from csr.cli import run  # noqa: E402
from csr.encode import encode_array  # noqa: E402
from csr.io import CSRError, atomic_save_npy, write_sidecar  # noqa: E402
from csr.knn import search  # noqa: E402
from csr.metrics import retrieval_metrics  # noqa: E402
from csr.model import CSR, CSRConfig, dense_code  # noqa: E402
from csr.train import TrainConfig, TrainData, train  # noqa: E402

import sentence_transformers  # noqa: E402,F401  (a hard requirement: a broken install fails here, never skips)
from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder  # noqa: E402

HIDDEN, K = 1536, 32
TOPICS = {
    0: ["The cat curled up on the warm windowsill and slept all afternoon.",
        "Dogs need a long walk every morning to stay healthy and calm.",
        "The parrot learned to imitate the sound of the doorbell.",
        "Our neighbour's rabbit escaped from its hutch during the storm.",
        "A stray kitten followed the children home from school.",
        "The veterinarian vaccinated the puppy against rabies.",
        "Goldfish can live for many years in a well-kept aquarium.",
        "The horse refused to jump the last fence of the course."],
    1: ["The central bank raised interest rates by a quarter point.",
        "Shares of the chip maker fell sharply after weak earnings.",
        "Inflation slowed for the third month in a row, easing pressure on households.",
        "The company announced a merger worth twelve billion dollars.",
        "Bond yields climbed as investors expected tighter monetary policy.",
        "The retailer cut its profit forecast for the coming quarter.",
        "Oil prices jumped after producers agreed to reduce output.",
        "The startup raised forty million dollars in a new funding round."],
    2: ["Heavy rain is expected across the north of the country tomorrow.",
        "A heatwave pushed temperatures above forty degrees in the south.",
        "Snow closed the mountain pass for the second day running.",
        "The hurricane weakened to a tropical storm before landfall.",
        "Morning fog will clear by noon, leaving a sunny afternoon.",
        "Strong winds knocked down power lines along the coast.",
        "The drought has left reservoirs at their lowest level in decades.",
        "Thunderstorms could bring hail and flash flooding this evening."],
    3: ["The striker scored twice in the final ten minutes of the match.",
        "The tennis champion retired after losing in the second round.",
        "The marathon was won in a new course record time.",
        "The home team clinched the league title with two games to spare.",
        "The goalkeeper saved a penalty in the shootout.",
        "The cyclist crashed on the descent but finished the stage.",
        "The coach was sacked after a run of six defeats.",
        "The swimmer broke the world record in the relay final."],
    4: ["Simmer the tomato sauce for twenty minutes before adding basil.",
        "Knead the dough until it is smooth and elastic.",
        "Roast the vegetables with olive oil, garlic and rosemary.",
        "Whisk the eggs with sugar until the mixture turns pale.",
        "Season the soup with salt, pepper and a squeeze of lemon.",
        "Let the bread cool completely before slicing it.",
        "Marinate the chicken overnight in yogurt and spices.",
        "Fold the whipped cream gently into the chocolate mousse."],
    5: ["The telescope captured images of a galaxy thirteen billion light years away.",
        "Researchers sequenced the genome of an ancient wheat variety.",
        "The probe entered orbit around Jupiter after a five-year journey.",
        "Physicists measured the mass of the neutrino with new precision.",
        "A new antibiotic was discovered in soil bacteria.",
        "The experiment confirmed a prediction of general relativity.",
        "Engineers tested a battery that charges in under five minutes.",
        "The fossil suggests feathered dinosaurs lived in the Arctic."],
}
TEXTS = [t for ts in TOPICS.values() for t in ts]
LABELS = np.array([c for c, ts in TOPICS.items() for _ in ts], dtype=np.int64)
BATCH = 16  # encode batch size shared by both sides, so the backbone sees identical batches


@pytest.fixture(scope="module")
def backbone():
    from sentence_transformers import SentenceTransformer
    path = interop.default_text_backbone()
    return path, SentenceTransformer(str(path), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone):
    """A tiny CSR (hidden 1536, k 32) trained on real MiniLM embeddings; the embedding file records its
    backbone, as the text pipeline's sidecar does."""
    bb_path, st_model = backbone
    root = tmp_path_factory.mktemp("interop")
    emb = st_model.encode(TEXTS, batch_size=BATCH, convert_to_numpy=True).astype(np.float32)
    emb_path = root / "train_emb.npy"
    atomic_save_npy(emb_path, emb)
    write_sidecar(emb_path, backbone=str(bb_path), n=len(emb), d=emb.shape[1], source="handwritten sentences")
    torch.manual_seed(0)
    model = CSR(CSRConfig(input_dim=emb.shape[1], hidden_size=HIDDEN, topk=K, auxk=64))
    train(model, TrainData(emb, LABELS), TrainConfig(batch_size=BATCH, epochs=2), root / "run",
          args={"pretrained_emb": str(emb_path)}, progress=False)
    ckpt = root / "run" / "csr.pt"
    model, _ = load_model(ckpt)
    return {"root": root, "ckpt": ckpt, "emb": emb, "model": model, "backbone": bb_path}


def our_dense(model, emb, k):
    idx, vals = model.encode(torch.from_numpy(emb), k)
    return dense_code(idx, vals, model.cfg.hidden_size)


def assert_same_codes(theirs: torch.Tensor, ours: torch.Tensor, k: int):
    theirs = theirs.to_dense() if theirs.is_sparse else theirs
    assert theirs.shape == ours.shape
    # non-vacuous: most rows really have k active units
    assert (ours != 0).sum(1).float().mean() > 0.9 * k
    assert torch.equal(theirs != 0, ours != 0), "different active units"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def st_forward(module, emb: np.ndarray, k: int | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return module({"sentence_embedding": torch.from_numpy(emb)}, max_active_dims=k)["sentence_embedding"]


# ----------------------------------------------------------------------------- export

def test_sparse_encoder_folder_gives_our_codes_for_real_texts(trained):
    from sentence_transformers import SparseEncoder
    out = trained["root"] / "encoder"
    info = interop.export_sparse_encoder(trained["ckpt"], None, out)
    # no --backbone: the backbone recorded in the embeddings' sidecar is used
    assert Path(info["backbone"]) == trained["backbone"]
    enc = SparseEncoder(str(out), device="cpu", local_files_only=True)
    assert enc.max_active_dims == K and enc.similarity_fn_name == "cosine"
    for k in (K, 8):  # the trained k and a smaller max_active_dims
        theirs = enc.encode(TEXTS, batch_size=BATCH, max_active_dims=k, convert_to_tensor=True)
        assert theirs.is_sparse
        assert_same_codes(theirs, our_dense(trained["model"], trained["emb"], k), k)
    assert (out / "README.md").read_text().count("max_active_dims=32") == 1


def test_module_folder_loads_in_sentence_transformers_and_matches(trained):
    out = trained["root"] / "module"
    interop.export_st_module(trained["ckpt"], out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    conf = json.loads((out / "config.json").read_text())
    assert conf == {"input_dim": 384, "hidden_dim": HIDDEN, "k": K, "k_aux": 64, "normalize": False,
                    "dead_threshold": 30}
    module = SparseAutoEncoder.load(str(out), local_files_only=True).eval()
    assert torch.equal(module.encoder.weight, trained["model"].encoder.weight)
    for k in (None, K, 5):
        assert_same_codes(st_forward(module, trained["emb"], k),
                          our_dense(trained["model"], trained["emb"], k or K), k or K)


def test_import_gives_identical_weights_and_the_same_retrieval(trained):
    interop.export_st_module(trained["ckpt"], trained["root"] / "module_imp")
    interop.export_sparse_encoder(trained["ckpt"], trained["backbone"], trained["root"] / "encoder_imp")
    ref = trained["model"].state_dict()
    emb, half = trained["emb"], len(TEXTS) // 2
    order = np.r_[0:len(TEXTS):2, 1:len(TEXTS):2]  # even rows = database, odd rows = queries
    emb, labels = emb[order], LABELS[order]

    def metrics_of(model):
        db = encode_array(model, emb[:half], labels=labels[:half], progress=False)
        q = encode_array(model, emb[half:], labels=labels[half:], progress=False)
        nn, _ = search(q, db, 10, progress=False)
        return nn, retrieval_metrics(nn, labels[:half], labels[half:], ks=(10,))

    ref_nn, ref_metrics = metrics_of(trained["model"])
    assert ref_metrics["top1"] > 100 / len(TOPICS)  # better than chance: real codes of real texts
    for name in ("module_imp", "encoder_imp"):
        ckpt = trained["root"] / f"{name}.pt"
        info = interop.import_folder(trained["root"] / name, ckpt)
        assert info["kind"] == ("module" if name == "module_imp" else "encoder")
        model, _ = load_model(ckpt)
        got = model.state_dict()
        assert set(got) == set(ref)
        for key in ref:
            assert torch.equal(got[key], ref[key]), key
        assert model.cfg == trained["model"].cfg
        nn, metrics = metrics_of(model)
        assert np.array_equal(nn, ref_nn) and metrics == ref_metrics


@pytest.mark.parametrize("normalize", [False, True])
def test_module_trained_in_sentence_transformers_imports_exactly(tmp_path, normalize):
    """A module as sentence-transformers itself saves it (weight stored under its tied alias), with non-zero
    biases and its input standardisation: our encode of the import equals their forward."""
    torch.manual_seed(1)
    module = SparseAutoEncoder(input_dim=48, hidden_dim=200, k=6, k_aux=32, normalize=normalize, dead_threshold=7)
    with torch.no_grad():
        module.pre_bias.normal_(0, 0.3)
        module.latent_bias.normal_(0, 0.1)
        module.stats_last_nonzero.random_(0, 50)
    (tmp_path / "theirs").mkdir()
    module.save(str(tmp_path / "theirs"))
    model = interop.from_pretrained(tmp_path / "theirs")
    assert model.cfg == CSRConfig(48, 200, topk=6, auxk=32, dead_threshold=7, tied=True, normalize=normalize)
    for key, t in module.state_dict().items():
        if not key.startswith("decoder."):
            assert torch.equal(model.state_dict()[key], t), key
    x = (torch.randn(40, 48) * 2 + 0.5).numpy()
    for k in (6, 3, 20):
        assert_same_codes(st_forward(module.eval(), x, k), our_dense(model, x, k), k)


def test_untied_checkpoint_refuses_export_and_leaves_nothing(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "untied.pt"
    save_checkpoint(ckpt, CSR(CSRConfig(16, 64, topk=4, tied=False)))
    for fn in (lambda: interop.export_st_module(ckpt, tmp_path / "m"),
               lambda: interop.export_sparse_encoder(ckpt, None, tmp_path / "e")):
        with pytest.raises(CSRError, match="untied.*tied decoder"):
            fn()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["untied.pt"]


def test_backbone_of_other_width_is_refused(tmp_path):
    ckpt = tmp_path / "d16.pt"
    save_checkpoint(ckpt, CSR(CSRConfig(16, 64, topk=4)))
    with pytest.raises(CSRError, match="384-d embeddings but the checkpoint expects input_dim=16"):
        interop.export_sparse_encoder(ckpt, interop.default_text_backbone(), tmp_path / "e")
    with pytest.raises(CSRError, match="not a sentence-transformers model folder"):
        interop.export_sparse_encoder(ckpt, tmp_path, tmp_path / "e")


def test_recorded_backbone(tmp_path):
    bb = interop.default_text_backbone()
    assert interop.recorded_backbone({"args": {"backbone": str(bb)}}) == bb
    assert interop.recorded_backbone({"args": {"backbone": str(tmp_path)}}) is None  # not an ST folder
    emb = tmp_path / "x_emb.npy"
    atomic_save_npy(emb, np.zeros((2, 3), np.float32))
    write_sidecar(emb, backbone=str(bb))
    assert interop.recorded_backbone({"args": {"pretrained_emb": str(emb)}}) == bb
    assert interop.recorded_backbone({"args": {"model_name": "resnet50"}}) is None
    # main_text.py style: a folder of splits whose sidecar names the sentence-transformers model
    atomic_save_npy(tmp_path / "text" / "train_emb.npy", np.zeros((2, 3), np.float32))
    write_sidecar(tmp_path / "text" / "train_emb.npy", model_path=str(bb))
    assert interop.recorded_backbone({"args": {"emb_dir": str(tmp_path / "text")}}) == bb
    # a checkpoint that names another (e.g. timm) backbone, or none at all after an import, never gets the
    # default text backbone silently; one that records nothing does
    with pytest.raises(CSRError, match="trained on embeddings of 'vit_small_patch16_224'.*--backbone"):
        interop.resolve_backbone({"args": {"model_name": "vit_small_patch16_224"}}, "c.pt", None)
    with pytest.raises(CSRError, match="imported checkpoint"):
        interop.resolve_backbone({"args": {"imported_from": "/x"}}, "c.pt", None)
    assert interop.resolve_backbone({"args": {}}, "c.pt", None) == bb
    assert interop.resolve_backbone({"args": {"model_name": "x"}}, "c.pt", tmp_path) == tmp_path


# ----------------------------------------------------------------------------- save_pretrained

def test_save_pretrained_round_trip_and_model_card(trained):
    root = trained["root"]
    metrics = root / "nn_metrics.json"
    metrics.write_text(json.dumps({"neighbors": "nn.npy", "n_queries": 24, "metrics": {"top1": 87.5, "mAP@10": 71.25}}))
    out = root / "hf"
    interop.save_pretrained(trained["ckpt"], out, eval_table=[metrics])
    # exactly what a hub push uploads: no temp files, no sidecar inside
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())  # not private temp-file modes
    assert not [p for p in root.iterdir() if p.name.startswith(".hf.")]
    model = interop.from_pretrained(out)
    assert model.cfg == trained["model"].cfg
    for key, t in trained["model"].state_dict().items():
        assert torch.equal(model.state_dict()[key], t), key
    conf = json.loads((out / "config.json").read_text())
    assert conf["topk"] == K and conf["hidden_size"] == HIDDEN and conf["steps"] == 6
    assert conf["backbone"] == str(trained["backbone"])
    card = (out / "README.md").read_text()
    side = json.loads((trained["ckpt"].with_suffix(".json")).read_text())
    assert f"```\n{side['command']}\n```" in card  # the training command
    assert "train_emb.npy" in card and "handwritten sentences" in card  # the data
    assert f"k = {K} of {HIDDEN}" in card and "dead latents" in card
    assert "| nn_metrics | 87.50 | 71.25 |" in card  # the evaluation table
    # an imported save_pretrained folder is our checkpoint again
    interop.import_folder(out, root / "hf_imported.pt")
    again, _ = load_model(root / "hf_imported.pt")
    assert torch.equal(again.encoder.weight, trained["model"].encoder.weight)


def test_save_pretrained_untied_and_overwrite(tmp_path):
    torch.manual_seed(0)
    m = CSR(CSRConfig(16, 64, topk=4, tied=False, normalize=True))
    ckpt = tmp_path / "u.pt"
    save_checkpoint(ckpt, m)
    out = tmp_path / "hf"
    interop.save_pretrained(ckpt, out)
    assert "No evaluation table was supplied." in (out / "README.md").read_text()
    back = interop.from_pretrained(out)
    assert torch.equal(back.decoder_weight, m.decoder_weight) and back.cfg == m.cfg
    with pytest.raises(CSRError, match="exists; pass --overwrite"):
        interop.save_pretrained(ckpt, out)
    with torch.no_grad():
        m.pre_bias.fill_(0.5)
    save_checkpoint(ckpt, m)
    interop.save_pretrained(ckpt, out, eval_table="| k | top1 |\n|---|---|\n| 4 | 50.00 |", overwrite=True)
    assert torch.equal(interop.from_pretrained(out).pre_bias, m.pre_bias)
    assert "| 4 | 50.00 |" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.json", "u.pt"]


def test_crash_while_writing_leaves_previous_folder(tmp_path, monkeypatch):
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, CSR(CSRConfig(16, 64, topk=4)))
    out = tmp_path / "hf"
    interop.save_pretrained(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        interop.save_pretrained(ckpt, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- corrupt / foreign folders

def _module_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    (tmp_path / "mod").mkdir()
    SparseAutoEncoder(input_dim=16, hidden_dim=64, k=4).save(str(tmp_path / "mod"))
    return tmp_path / "mod"


def _rewrite_weights(folder: Path, fn):
    from safetensors.torch import load_file, save_file
    save_file(fn(load_file(folder / "model.safetensors")), folder / "model.safetensors")


def _set_config(folder: Path, **kv):
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, **kv}))


CORRUPTIONS = {
    "missing config": (lambda f: (f / "config.json").unlink(), "no config.json or modules.json"),
    "config not json": (lambda f: (f / "config.json").write_text("{input_dim: 16"), "not valid JSON"),
    "foreign config": (lambda f: (f / "config.json").write_text('{"model_type": "bert", "hidden_size": 384}'),
                       "not a CSR, SparseAutoEncoder or SparseEncoder config"),
    "missing weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:300]),
                          "not a readable safetensors file"),
    "missing key": (lambda f: _rewrite_weights(f, lambda w: {k: v for k, v in w.items() if k != "latent_bias"}),
                    r"missing \['latent_bias'\]"),
    "extra key": (lambda f: _rewrite_weights(f, lambda w: {**w, "decoder_bias": torch.zeros(16)}),
                  r"unexpected \['decoder_bias'\]"),
    "other hidden dim": (lambda f: _set_config(f, hidden_dim=128), "has shape .* needs"),
    "other input dim": (lambda f: _set_config(f, input_dim=384), "has shape .* needs"),
    "k above hidden": (lambda f: _set_config(f, k=65), "topk must be in"),
    "non-integer dims": (lambda f: _set_config(f, hidden_dim="64"), "must be integers"),
    "nan weights": (lambda f: _rewrite_weights(f, lambda w: {**w, "pre_bias": torch.full((16,), float("nan"))}),
                    "NaN or Inf"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_module_folder_is_one_line_error(tmp_path, name):
    folder = _module_folder(tmp_path)
    corrupt, pattern = CORRUPTIONS[name]
    corrupt(folder)
    with pytest.raises(CSRError, match=pattern) as e:
        interop.import_folder(folder, tmp_path / "out.pt")
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    assert not (tmp_path / "out.pt").exists()


def test_foreign_and_broken_encoder_folders(tmp_path):
    # a plain sentence-transformers model (no SparseAutoEncoder) is not a CSR model
    with pytest.raises(CSRError, match="exactly one SparseAutoEncoder module"):
        interop.import_folder(interop.default_text_backbone(), tmp_path / "x.pt")
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "0_SparseAutoEncoder",
          "type": "sentence_transformers.sparse_encoder.modules.sparse_auto_encoder.SparseAutoEncoder"}]))
    with pytest.raises(CSRError, match="0_SparseAutoEncoder.*not found"):
        interop.import_folder(enc, tmp_path / "x.pt")
    (enc / "modules.json").write_text("[")
    with pytest.raises(CSRError, match="modules.json: not valid JSON"):
        interop.import_folder(enc, tmp_path / "x.pt")
    with pytest.raises(CSRError, match="model folder not found"):
        interop.import_folder(tmp_path / "nowhere", tmp_path / "x.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CSRError, match="empty: not a CSR, SparseAutoEncoder or SparseEncoder folder"):
        interop.import_folder(tmp_path / "empty", tmp_path / "x.pt")


def test_pretrained_folder_with_wrong_dims_is_refused(tmp_path):
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, CSR(CSRConfig(16, 64, topk=4)))
    interop.save_pretrained(ckpt, tmp_path / "hf")
    _set_config(tmp_path / "hf", input_dim=32)
    with pytest.raises(CSRError, match=r"'pre_bias' has shape \[16\] .* needs \[32\]"):
        interop.from_pretrained(tmp_path / "hf")


# ----------------------------------------------------------------------------- the script

def test_script_subcommands(tmp_path, capsys):
    torch.manual_seed(0)
    m = CSR(CSRConfig(16, 64, topk=4))
    with torch.no_grad():
        m.latent_bias.normal_(0, 0.1)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, m)
    export_csr.main(["export-st", "--ckpt", str(ckpt), "--out", str(tmp_path / "mod"), "--topk", "2"])
    assert json.loads((tmp_path / "mod" / "config.json").read_text())["k"] == 2
    assert json.loads((tmp_path / "mod.json").read_text())["kind"] == "module"
    export_csr.main(["import", "--folder", str(tmp_path / "mod"), "--out", str(tmp_path / "back.pt")])
    back, _ = load_model(tmp_path / "back.pt")
    assert torch.equal(back.latent_bias, m.latent_bias) and back.cfg.topk == 2
    export_csr.main(["save-pretrained", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    assert "wrote model folder" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # refusing to clobber: one line, exit code 2
        run(export_csr.main, ["save-pretrained", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
