"""bf16 encoder matmul (csr/precision.py), the optimised sparse step, and the fast label-free MRL loss, each
against a plain reference."""
import pytest
import torch
import torch.nn.functional as F

from csr import precision as P
from csr.baselines import MRLAdaptor, MRLConfig, similarity_preservation_loss
from csr.model import CSR, CSRConfig
from csr.train import TrainConfig, adam, make_scheduler, optimizer_step, step_losses


def make_model(precision="fp32", d=32, h=128, k=4, auxk=16, tied=True, seed=0):
    torch.manual_seed(seed)
    m = CSR(CSRConfig(input_dim=d, hidden_size=h, topk=k, auxk=auxk, tied=tied, precision=precision))
    with torch.no_grad():
        m.pre_bias.normal_(0, 0.1)
        m.latent_bias.normal_(0, 0.1)
    return m


def test_bf16_preactivation_is_the_fp32_one_within_bf16_rounding():
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 256), torch.randn(512, 256) / 16, torch.randn(512) * 0.1
    ref = F.linear(x, w, b)
    got = P.encoder_preactivation(x, w, b, "bf16").float()
    assert not torch.equal(got, ref)  # it really ran in bf16
    scale = float(ref.abs().max())
    assert torch.allclose(got, ref, atol=2e-2 * scale, rtol=0)
    assert torch.equal(P.encoder_preactivation(x, w, b, "fp32"), ref)


def test_bf16_topk_breaks_ties_by_lowest_unit_so_top_k_is_a_prefix_of_top_K():
    pre = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0, 2.0, 0.5]]).to(torch.bfloat16).repeat(3, 1)
    vals, idx = P.select_topk(pre, 5)
    assert idx[0].tolist() == [1, 2, 4, 3, 6] and vals[0].tolist() == [3, 3, 3, 2, 2]
    for k in range(1, 8):
        assert torch.equal(P.select_topk(pre, k)[1], idx[:, :k] if k <= 5 else P.select_topk(pre, 8)[1][:, :k])
    exclude = torch.tensor([False, True, False, False, True, False, False, False])
    _, aux = P.select_topk(pre.clone(), 2, exclude=exclude)
    assert aux[0].tolist() == [2, 3]
    neg = torch.tensor([[-2.0, -1.0, -1.0, -3.0]]).to(torch.bfloat16)  # negative ties: highest unit first
    assert P.select_topk(neg, 3)[1][0].tolist() == [2, 1, 0]


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_training_codes_are_the_encode_codes(tied):
    m = make_model("bf16", tied=tied)
    with torch.no_grad():  # exact ties between units: duplicated encoder rows and biases
        m.encoder.weight[10] = m.encoder.weight[3]
        m.latent_bias[10] = m.latent_bias[3]
    x = torch.randn(256, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    out = m(x, k=4, multi_k=16, dead=dead)
    idx, vals = m.encode(x, 4)
    assert torch.equal(out["idx"][:, :4], idx) and torch.equal(out["vals"][:, :4].detach(), vals)
    assert torch.equal(out["idx"], m.encode(x, 16)[0])
    # values are the exact fp32 pre-activations of the selected units
    exact = F.relu(F.linear(x - m.pre_bias, m.encoder.weight, m.latent_bias).gather(1, idx))
    assert torch.allclose(vals, exact, atol=1e-5)
    # the selection is the fp32 one up to near-ties: most codes agree as sets
    idx32, _ = m.encode(x, 4, precision="fp32")
    same = (idx.sort(1).values == idx32.sort(1).values).all(1).float().mean()
    assert same > 0.8


def test_bf16_step_gradients_match_fp32_within_bf16_tolerance():
    """On the same codes (ties excluded by construction), the bf16 step's loss and gradients are the fp32
    step's within bf16 rounding."""
    x = torch.randn(128, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    res = {}
    for prec in ("fp32", "bf16"):
        m = make_model(prec)
        out = m(x, k=4, multi_k=16, dead=dead)
        terms = step_losses(out, x, TrainConfig(), 128)
        terms["total"].backward()
        res[prec] = (out, float(terms["total"].detach()), {n: p.grad for n, p in m.named_parameters()})
    (o32, t32, g32), (o16, t16, g16) = res["fp32"], res["bf16"]
    same_rows = (o16["idx"] == o32["idx"]).all(1).float().mean()
    assert same_rows > 0.5
    assert t16 == pytest.approx(t32, rel=0.05)
    for n in g32:
        cos = F.cosine_similarity(g16[n].flatten(), g32[n].flatten(), dim=0)
        assert cos > 0.95, n


def test_precision_resolution_says_which_path_runs(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: "avx512_bf16")
    assert P.resolve_precision("auto", cpu)[0] == "bf16" and "AVX-512" in P.resolve_precision("auto", cpu)[1]
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: "")
    assert P.resolve_precision("auto", cpu)[0] == "fp32"
    chosen, line = P.resolve_precision("bf16", cpu)
    assert chosen == "bf16" and "emulated" in line
    assert P.resolve_precision("fp32", cpu)[0] == "fp32"


def test_every_trainer_the_encoder_and_the_sweep_take_the_precision_flag():
    import inference.csr_inference as inf
    import main_multimodal
    import main_text
    import main_visual
    import retrieval.sweep as sweep
    assert main_visual.build_parser().parse_args(["--pretrained_emb", "x.npy", "--precision", "bf16"]).precision == "bf16"
    assert sweep.build_parser().parse_args(["--train-emb", "a", "--eval-emb", "b", "--precision", "auto"]).precision == "auto"
    assert inf.build_parser().parse_args(["--csr_ckpt", "c.pt"]).precision is None  # the checkpoint's
    mm = main_multimodal.build_train_parser().parse_args(["--train-data", "s.tar", "--csr-precision", "bf16",
                                                         "--precision", "fp32"])
    assert mm.csr_precision == "bf16" and mm.precision == "fp32"
    assert main_text.build_parser().parse_args(["train", "--emb-dir", "e", "--precision", "bf16"]).precision == "bf16"


@pytest.mark.parametrize("tied", [True, False])
def test_fused_adam_steps_equal_per_op_adam_steps_to_float_rounding(tied):
    """The trainer's default fused Adam (`--fused-adam`) against torch's per-op Adam: the same 8 steps of the
    paper's loss (dead units, so AuxK runs) from the same weights give the same weights to float rounding."""
    torch.manual_seed(3)
    x = torch.randn(256, 32) + 0.5
    runs = {}
    for fused in (True, False):
        m = make_model(tied=tied)
        m.stats_last_nonzero[:40] = m.cfg.dead_threshold + 1
        cfg = TrainConfig(fused_adam=fused, wd=1e-4)
        opt = adam(cfg)(m)
        assert opt.defaults["fused"] is fused
        sched = make_scheduler(opt, cfg, 100)
        for _ in range(8):
            out = m(x, dead=m.dead_mask())
            optimizer_step(m, opt, sched, step_losses(out, x, cfg, m.cfg.hidden_size)["total"], out["idx"][:, :4])
        runs[fused] = m.state_dict()
    start = make_model(tied=tied).state_dict()
    for name, w in runs[True].items():
        if w.is_floating_point():
            assert not torch.equal(w, start[name]) or name == "latent_bias", name  # the steps moved it
            torch.testing.assert_close(w, runs[False][name], rtol=1e-5, atol=1e-6, msg=name)
    import main_visual
    assert main_visual.build_parser().parse_args(["--pretrained_emb", "x.npy", "--fused-adam", "False"]).fused_adam is False


def old_similarity_loss(z, x, dims):
    """The label-free MRL objective as first written: one normalised Gram matrix per prefix."""
    xn = F.normalize(x, dim=1)
    target = xn @ xn.T
    return sum(F.mse_loss(F.normalize(z[:, :d], dim=1) @ F.normalize(z[:, :d], dim=1).T, target) for d in dims)


def test_nested_gram_mrl_loss_equals_per_prefix_formula_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(48, 40)
    dims = [8, 16, 32, 40]
    z1 = torch.randn(48, 44, requires_grad=True)  # columns past the last prefix get no gradient
    z2 = z1.detach().clone().requires_grad_(True)
    fast, slow = similarity_preservation_loss(z1, x, dims), old_similarity_loss(z2, x, dims)
    assert torch.allclose(fast, slow, rtol=1e-5)
    fast.backward()
    slow.backward()
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-4, atol=1e-7)
    m = MRLAdaptor(40, MRLConfig(dims=tuple(dims)), None)
    want = old_similarity_loss(m(x), x, dims) + F.mse_loss(m.decoder(m(x)), x)
    assert torch.allclose(m.loss(x, None), want, rtol=1e-5)
