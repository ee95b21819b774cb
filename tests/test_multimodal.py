"""Multimodal CSR: open_clip + webdataset training, feature cache, zero-shot retrieval, bad input.

Runs on real-format fixtures (Fashion-MNIST images with TEMPLATED captions) and a tiny open_clip model with
random weights (no CLIP weights are reachable here): the tests check the code path and the numbers against
plain reference computations, not retrieval quality.
"""
import importlib.util
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main_multimodal
from csr import clip as clip_
from csr import multimodal as mm
from csr import webdata as wd
from csr import zeroshot as zs
from csr.checkpoint import load_model, save_checkpoint
from csr.codes import load_codes
from csr.io import CSRError
from csr.topk import topk_of_scores
from csr.model import CSR, CSRConfig, dense_code
from csr.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
README_COMMAND = ('torchrun --nproc_per_node=1 ./main_multimodal.py --train-data "shards-{0000..0575}.tar" '
                  '--train-num-samples N --dataset-type webdataset --precision amp --workers W --model ViT-B-16 '
                  '--pretrained dfn2b --epochs 5 --csr-topk 64 --csr-auxk 1024 --csr-cl_coef 1 --csr-hidden-size 2048 '
                  '--csr-input-dim 512 --batch-size 1024 --lr 4e-4 --wd 1e-4 --grad-clip-norm 1.0 --save-frequency 1')


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from csr.fmnist_captions import build_fixtures
    out = tmp_path_factory.mktemp("mm") / "fx"
    return build_fixtures(out, n_train=128, per_shard=32, n_eval=40, seed=0)


def train_args(fx, logs, *extra):
    return ["--train-data", fx["train_data"], "--model", fx["model"], "--pretrained", fx["pretrained"],
            "--csr-hidden-size", "64", "--csr-topk", "4", "--csr-auxk", "16", "--batch-size", "16",
            "--workers", "0", "--out", str(logs / "run"), "--device", "cpu", "--progress", "False",
            *extra]


def eval_args(fx, out, *extra, dataset="flickr30k"):
    root = fx["flickr30k_root"] if dataset == "flickr30k" else fx["coco_root"]
    return ["eval", "--dataset", dataset, "--dataset_root", root, "--task", "zeroshot_retrieval", "--model",
            fx["model"], "--pretrained", fx["pretrained"], "--output", str(out), "--batch_size", "32",
            "--recall_k", "1", "5", "10", "--device", "cpu", *extra]


# ----------------------------------------------------------------------------- recall@k

def test_recall_at_k_on_hand_made_scores():
    # 3 images; captions 0,1 -> image 0, captions 2,3,4 -> image 1, caption 5 -> image 2
    text_to_image = np.array([0, 0, 1, 1, 1, 2])
    S = np.array([[0.1, 0.9, 0.8, 0.0, 0.2, 0.3],    # image 0: caption 1 ranked first -> hit at 1
                  [0.7, 0.6, 0.1, 0.5, 0.2, 0.0],    # image 1: its first caption (3) is ranked third
                  [0.3, 0.2, 0.4, 0.1, 0.6, 0.5]],   # image 2: caption 5 ranked second
                 dtype=np.float32)
    i2t, _ = topk_of_scores(S, 6)
    t2i, _ = topk_of_scores(np.ascontiguousarray(S.T), 3)
    # caption 4 scores 0.2 with images 0 and 1: the tie goes to the lower index, so image 1 is third
    assert t2i[4].tolist() == [2, 0, 1]
    r = zs.recall_at_k(i2t, t2i, text_to_image, (1, 2, 3))
    assert r["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(200 / 3)
    assert r["image_to_text_R@3"] == pytest.approx(100.0)
    # caption ranks of their own image: 3, 1, 3, 1, 3, 1
    assert r["text_to_image_R@1"] == pytest.approx(50.0)
    assert r["text_to_image_R@2"] == pytest.approx(50.0)
    assert r["text_to_image_R@3"] == pytest.approx(100.0)


def naive_recall(img: np.ndarray, txt: np.ndarray, text_to_image: np.ndarray, ks) -> dict:
    """Full ranking by cosine with a stable sort (ties -> lower index); loops over queries."""
    S = img @ txt.T
    out = {}
    for k in ks:
        hits = [any(text_to_image[j] == i for j in np.argsort(-S[i], kind="stable")[:k]) for i in range(len(img))]
        out[f"image_to_text_R@{k}"] = 100.0 * np.mean(hits)
        hits = [text_to_image[j] in np.argsort(-S[:, j], kind="stable")[:k] for j in range(len(txt))]
        out[f"text_to_image_R@{k}"] = 100.0 * np.mean(hits)
    return out


def test_eval_csr_false_equals_plain_clip_cosine(fx, tmp_path):
    import open_clip
    from PIL import Image
    res = main_multimodal.main(eval_args(fx, tmp_path / "r.json", "--csr", "false"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["n_images"] == 40 and data["n_captions"] == 200  # the 4 "train" images are skipped
    # the same numbers straight from open_clip and a naive ranking
    open_clip.add_model_config(fx["model"])
    model, _, pre = open_clip.create_model_and_transforms("tiny-clip", pretrained=fx["pretrained"])
    model.eval()
    tok = open_clip.get_tokenizer("tiny-clip")
    ann = json.loads(Path(fx["flickr30k_root"], "dataset_flickr30k.json").read_text())
    test = [im for im in ann["images"] if im["split"] == "test"]
    imgs = torch.stack([pre(Image.open(Path(fx["flickr30k_root"], "flickr30k-images", im["filename"])).convert("RGB"))
                        for im in test])
    caps = [s["raw"] for im in test for s in im["sentences"]]
    owner = np.repeat(np.arange(len(test)), [len(im["sentences"]) for im in test])
    with torch.no_grad():
        fi = F.normalize(model.encode_image(imgs), dim=-1).numpy()
        ft = F.normalize(model.encode_text(tok(caps)), dim=-1).numpy()
    expected = naive_recall(fi, ft, owner, (1, 5, 10))
    got = {k: v for k, v in res["metrics"].items() if "_R@" in k}
    assert got == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------- webdataset stream

def write_numbered_shards(root: Path, n_shards: int = 4, per_shard: int = 10) -> list[str]:
    """Shards whose captions name their sample (`s17`); sample 3 of shard 0 has no caption."""
    import webdataset as wds
    from csr.fmnist_captions import jpeg_bytes
    img = jpeg_bytes(np.zeros((4, 4), np.uint8))
    paths = []
    for s in range(n_shards):
        paths.append(str(root / f"n-{s}.tar"))
        with wds.TarWriter(paths[-1]) as tw:
            for i in range(s * per_shard, (s + 1) * per_shard):
                tw.write({"__key__": f"{i:06d}", "jpg": img, **({} if i == 3 else {"txt": f"s{i}"})})
    return paths


def stream_captions(stream) -> list[list[str]]:
    return [caps for _, caps, _ in stream]


def test_shard_stream_partitions_shuffles_and_fills_epochs(tmp_path):
    shards = write_numbered_shards(tmp_path)
    pre = lambda im: torch.zeros(1)  # noqa: E731
    tok = lambda caps: list(caps)  # noqa: E731
    # one pass (feature caching): the two ranks read disjoint shards that cover every valid sample once
    seen = []
    for rank in (0, 1):
        st = wd.ShardStream(shards, pre, tok, 4, rank, 2, batches_per_worker=None, shuffle=False)
        seen.append([c for b in stream_captions(st) for c in b])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"s{i}" for i in range(40) if i != 3)
    # training: exactly batches_per_worker full batches per epoch (shards are re-read past one pass),
    # a different order in each epoch, the caption-less sample skipped and counted
    st = wd.ShardStream(shards, pre, tok, 8, 0, 1, batches_per_worker=7, shuffle=True, buffer=16, seed=1)
    e0 = stream_captions(st)
    skipped = sum(sk for _, _, sk in st)
    st.epoch = 1
    e1 = stream_captions(st)
    assert len(e0) == len(e1) == 7 and all(len(b) == 8 for b in e0 + e1)
    first = [int(c[1:]) for b in e0[:4] for c in b]
    assert e0 != e1 and first != sorted(first)  # shuffled within an epoch and between epochs
    assert "s3" not in {c for b in e0 + e1 for c in b} and skipped >= 1
    # more readers than shards: refused up front instead of leaving a reader without data
    with pytest.raises(CSRError, match="4 shards but 2 rank.*3 worker"):
        wd.check_readers(len(shards), 2, 3, resampled=False)


# ----------------------------------------------------------------------------- losses

def naive_infonce(a, b, scale):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    loss = 0.0
    for i in range(len(a)):
        li = scale * (a[i] @ b.T)
        lt = scale * (b[i] @ a.T)
        loss += -(li[i] - torch.logsumexp(li, 0)) - (lt[i] - torch.logsumexp(lt, 0))
    return loss / (2 * len(a))


def test_clip_infonce_matches_naive_and_code_variant_matches_dense_codes():
    torch.manual_seed(0)
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    assert float(mm.clip_infonce(a, b, 14.0)) == pytest.approx(float(naive_infonce(a, b, 14.0)), rel=1e-5)
    # one shared CSR on [images; texts]; InfoNCE on codes == CLIP InfoNCE on the dense top-k codes
    model = CSR(CSRConfig(input_dim=10, hidden_size=40, topk=4, auxk=8))
    x = torch.cat([a, b])
    out = model(x, k=4, multi_k=16)
    cfg = TrainConfig(cl="none", cl_coef=1.0)
    t_codes = mm.multimodal_losses(out, x, cfg, 40, 14.0, "codes")
    z = dense_code(out["idx"][:, :4], out["vals"][:, :4], 40).detach()
    assert float(t_codes["cl"].detach()) == pytest.approx(float(naive_infonce(z[:6], z[6:], 14.0)), rel=1e-5)
    t_rec = mm.multimodal_losses(out, x, cfg, 40, 14.0, "recon")
    rec = out["recon_k"].detach()
    assert float(t_rec["cl"].detach()) == pytest.approx(float(naive_infonce(rec[:6], rec[6:], 14.0)), rel=1e-5)
    # under bfloat16 autocast the InfoNCE stays float32 (at logit scale 100 bf16 logits are off by ~0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_amp = mm.multimodal_losses(out, x, cfg, 40, 100.0, "recon")
    assert float(t_amp["cl"].detach()) == pytest.approx(float(naive_infonce(rec[:6], rec[6:], 100.0)), rel=1e-5)
    # no dead units yet, so no AuxK: total = reconstruction + 1/8 * 4k reconstruction + gamma * InfoNCE
    mse = lambda p: float(F.mse_loss(p.detach(), x))  # noqa: E731
    expected = mse(out["recon_k"]) + mse(out["recon_multi"]) / 8 + float(t_rec["cl"].detach())
    assert float(t_rec["total"].detach()) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- training

def test_train_two_steps_writes_checkpoint_that_eval_loads(fx, tmp_path):
    summary = main_multimodal.main(train_args(fx, tmp_path, "--max-steps", "2", "--epochs", "3",
                                              "--csr-input-dim", "32"))
    ckpt_dir = tmp_path / "run"
    assert summary["steps"] == 2
    model, ckpt = load_model(ckpt_dir / "csr.pt")
    assert (model.cfg.input_dim, model.cfg.hidden_size, model.cfg.topk) == (32, 64, 4)
    assert ckpt["step"] == 2 and ckpt["clip"]["model"] == "tiny-clip" and (ckpt_dir / "epoch_1.pt").exists()
    torch.manual_seed(0)  # --seed 0: the weights the run started from
    init = CSR(CSRConfig(input_dim=32, hidden_size=64, topk=4, auxk=16))
    assert not torch.equal(init.encoder.weight, model.encoder.weight)  # the optimiser moved them
    res = main_multimodal.main(eval_args(fx, tmp_path / "r.json", "--csr", "true", "--csr_ckpt",
                                         str(ckpt_dir / "csr.pt"), "--topk", "2", "4", dataset="mscoco_captions"))
    assert [r["active_dims"] for r in res["results"]] == [2, 4]
    assert json.loads((tmp_path / "r.json").read_text())["results"] == res["results"]


def test_csr_retrieval_equals_naive_ranking_of_densified_codes():
    """The CSR recall path (codes, sparse engine, tie rule) against a naive full ranking of dense codes."""
    from csr.encode import encode_array
    rng = np.random.default_rng(0)
    img = rng.normal(size=(30, 32)).astype(np.float32)
    owner = np.repeat(np.arange(30), 5)
    txt = (img[owner] + 0.7 * rng.normal(size=(150, 32))).astype(np.float32)
    torch.manual_seed(0)
    model = CSR(CSRConfig(input_dim=32, hidden_size=64, topk=8, auxk=16))
    rows = zs.zero_shot_retrieval(img, txt, owner, (1, 5, 10), model, (4, 8))
    assert [r["active_dims"] for r in rows] == [4, 8]
    for row in rows:
        ci, ct = (encode_array(model, x, row["active_dims"], progress=False).to_dense(normalize=True).astype(np.float64)
                  for x in (img, txt))
        expected = naive_recall(ci, ct, owner, (1, 5, 10))
        assert {m: v for m, v in row.items() if "_R@" in m} == pytest.approx(expected, abs=1e-9)
    assert rows[0] != rows[1]  # k changes the codes, so the numbers


def test_feature_cache_equals_open_clip_on_the_shard_samples(fx, tmp_path):
    from PIL import Image
    clip = clip_.load_clip(fx["model"], fx["pretrained"], "cpu", "fp32")
    shards = wd.expand_shards(fx["train_data"])
    from csr.distributed import Runtime
    img, txt = wd.build_feature_cache(tmp_path / "cache", clip, shards, fx["train_data"], 16, 0, 40, Runtime(),
                                      progress=False)
    assert img.shape == (40, 32) and txt.shape == (40, 32)
    # the first 40 samples of the first two shards, read with tarfile and embedded directly
    members = {}
    for s in shards[:2]:
        with tarfile.open(s) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    keys = sorted({n.split(".")[0] for n in members})[:40]
    ims = torch.stack([clip.preprocess(Image.open(io.BytesIO(members[f"{k}.jpg"])).convert("RGB")) for k in keys])
    caps = [members[f"{k}.txt"].decode() for k in keys]
    with torch.no_grad():
        ref_i = F.normalize(clip.model.encode_image(ims), dim=-1).numpy()
        ref_t = F.normalize(clip.model.encode_text(clip.tokenizer(caps)), dim=-1).numpy()
    np.testing.assert_allclose(img, ref_i, atol=1e-5)
    np.testing.assert_allclose(txt, ref_t, atol=1e-5)
    # training from the cache (2 steps) and reusing it
    summary = main_multimodal.main(train_args(fx, tmp_path, "--feature-cache", str(tmp_path / "cache"),
                                              "--train-num-samples", "40", "--max-steps", "2"))
    assert summary["steps"] == 2
    # the checkpoint is a plain CSR checkpoint: the inference stage encodes the cached features with it
    spec = importlib.util.spec_from_file_location("csr_inference", ROOT / "inference" / "csr_inference.py")
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    inference.main(["--train_emb_path", str(tmp_path / "cache" / "image_emb.npy"), "--csr_ckpt",
                    str(tmp_path / "run" / "csr.pt"), "--out", str(tmp_path / "codes")])
    codes = load_codes(tmp_path / "codes" / "image_codes.npz")
    assert (codes.n, codes.k, codes.hidden_size) == (40, 4, 64)
    with pytest.raises(CSRError, match="another run"):
        main_multimodal.main(train_args(fx, tmp_path, "--feature-cache", str(tmp_path / "cache"),
                                        "--train-num-samples", "48", "--out", str(tmp_path / "other")))


def test_readme_command_parses_unchanged():
    # the issue writes N and W as placeholders for the sample count and the worker count; all else is verbatim
    argv = shlex.split(README_COMMAND.replace("--train-num-samples N", "--train-num-samples 2905954")
                       .replace("--workers W", "--workers 8"))
    assert argv[2] == "./main_multimodal.py"
    args = main_multimodal.build_train_parser().parse_args(argv[3:])
    assert args.train_data == "shards-{0000..0575}.tar" and args.dataset_type == "webdataset"
    assert args.precision == "amp" and args.model == "ViT-B-16" and args.pretrained == "dfn2b"
    assert (args.topk, args.auxk, args.cl_coef, args.hidden_size) == (64, 1024, 1.0, 2048)
    assert (args.csr_input_dim, args.epochs, args.batch_size, args.lr, args.wd) == (512, 5, 1024, 4e-4, 1e-4)
    assert (args.grad_clip, args.save_frequency) == (1.0, 1)
    assert (args.train_num_samples, args.workers, args.feature_cache, args.csr_cl_on) == (2905954, 8, None, "recon")


def test_shared_training_flags_and_the_papers_spellings_parse_alike():
    """One definition of the training flags (csr/cli.py): the shared names and the paper's multimodal names
    give the same arguments; the k annealing and resampling of the shared loop are reachable."""
    parse = main_multimodal.build_train_parser().parse_args
    paper = parse("--train-data x.tar --csr-topk 16 --csr-auxk 64 --csr-hidden-size 256 --csr-dead-threshold 5 "
                  "--csr-tied False --csr-cl_coef 0.5 --csr-auxk-coef 0.1 --csr-multi-k-coef 0.2 --csr-recon-loss nmse "
                  "--eps 1e-8 --lr-scheduler const --warmup 7 --grad-clip-norm 2 --batch-size 64 --resume latest".split())
    shared = parse("--train-data x.tar --topk 16 --auxk 64 --hidden-size 256 --dead_threshold 5 --tied False "
                   "--cl_coef 0.5 --auxk_coef 0.1 --multi-k-coef 0.2 --recon-loss nmse --adam-eps 1e-8 "
                   "--schedule constant --warmup-steps 7 --grad-clip 2 --batch-size 64 --resume".split())
    assert vars(paper) == vars(shared)
    assert (paper.schedule, paper.resume, paper.batch_size) == ("constant", True, 64)
    a = parse("--train-data x.tar --k-start 32 --k-anneal-fraction 0.7 --resample-every 14 --resume run/last.pt".split())
    assert (a.k_start, a.k_anneal_fraction, a.resample_every, a.resume) == (32, 0.7, 14, "run/last.pt")
    defaults = parse(["--train-data", "x.tar"])
    assert (defaults.topk, defaults.hidden_size, defaults.epochs, defaults.adam_eps, defaults.cl) == (64, 2048, 5, 1e-6, "pair")
    for bad, says in ((["--use_ddp", "True"], "DDP follows torchrun"), (["--cl", "self"], "--cl self"),
                      (["--recipe", "recommended"], "recipes")):
        with pytest.raises(CSRError, match=says):
            main_multimodal.main(["--train-data", "x.tar", *bad])


def test_no_training_flag_is_taken_by_torchrun():
    """torchrun's parser would swallow (or reject as ambiguous) a script flag that prefixes one of its own."""
    from torch.distributed.run import get_args_parser
    ours = [o for a in main_multimodal.build_train_parser()._actions for o in a.option_strings
            if o not in ("-h", "--help")]
    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    assert not [(m, t) for m in ours for t in theirs if t.startswith(m)]


def test_torchrun_two_processes_gloo(fx, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "main_multimodal.py"), *train_args(fx, tmp_path, "--batch-size", "16", "--max-steps", "2")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "world size 2, 16 pairs per step" in p.stdout
    model, ckpt = load_model(tmp_path / "run" / "csr.pt")
    assert ckpt["step"] == 2 and model.cfg.input_dim == 32


def test_tiny_clip_training_writes_weights_that_load_and_differ(fx):
    from csr.fmnist_captions import train_tiny_clip
    summary = train_tiny_clip(Path(fx["model"]).parent, steps=3, batch_size=16, progress=False)
    assert summary["steps"] == 3
    trained = clip_.load_clip(fx["model"], summary["weights"], "cpu", "fp32")
    random_init = clip_.load_clip(fx["model"], fx["pretrained"], "cpu", "fp32")
    w = trained.model.visual.conv1.weight
    assert w.shape == random_init.model.visual.conv1.weight.shape
    assert not torch.equal(w, random_init.model.visual.conv1.weight)


# ----------------------------------------------------------------------------- bad input

def test_missing_shards_and_shards_without_image_or_caption(fx, tmp_path):
    with pytest.raises(CSRError, match="2 of 2 shards do not exist"):
        main_multimodal.main(train_args(fx, tmp_path, "--train-data", str(tmp_path / "nope-{0..1}.tar")))
    bad = tmp_path / "bad-0.tar"
    with tarfile.open(bad, "w") as tar:
        for key in ("000000", "000001"):
            data = b"3"
            info = tarfile.TarInfo(f"{key}.cls")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CSRError, match=r"bad-0.tar: samples lack an image .* found extensions \['cls'\]"):
        main_multimodal.main(train_args(fx, tmp_path, "--train-data", str(bad)))


def test_caption_json_with_missing_images_names_them(fx, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(fx["coco_root"], root)
    victim = sorted((root / "val2014").iterdir())[3]
    victim.unlink()
    with pytest.raises(CSRError, match=f"1 of 40 images are missing .*{victim.name}"):
        zs.load_caption_set("mscoco_captions", root)


def test_input_dim_mismatch_and_checkpoint_of_another_width(fx, tmp_path):
    with pytest.raises(CSRError, match="--csr-input-dim 512 does not match the embedding width 32"):
        main_multimodal.main(train_args(fx, tmp_path, "--csr-input-dim", "512"))
    ckpt = tmp_path / "w16.pt"
    save_checkpoint(ckpt, CSR(CSRConfig(input_dim=16, hidden_size=64, topk=4)))
    with pytest.raises(CSRError, match="d=32 but the checkpoint expects input_dim=16"):
        main_multimodal.main(eval_args(fx, tmp_path / "r.json", "--csr_ckpt", str(ckpt)))


def test_hub_tag_without_weights_is_a_clear_error():
    with pytest.raises(CSRError, match="nothing is downloaded.*--pretrained /path/to/weights --force-quick-gelu"):
        clip_.load_clip("ViT-B-16", "dfn2b")


def test_multimodal_step_under_bf16_autocast_matches_fp32():
    """A multimodal step (shared CSR on [images; texts], InfoNCE on reconstructions or codes) runs under bf16
    autocast and gives the fp32 loss and gradients to 1e-4 relative."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    for cl_on in ("recon", "codes"):
        res = {}
        for amp in (False, True):
            torch.manual_seed(1)
            model = CSR(CSRConfig(input_dim=16, hidden_size=64, topk=4, auxk=8))
            dead = torch.arange(64) % 2 == 0
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x, k=4, multi_k=16, dead=dead)
                terms = mm.multimodal_losses(out, x, TrainConfig(cl="none", cl_coef=1.0), 64, 50.0, cl_on)
            terms["total"].backward()
            res[amp] = (float(terms["total"].detach()), {n: p.grad for n, p in model.named_parameters()})
        assert res[True][0] == pytest.approx(res[False][0], rel=1e-4), cl_on
        for n, g in res[False][1].items():
            assert torch.allclose(res[True][1][n], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), (cl_on, n)


def test_image_text_training_gets_k_annealing_and_resampling_from_the_shared_loop(tmp_path, monkeypatch):
    """train_multimodal is configuration around csr.train.train: the recipe's k annealing and dead-unit resampling
    (which the old image-text loop lacked) act on its steps."""
    import csr.train as T
    from csr.distributed import Runtime
    rng = np.random.default_rng(0)
    img = rng.normal(size=(256, 16)).astype(np.float32)
    txt = (img + 0.1 * rng.normal(size=img.shape)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ks: list[int] = []
    real = T.annealed_k
    monkeypatch.setattr(T, "annealed_k", lambda *a: ks.append(real(*a)) or ks[-1])
    cfg = TrainConfig(lr=1e-3, batch_size=32, epochs=2, cl="none", cl_coef=1.0, k_start=16, k_anneal_fraction=0.5,
                      resample_every=2, resample_until=0.9, amp=False)
    torch.manual_seed(0)
    model = CSR(CSRConfig(input_dim=16, hidden_size=256, topk=2, auxk=8))
    source = mm.CachedFeatures(img, txt, cfg.batch_size, 0, Runtime())
    summary = mm.train_multimodal(model, source, cfg, tmp_path, Runtime(), logit_scale=10.0, progress=False)
    assert len(ks) == 16 and ks[0] == 16 and ks[-1] == 2 and ks == sorted(ks, reverse=True)
    log = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(r["resampled_units"] for r in log) > 0  # most of 256 units idle with k = 2 of 32 pairs
    assert summary["steps"] == 16 and (tmp_path / "epoch_2.pt").exists()
