"""Image front end on real data: Fashion-MNIST (Debian package) -> ImageFolder -> FFCV -> embeddings with the real
ImageNet-pretrained EfficientNet-Lite0 at 112 px; sklearn's sample photos for the converted classifier."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_fashion_mnist
import stack_emb
from csr.backbones import Backbone, create_backbone, preprocess_from_config, read_state_dict
from csr.fashion_mnist import CLASS_NAMES, DEFAULT_SOURCE, load_split, select_per_class
from csr.images import FolderSource, scan_image_folder, subset_indices
from csr.io import CSRError
from csr.image_resize import resize_center_crop
from inference import pretrained_embeddings
from train import write_imagenet

ROOT = Path(__file__).resolve().parent.parent
PER_CLASS = 20  # 200 train + 200 val images
SIZE = 112


def imagenet_class_name(index: int) -> str:
    """Readable ImageNet-1k class name (timm's bundled synset list)."""
    from timm.data import ImageNetInfo
    return ImageNetInfo().index_to_description(index)


EMB = ["--weights", "efficientnet-lite0", "--img-size", str(SIZE), "--batch-size", "50", "--progress", "False"]



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def embed(argv):
    return pretrained_embeddings.main(EMB + list(map(str, argv)))


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm") / "fashion_mnist"
    prepare_fashion_mnist.main(["--out", str(root), "--subset", str(PER_CLASS), "--progress", "False"])
    return root


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(None, "efficientnet-lite0", SIZE)


@pytest.fixture(scope="module")
def folder_emb(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb_folder")
    embed(["--train_dir", tree / "train", "--eval_dir", tree / "val", "--out", out, "--workers", "2"])
    return out


# ----------------------------------------------------------------------------- preparation

def test_prepare_writes_deterministic_imagefolder_of_real_pixels(tree):
    for split in ("train", "val"):
        images, labels = load_split(DEFAULT_SOURCE, split)
        keep = select_per_class(labels, PER_CLASS)
        assert sorted(os.listdir(tree / split)) == sorted(CLASS_NAMES)
        for c, name in enumerate(CLASS_NAMES):
            files = sorted(os.listdir(tree / split / name))
            want = [i for i in keep if labels[i] == c]
            assert files == [f"{i:05d}.png" for i in want]  # the first N of the class, in file order
        i = int(keep[7])
        png = np.asarray(Image.open(tree / split / CLASS_NAMES[labels[i]] / f"{i:05d}.png"))
        np.testing.assert_array_equal(png, images[i])
    with pytest.raises(CSRError, match="exists"):
        prepare_fashion_mnist.main(["--out", str(tree), "--subset", "1"])
    assert not [p for p in tree.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert tree.stat().st_mode & 0o055 == 0o055 & ~_umask()  # readable by others like any mkdir


# ----------------------------------------------------------------------------- backbone and preprocessing

def test_converted_lite0_classifies_sample_photos():
    from sklearn.datasets import load_sample_images
    bb = create_backbone(None, "efficientnet-lite0")  # 224 px, the model's own config
    photos = load_sample_images()
    top = {}
    for name, img in zip(photos.filenames, photos.images):
        x = bb.preprocess.pil_transform()(Image.fromarray(img)).unsqueeze(0)
        probs = bb.logits(bb.preprocess.normalize(x)).softmax(-1)[0]
        top[Path(name).name] = [imagenet_class_name(int(i)) for i in probs.topk(5).indices]
    print("sample photos:", top)
    assert top["china.jpg"][0] in {"palace", "monastery", "bell cote, bell cot", "stupa, tope",
                                   "church, church building", "mosque"}
    assert {"palace", "monastery"} & set(top["china.jpg"])
    assert top["flower.jpg"][0] == "daisy"


def test_preprocessing_equals_timm_eval_transform(backbone):
    import timm.data
    from sklearn.datasets import load_sample_images
    cfg = timm.data.resolve_data_config({"input_size": (3, SIZE, SIZE)}, model=backbone.model)
    ref_tf = timm.data.create_transform(**cfg)
    for img in [load_sample_images().images[0], np.repeat(load_split(DEFAULT_SOURCE, "val")[0][0][..., None], 3, 2)]:
        pil = Image.fromarray(img)
        ours = backbone.preprocess.normalize(backbone.preprocess.pil_transform()(pil).unsqueeze(0))[0]
        torch.testing.assert_close(ours, ref_tf(pil), atol=1e-6, rtol=0)


def test_numba_resize_crop_equals_pil_pixel_for_pixel():
    rng = np.random.default_rng(0)
    cfg = {"input_size": (3, 224, 224), "crop_pct": 0.875, "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "interpolation": "bicubic"}
    shapes = [(28, 28), (37, 91), (500, 333), (300, 301), (17, 250), (427, 640)]
    for (h, w) in shapes:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[: h // 2] = img[: h // 2] // 4  # some structure, not only noise
        for size, crop in ((112, 0.875), (224, 0.95), (96, 1.0)):
            pp = preprocess_from_config({**cfg, "crop_pct": crop}, size)
            ref = pp.pil_transform()(Image.fromarray(img)).permute(1, 2, 0).numpy()
            out = np.zeros((size, size, 3), np.uint8)
            resize_center_crop(img, pp.resize, out)
            np.testing.assert_array_equal(out, ref, err_msg=f"{(h, w)} -> {size} crop {crop}")


def test_bad_model_name_and_weights(tmp_path, backbone):
    with pytest.raises(CSRError, match="did you mean.*resnet50d"):
        create_backbone("resnet50dd", str(tmp_path / "x.pt"))
    with pytest.raises(CSRError, match="unknown pretrained tag 'ra4' .*resnet50d.ra4_e3600_r224_in1k"):
        create_backbone("resnet50d.ra4", str(tmp_path / "x.pt"))
    sd = {k: v for k, v in backbone.model.state_dict().items() if not k.startswith("classifier")}
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CSRError, match=r"missing keys: classifier\.weight.*unexpected keys: extra\.weight"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "bad.pt"))
    with pytest.raises(CSRError, match="file not found"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CSRError, match="not a readable"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "junk.pt"))
    with pytest.raises(CSRError, match="--weights is required"):
        create_backbone(None, None)
    # A timm checkpoint of the model loads and reproduces the converted model (wrapped as {'state_dict': ...}).
    torch.save({"state_dict": backbone.model.state_dict()}, tmp_path / "good.pth")
    again = create_backbone("tf_efficientnet_lite0", str(tmp_path / "good.pth"), SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(again.features(x), backbone.features(x), rtol=0, atol=0)
    assert set(read_state_dict(tmp_path / "good.pth")) == set(backbone.model.state_dict())


def test_paper_backbone_runs_from_a_local_safetensors_file(tree, tmp_path):
    import timm
    from safetensors.torch import save_file
    model = timm.create_model("resnet50d.ra4_e3600_r224_in1k", pretrained=False)  # stands in for the hub file
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    small = tmp_path / "tree"
    for name in ("bag", "trouser"):
        (small / name).mkdir(parents=True)
        for f in sorted((tree / "val" / name).iterdir())[:3]:
            shutil.copy(f, small / name / f.name)
    res = pretrained_embeddings.main(["--train_dir", str(small), "--weights", str(tmp_path / "model.safetensors"),
                                      "--out", str(tmp_path / "out"), "--img-size", "64", "--progress", "False"])
    meta = json.loads((tmp_path / "out" / "train_meta.json").read_text())
    assert meta["backbone"] == "resnet50d.ra4_e3600_r224_in1k" and res[0].dim == 2048
    assert meta["preprocessing"]["crop_pct"] == 0.95 and meta["preprocessing"]["resize"] == 67  # floor(64 / 0.95)
    model.eval()
    pp = preprocess_from_config(model.pretrained_cfg, 64)
    x = torch.stack([FolderSource(small, pp).dataset[i][0] for i in (0, 5)])
    with torch.inference_mode():
        ref = model.forward_head(model.forward_features((x.float() / 255 - 0.5) / 0.5), pre_logits=True)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "train_emb.npy")[[0, 5]], ref.numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- embeddings

def test_frozen_graph_gives_the_eager_features_at_any_batch_size(tree, backbone):
    """`Backbone.freeze` (the extraction default on CPU) traces at batch 2; real images at other batch sizes give
    the eager model's features to float rounding of the BN-folded weights."""
    frozen = create_backbone(None, "efficientnet-lite0", SIZE, channels_last=True).freeze()
    assert frozen.graph is not None and frozen.describe()["frozen_graph"] and not backbone.describe()["frozen_graph"]
    src = FolderSource(str(tree / "val"), backbone.preprocess, flag="--eval_dir")
    for n in (1, 7, 33):
        x = backbone.preprocess.normalize(torch.stack([src.dataset[i][0] for i in range(n)]))
        eager, fast = backbone.features(x), frozen.features(x)
        assert fast.shape == eager.shape == (n, backbone.dim)
        np.testing.assert_allclose(fast.numpy(), eager.numpy(), rtol=1e-4, atol=1e-4)


def test_embeddings_give_1nn_accuracy_far_above_chance(folder_emb, backbone):
    tr, va = np.load(folder_emb / "train_emb.npy"), np.load(folder_emb / "val_emb.npy")
    ltr, lva = np.load(folder_emb / "train_labels.npy"), np.load(folder_emb / "val_labels.npy")
    assert tr.shape == (10 * PER_CLASS, backbone.dim) and tr.dtype == np.float32 and lva.dtype == np.int64
    tr, va = tr / np.linalg.norm(tr, axis=1, keepdims=True), va / np.linalg.norm(va, axis=1, keepdims=True)
    acc = float((ltr[(va @ tr.T).argmax(1)] == lva).mean())
    print(f"1-NN top-1 (database {len(tr)} train images, {len(va)} val queries): {acc:.3f} (chance 0.1)")
    assert acc > 0.6
    meta = json.loads((folder_emb / "val_meta.json").read_text())
    assert meta["n"] == len(va) and meta["d"] == backbone.dim and meta["backbone"] == "tf_efficientnet_lite0"
    assert meta["frozen_graph"]  # the CPU default; the rows below are compared with the eager model
    assert meta["preprocessing"]["resize"] == 128 and meta["weights"].endswith(".pth") and meta["command"]
    assert meta["source"]["classes"] == sorted(CLASS_NAMES)
    # The written rows are the backbone applied to the decoded images, in dataset order (naive reference).
    src = FolderSource(meta["source"]["path"], backbone.preprocess, flag="--eval_dir")
    items = [src.dataset[i] for i in (0, 57, 199)]
    ref = backbone.features(backbone.preprocess.normalize(torch.stack([it[0] for it in items]))).numpy()
    np.testing.assert_allclose(np.load(folder_emb / "val_emb.npy")[[0, 57, 199]], ref, rtol=1e-4, atol=1e-4)


def test_ffcv_path_agrees_with_imagefolder_path(tree, folder_emb, tmp_path):
    ref = np.load(folder_emb / "train_emb.npy")
    labels = np.load(folder_emb / "train_labels.npy")
    write_imagenet.main(["--data_dir", str(tree / "train"), "--write_path", str(tmp_path / "raw.beton"),
                         "--write_mode", "raw", "--num_workers", "2", "--verify_images", "False"])
    write_imagenet.main(["--data_dir", str(tree / "train"), "--write_path", str(tmp_path / "jpg.beton"),
                         "--write_mode", "jpg", "--jpeg_quality", "90", "--num_workers", "2", "--subset", "100",
                         "--verify_images", "False"])
    embed(["--train_data_ffcv", tmp_path / "raw.beton", "--out", tmp_path / "raw", "--workers", "2"])
    embed(["--train_data_ffcv", tmp_path / "jpg.beton", "--out", tmp_path / "jpg", "--workers", "2"])
    raw, jpg = np.load(tmp_path / "raw" / "train_emb.npy"), np.load(tmp_path / "jpg" / "train_emb.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "raw" / "train_labels.npy"), labels)
    sub = subset_indices(len(ref), 100)  # the images --subset 100 keeps, spread over all classes
    np.testing.assert_array_equal(np.load(tmp_path / "jpg" / "train_labels.npy"), labels[sub])
    assert len(set(labels[sub])) == 10
    # Raw pixels in the .beton: the FFCV decoder reproduces PIL's resize + crop exactly, so do the embeddings.
    np.testing.assert_allclose(raw, ref, rtol=0, atol=1e-5)
    # JPEG q90 on 28-px images changes the input itself; stated tolerance on the cosine of each pair.
    cos = cosine(jpg, ref[sub])
    others = cosine(ref, np.roll(ref, 1, axis=0))  # neighbouring rows: mostly the same class, other images
    print(f"JPEG q90 vs ImageFolder cosine: min {cos.min():.3f} median {np.median(cos):.3f}; "
          f"different images: median {np.median(others):.3f}")
    assert cos.min() > 0.6 and np.median(cos) > 0.9 and np.median(cos) > np.median(others) + 0.1
    side = json.loads((tmp_path / "jpg.json").read_text())
    assert side["classes"] == sorted(CLASS_NAMES) and side["images"] == len(sub)


def test_shards_merge_to_single_file_and_resume_after_crash(tree, folder_emb, tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    args = ["--train_dir", tree / "train", "--out", out, "--shard-size", "50", "--workers", "0"]
    real = Backbone.features
    calls = {"n": 0}

    def crashing(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(self, x)

    monkeypatch.setattr(Backbone, "features", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(args)
    sdir = out / "train_shards"
    assert sorted(p.name for p in sdir.glob("emb_*.npy")) == ["emb_00000.npy", "emb_00001.npy"]
    assert not list(sdir.glob(".*"))  # the shard in flight left no partial file
    done = {p.name: p.stat().st_mtime_ns for p in sdir.glob("emb_*.npy")}

    counted = {"n": 0}

    def counting(self, x):
        counted["n"] += len(x)
        return real(self, x)

    monkeypatch.setattr(Backbone, "features", counting)
    res = embed(args)
    assert counted["n"] == 100 and res[0].computed == 100  # only shards 2 and 3 were computed again
    assert {p: sdir.joinpath(p).stat().st_mtime_ns for p in done} == done
    merged = stack_emb.main(["--shard_dir", str(sdir)])
    assert merged == out.resolve() / "train_emb.npy"
    np.testing.assert_array_equal(np.load(merged), np.load(folder_emb / "train_emb.npy"))
    np.testing.assert_array_equal(np.load(out / "train_labels.npy"), np.load(folder_emb / "train_labels.npy"))
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["n"] == 200 and meta["shards"] == 4 and meta["backbone"] == "tf_efficientnet_lite0"
    # A finished run is not recomputed; other settings are refused.
    assert embed(args)[0].computed == 0
    with pytest.raises(CSRError, match="other settings.*preprocessing"):
        embed(args[:-2] + ["--workers", "0", "--img-size", "96"])


def test_stack_emb_rejects_inconsistent_shards(tmp_path):
    d = tmp_path / "x_shards"
    d.mkdir()
    np.save(d / "emb_00000.npy", np.ones((3, 4), np.float32))
    np.save(d / "labels_00000.npy", np.zeros(3, np.int64))
    np.save(d / "emb_00002.npy", np.ones((3, 4), np.float32))
    np.save(d / "labels_00002.npy", np.zeros(3, np.int64))
    with pytest.raises(CSRError, match=r"shards \[1\] missing"):
        stack_emb.main(["--shard_dir", str(d)])
    np.save(d / "emb_00001.npy", np.ones((3, 5), np.float32))
    np.save(d / "labels_00001.npy", np.zeros(3, np.int64))
    with pytest.raises(CSRError, match="emb_00001.npy: 5 dims but earlier shards have 4"):
        stack_emb.main(["--shard_dir", str(d)])
    np.save(d / "emb_00001.npy", np.ones((3, 4), np.float32))
    np.save(d / "labels_00001.npy", np.zeros(2, np.int64))
    with pytest.raises(CSRError, match="labels_00001.npy: 2 labels but the embeddings have 3 rows"):
        stack_emb.main(["--shard_dir", str(d)])
    np.save(d / "labels_00001.npy", np.arange(3, dtype=np.int64))
    np.save(d / "emb_00003.npy", np.ones((0, 4), np.float32))  # a shard whose images were all unreadable
    np.save(d / "labels_00003.npy", np.zeros(0, np.int64))
    out = stack_emb.main(["--shard_dir", str(d)])
    np.testing.assert_array_equal(np.load(tmp_path / "x_labels.npy"), [0, 0, 0, 0, 1, 2, 0, 0, 0])
    assert out.name == "x_emb.npy" and np.load(out).shape == (9, 4)
    with pytest.raises(CSRError, match="exists"):
        stack_emb.main(["--shard_dir", str(d)])


# ----------------------------------------------------------------------------- bad input

def test_corrupt_image_is_skipped_and_counted_or_fails_with_strict(tree, folder_emb, tmp_path, capsys):
    bad_tree = tmp_path / "tree"
    for name in ("coat", "sandal"):  # 2 classes x 10 images
        (bad_tree / name).mkdir(parents=True)
        for f in sorted((tree / "train" / name).iterdir())[:10]:
            shutil.copy(f, bad_tree / name / f.name)
    victim = sorted((bad_tree / "coat").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    out = tmp_path / "emb"
    res = embed(["--train_dir", bad_tree, "--out", out, "--workers", "2", "--batch-size", "8"])
    assert f"warning: skipping {victim}" in capsys.readouterr().err
    assert res[0].rows == 19 and len(res[0].skipped) == 1
    emb, labels = np.load(out / "train_emb.npy"), np.load(out / "train_labels.npy")
    # Reference: the same files' rows of the clean run over the whole tree.
    full, _ = scan_image_folder(tree / "train")
    row_of = {Path(p).relative_to(tree / "train"): i for i, (p, _) in enumerate(full)}
    kept = [(Path(p).relative_to(bad_tree), c) for p, c in scan_image_folder(bad_tree)[0] if p != str(victim)]
    ref = np.load(folder_emb / "train_emb.npy")[[row_of[r] for r, _ in kept]]
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(labels, [c for _, c in kept])
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["skipped"] == 1 and str(victim) in meta["skipped_files"][0]
    with pytest.raises(CSRError, match=f"{victim}: unreadable image"):
        embed(["--train_dir", bad_tree, "--out", tmp_path / "strict", "--workers", "0", "--strict"])
    # Writing FFCV: verification skips it (or --strict stops), the .beton holds the 19 readable images.
    write_imagenet.main(["--data_dir", str(bad_tree), "--write_path", str(tmp_path / "b.beton"),
                         "--num_workers", "2"])
    assert json.loads((tmp_path / "b.json").read_text())["images"] == 19
    with pytest.raises(CSRError, match=f"{victim}: unreadable image"):
        write_imagenet.main(["--data_dir", str(bad_tree), "--write_path", str(tmp_path / "c.beton"), "--strict"])
    assert not (tmp_path / "c.beton").exists()


def test_bad_inputs_give_one_line_errors(tree, folder_emb, tmp_path):
    cases = [
        (["--train_dir", tmp_path / "missing"], "image folder not found"),
        (["--train_dir", tmp_path / "noclass"], "no class sub-folders"),
        (["--train_data_ffcv", tmp_path / "nope.beton"], "FFCV file not found"),
        (["--train_data_ffcv", folder_emb / "train_emb.npy"], "not an FFCV .beton file"),
        (["--train_dir", tree / "train", "--eval_data_ffcv", tmp_path / "x.beton"], "not both"),
        (["--train_dir", tree / "train", "--model_name", "efficientnet_lite0"], "fits --model_name"),
        (["--train_dir", tree / "train", "--out", folder_emb], "train_emb.npy exists; pass --overwrite"),
    ]
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "noclass").mkdir()
    (tmp_path / "noclass" / "a.png").write_bytes(b"")
    cases.append((["--train_dir", tmp_path / "empty"], "no image files"))
    for argv, msg in cases:
        if "--out" not in argv:
            argv = argv + ["--out", tmp_path / "out"]
        with pytest.raises(CSRError, match=msg):
            embed(argv)
    # The script entry point prints one line and exits 2.
    r = subprocess.run([sys.executable, str(ROOT / "inference" / "pretrained_embeddings.py"), "--train_dir",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--weights", "efficientnet-lite0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --train_dir")


def test_write_imagenet_sh_writes_both_splits_from_train_and_from_root(tree, tmp_path):
    env = {**os.environ, "IMAGENET_DIR": str(tree), "WRITE_DIR": str(tmp_path / "ffcv"), "PYTHON": sys.executable}
    r = subprocess.run(["./write_imagenet.sh", "500", "0.50", "90", "--subset", "30", "--num_workers", "1"],
                       cwd=ROOT / "train", env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for split in ("train", "val"):
        path = tmp_path / "ffcv" / f"{split}_500_0.50_90.beton"
        assert str(path) in r.stdout and path.stat().st_size > 0
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["split"] == split and side["images"] == 30 and side["compress_probability"] == 0.5
        assert side["data_dir"] == str(tree / split) and len(side["classes"]) == 10
    # From the repository root the script finds write_imagenet.py beside itself (echo stands in for python).
    r = subprocess.run(["train/write_imagenet.sh", "500", "0.50", "90"], cwd=ROOT, capture_output=True, text=True,
                       env={**env, "PYTHON": "echo"})
    assert r.returncode == 0, r.stderr
    calls = [line.split() for line in r.stdout.splitlines() if "write_imagenet.py" in line]
    assert [Path(c[0]) for c in calls] == [ROOT / "train" / "write_imagenet.py"] * 2
    assert [c[c.index("--data_dir") + 1] for c in calls] == [str(tree / "train"), str(tree / "val")]
    r = subprocess.run(["train/write_imagenet.sh", "500", "0.50", "90"], cwd=ROOT, capture_output=True, text=True,
                       env={k: v for k, v in env.items() if k != "IMAGENET_DIR"})
    assert r.returncode != 0 and "IMAGENET_DIR" in r.stderr
