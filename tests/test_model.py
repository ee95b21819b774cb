"""The CSR model and losses against plain dense reference implementations."""
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csr import losses as L
from csr.model import CSR, CSRConfig, dense_code
from csr.train import TrainConfig, TrainData, annealed_k, step_losses, train


def make_model(d=24, h=96, k=4, auxk=16, tied=True, seed=0, normalize=False):
    torch.manual_seed(seed)
    m = CSR(CSRConfig(input_dim=d, hidden_size=h, topk=k, auxk=auxk, tied=tied, normalize=normalize))
    with torch.no_grad():  # non-zero biases so that bias handling is exercised
        m.pre_bias.normal_(0, 0.1)
        m.latent_bias.normal_(0, 0.1)
    return m


def test_codes_have_at_most_k_nonzeros_and_k_is_prefix_of_4k():
    m = make_model()
    x = torch.randn(64, 24)
    idx, vals = m.encode(x, 4)
    assert idx.shape == (64, 4) and (vals >= 0).all()
    z = dense_code(idx, vals, 96)
    assert ((z != 0).sum(1) <= 4).all()
    out = m(x, k=4, multi_k=16)
    assert torch.equal(out["idx"][:, :4], idx)
    assert torch.allclose(out["vals"][:, :4], vals, atol=1e-6)
    idx16, _ = m.encode(x, 16)
    assert torch.equal(out["idx"], idx16)


def test_tied_decoder_is_encoder_transpose_and_sparse_decode_matches_dense():
    m = make_model()
    assert m.W_dec.data_ptr() == m.encoder.weight.data_ptr()
    x = torch.randn(32, 24)
    idx, vals = m.encode(x, 8)
    z = dense_code(idx, vals, 96)
    expected = z @ m.encoder.weight + m.pre_bias
    assert torch.allclose(m.decode(idx, vals), expected, atol=1e-5)
    assert torch.allclose(m.decode_dense(z), expected, atol=1e-5)
    mu = make_model(tied=False)
    assert mu.decoder_weight is not None
    assert torch.allclose(mu.decoder_weight.norm(dim=1), torch.ones(96), atol=1e-5)
    idx, vals = mu.encode(x, 8)
    assert torch.allclose(mu.decode(idx, vals), dense_code(idx, vals, 96) @ mu.decoder_weight + mu.pre_bias, atol=1e-5)


def naive_step(m: CSR, x, k, multi_k, dead, cfg: TrainConfig):
    """The step written plainly: dense pre-activations with autograd, dense masks, dense decoder."""
    xp, info = m.preprocess(x)
    pre = (xp - m.pre_bias) @ m.encoder.weight.T + m.latent_bias
    def topk_dense(p, kk):
        v, i = torch.topk(p, kk, dim=-1)
        return torch.zeros_like(p).scatter(1, i, F.relu(v)), i
    z_k, i_k = topk_dense(pre, k)
    z_m, _ = topk_dense(pre, multi_k)
    dec = lambda z, bias=True: m._finish(z @ m.W_dec + (m.pre_bias if bias else 0), info)  # noqa: E731
    rec_k, rec_m = dec(z_k), dec(z_m)
    terms = {"recon_k": F.mse_loss(rec_k, x), "recon_multi": F.mse_loss(rec_m, x)}
    a = min(m.cfg.auxk, int(dead.sum()))
    if a:
        z_a, _ = topk_dense(pre.masked_fill(~dead, float("-inf")), a)
        aux = z_a @ m.W_dec
        if info is not None:
            aux = aux * (info[1] + 1e-5)
        target = (x - rec_k).detach()
        terms["auxk"] = F.mse_loss(aux, target) / ((target - target.mean(0)) ** 2).mean()
    u = F.normalize(z_k, dim=1)
    terms["cl"] = two_view_self_contrastive(u, cfg.temperature)
    terms["total"] = terms["recon_k"] + terms["recon_multi"] / 8 + cfg.auxk_coef * terms.get("auxk", 0) + cfg.cl_coef * terms["cl"]
    return terms


def two_view_self_contrastive(u, tau):
    """The reference code's formula: two identical views stacked (2B rows)."""
    B = u.shape[0]
    v = torch.cat([u, u])
    s = v @ v.T / tau
    loss = 0
    for i in range(2 * B):
        ip = (i + B) % (2 * B)
        others = [j for j in range(2 * B) if j % B != i % B]
        P = torch.exp(s[i, ip])
        N = torch.exp(s[i, others]).sum()
        loss = loss - torch.log(P / (P + N))
    return loss / (2 * B)


@pytest.mark.parametrize("tied,normalize,dead_every,aux_ratio", [
    (True, False, 3, 16), (False, False, 3, 16), (True, True, 3, 16),
    (True, False, 3, 1), (False, False, 3, 1), (True, True, 3, 1),
    (True, False, 8, 16), (False, True, 8, 16)])
def test_one_pass_step_equals_naive_dense_step_values_and_gradients(tied, normalize, dead_every, aux_ratio, monkeypatch):
    """dead_every=3: 32 dead units > auxk=16, an AuxK code over some dead units per row: dense over the dead units
    (`DENSE_AUXK_RATIO` 16, the default) or gathered pairs (ratio 1); 8: 12 dead units, all in every row's code."""
    import csr.model
    monkeypatch.setattr(csr.model, "DENSE_AUXK_RATIO", aux_ratio)
    cfg = TrainConfig()
    m = make_model(tied=tied, normalize=normalize)
    x = torch.randn(16, 24) * 2 + 0.5
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::dead_every] = True
    out = m(x, k=4, multi_k=16, dead=dead)
    fast = step_losses(out, x, cfg, 96)
    fast["total"].backward()
    g_fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    slow = naive_step(m, x, 4, 16, dead, cfg)
    slow["total"].backward()
    for name in ("recon_k", "recon_multi", "auxk", "cl", "total"):
        assert torch.allclose(fast[name], slow[name], rtol=1e-4, atol=1e-6), name
    for n, p in m.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, rtol=1e-3, atol=1e-6), n


def test_auxk_draws_only_on_dead_latents():
    m = make_model()
    x = torch.randn(32, 24)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:20]] = True
    out = m(x, k=4, dead=dead)
    assert out["aux_idx"].shape == (32, 16)
    assert dead[out["aux_idx"]].all()
    assert "aux_recon" not in m(x, k=4, dead=torch.zeros(96, dtype=torch.bool))


def test_dead_counter_advances_once_per_training_step_and_never_in_eval(tmp_path):
    m = make_model(d=16, h=64, k=2)
    with torch.no_grad():
        m.latent_bias[7] = -1e4  # unit 7 can never fire
    x = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    cfg = TrainConfig(batch_size=20, epochs=1, cl="none", bpre_init="zeros")
    train(m, TrainData(x), cfg, tmp_path, progress=False)
    assert int(m.stats_last_nonzero[7]) == 5  # 5 steps, one increment each (not 3 per step)
    assert int(m.stats_last_nonzero.min()) == 0
    before = m.stats_last_nonzero.clone()
    m.encode(torch.from_numpy(x))
    m(torch.from_numpy(x), dead=m.dead_mask())
    assert torch.equal(before, m.stats_last_nonzero)


def test_k_annealing_starts_wide_and_ends_at_k(tmp_path):
    assert [annealed_k(s, 8, 64, 8) for s in (0, 4, 8, 100)] == [64, 36, 8, 8]
    assert annealed_k(0, 8, 0, 8) == 8  # off
    m = make_model(d=16, h=64, k=2)
    x = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    seen, forward = [], m.forward
    m.forward = lambda *a, **kw: (seen.append(kw["k"]), forward(*a, **kw))[1]  # the k of every training step
    train(m, TrainData(x), TrainConfig(batch_size=20, epochs=2, cl="none", k_start=12, k_anneal_steps=6), tmp_path,
          progress=False)
    assert seen == [annealed_k(s, 2, 12, 6) for s in range(10)] and seen[0] == 12 and seen[-4:] == [2] * 4
    assert m.cfg.topk == 2 and m.encode(torch.from_numpy(x))[0].shape[1] == 2
    seen.clear()  # without --k-anneal-steps the annealing lasts --k-anneal-fraction of all 10 steps
    train(m, TrainData(x), TrainConfig(batch_size=20, epochs=2, cl="none", k_start=12, k_anneal_fraction=0.7),
          tmp_path / "fraction", progress=False)
    assert seen == [annealed_k(s, 2, 12, 7) for s in range(10)] and seen[6] > 2 and seen[7:] == [2] * 3


def test_self_contrastive_one_pass_equals_two_view_formula():
    torch.manual_seed(1)
    B, h, k = 12, 40, 5
    idx = torch.stack([torch.randperm(h)[:k] for _ in range(B)])
    vals = torch.rand(B, k, requires_grad=True)
    vals2 = vals.detach().clone().requires_grad_(True)
    one = L.self_contrastive(idx, vals, h, 0.2)
    two = two_view_self_contrastive(F.normalize(dense_code(idx, vals2, h), dim=1), 0.2)
    assert torch.allclose(one, two, rtol=1e-5)
    one.backward()
    two.backward()
    assert torch.allclose(vals.grad, vals2.grad, rtol=1e-4, atol=1e-7)


def test_label_contrastive_uses_same_label_positives():
    torch.manual_seed(2)
    B, h, k = 10, 30, 4
    idx = torch.stack([torch.randperm(h)[:k] for _ in range(B)])
    vals = torch.rand(B, k, requires_grad=True)
    vals2 = vals.detach().clone().requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 1])
    got = L.label_contrastive(idx, vals, labels, h, 0.5)
    u = F.normalize(dense_code(idx, vals2, h), dim=1)
    s = u @ u.T / 0.5
    per = []
    for i in range(B):
        pos = [j for j in range(B) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([s[i, j] for j in range(B) if j != i]), 0)
        per.append(-sum(s[i, p] - denom for p in pos) / len(pos))
    want = torch.stack(per).mean()
    assert torch.allclose(got, want, rtol=1e-5)
    got.backward()
    want.backward()
    assert torch.allclose(vals.grad, vals2.grad, rtol=1e-4, atol=1e-7)
    # codes identical within a class make the loss smaller than the same codes with labels shuffled
    cls_idx = torch.stack([torch.arange(k) * 7 + int(c) for c in labels])
    aligned = L.label_contrastive(cls_idx, torch.ones(B, k), labels, h, 0.2)
    shuffled = L.label_contrastive(cls_idx, torch.ones(B, k), labels[torch.tensor([2, 5, 0, 7, 1, 3, 9, 4, 6, 8])], h, 0.2)
    assert aligned < shuffled


def test_pair_contrastive_equals_dense_infonce():
    torch.manual_seed(3)
    B, h, k = 9, 30, 4
    ia = torch.stack([torch.randperm(h)[:k] for _ in range(B)])
    ib = torch.stack([torch.randperm(h)[:k] for _ in range(B)])
    va, vb = torch.rand(B, k, requires_grad=True), torch.rand(B, k, requires_grad=True)
    va2, vb2 = (v.detach().clone().requires_grad_(True) for v in (va, vb))
    got = L.pair_contrastive(ia, va, ib, vb, h, 0.2)
    ua, ub = F.normalize(dense_code(ia, va2, h), dim=1), F.normalize(dense_code(ib, vb2, h), dim=1)
    s = ua @ ub.T / 0.2
    t = torch.arange(B)
    want = (F.cross_entropy(s, t) + F.cross_entropy(s.T, t)) / 2
    assert torch.allclose(got, want, rtol=1e-5)
    (got + want).backward()
    assert torch.allclose(va.grad, va2.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(vb.grad, vb2.grad, rtol=1e-4, atol=1e-7)


def test_nmse_recon_loss_is_mse_over_batch_variance():
    m = make_model()
    x = torch.randn(32, 24) * 3
    out = m(x, k=4)
    a = step_losses(out, x, TrainConfig(cl="none"), 96)
    b = step_losses(out, x, TrainConfig(cl="none", recon_loss="nmse"), 96)
    var = x.var(0, unbiased=False).mean()
    assert math.isclose(float(b["recon_k"].detach()), float(a["recon_k"].detach() / var), rel_tol=1e-5)


# ----------------------------------------------------------------------------- mixed precision (CPU autocast)

def grads_of(m: CSR) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cl", ["self", "label", "none"])
@pytest.mark.parametrize("tied", [True, False])
def test_bf16_autocast_step_selects_fp32_codes_and_matches_fp32_gradients(cl, tied):
    """Under bf16 autocast (the CUDA default) a step runs, picks exactly the fp32 top-k, and its loss and
    gradients agree with the fp32 step to 1e-4 relative (the sparse part runs in fp32; only loss ops autocast)."""
    m = make_model(d=32, h=128, k=4, auxk=16, tied=tied)
    x = torch.randn(64, 32)
    labels = torch.randint(0, 5, (64,))
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    cfg = TrainConfig(cl=cl, cl_coef=0.5)
    res = {}
    for amp in (False, True):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(x, k=4, multi_k=16, dead=dead)
            terms = step_losses(out, x, cfg, 128, labels)
        terms["total"].backward()
        res[amp] = (out, {k: float(v.detach()) for k, v in terms.items()}, grads_of(m))
    (o32, t32, g32), (o16, t16, g16) = res[False], res[True]
    assert torch.equal(o16["idx"], o32["idx"]) and torch.equal(o16["aux_idx"], o32["aux_idx"])
    assert torch.equal(o16["idx"][:, :4], m.encode(x, 4)[0])  # training codes are the inference codes
    assert o16["vals"].dtype == torch.float32 and o16["recon_k"].dtype == torch.float32
    for name in t32:
        assert t16[name] == pytest.approx(t32[name], rel=1e-4, abs=1e-7), name
    assert g16.keys() == g32.keys()
    for name in g32:
        assert torch.allclose(g16[name], g32[name], rtol=1e-4, atol=1e-6 * float(g32[name].abs().max())), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, vals = m.encode(x, 4)
    assert vals.dtype == torch.float32 and torch.equal(idx, o32["idx"][:, :4])


def test_visual_trainer_with_amp_matches_fp32_run(tmp_path, monkeypatch):
    """The training loop's AMP path (enabled on CPU for the test) ends within 1e-4 of the fp32 run's weights."""
    import csr.train as T
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    runs = {}
    for amp in (False, True):
        monkeypatch.setattr(T, "AMP_DEVICE_TYPES", ("cuda", "cpu") if amp else ("cuda",))
        m = make_model(d=16, h=64, k=2, auxk=8)
        seen = []
        fwd = m.forward
        m.forward = lambda *a, **kw: (seen.append(torch.is_autocast_enabled("cpu")), fwd(*a, **kw))[1]
        train(m, TrainData(x), TrainConfig(batch_size=50, epochs=2, cl="self", amp=True), tmp_path / str(amp),
              progress=False)
        assert seen == [amp] * 8  # autocast really was on (or off) around every step
        runs[amp] = m.state_dict()
    for name, v in runs[False].items():
        if v.dtype.is_floating_point:
            assert torch.allclose(runs[True][name], v, rtol=1e-4, atol=1e-5), name
        else:
            assert torch.equal(runs[True][name], v), name


def test_what_counts_as_a_unit_firing():
    """Pinned definitions (issue 12 §5). Training deadness: a unit fires in a step when it is SELECTED in some
    row's top-k, even if ReLU makes its value 0 (the reference counts non-zero values only). The dataset dead
    fraction of a trained model (`dead_fraction`, the sweep's and README's 'dead latents'): a unit is alive when
    it has a NON-ZERO value in some code (zero values are padding)."""
    from csr.encode import dead_fraction, encode_array, unit_usage
    from csr.train import optimizer_step
    model = CSR(CSRConfig(input_dim=2, hidden_size=4, topk=2, auxk=0, dead_threshold=1))
    with torch.no_grad():
        model.encoder.weight.copy_(torch.tensor([[1.0, 0.0], [-0.5, 0.0], [-1.0, 0.0], [-2.0, 0.0]]))
        model.latent_bias.zero_()
    x = torch.tensor([[1.0, 0.0]])  # pre-activations 1, -0.5, -1, -2: units 0 and 1 are selected, 1 with value 0
    idx, vals = model.encode(x, 2)
    assert idx.tolist() == [[0, 1]] and vals.tolist() == [[1.0, 0.0]]
    model.stats_last_nonzero.fill_(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    optimizer_step(model, opt, sched, (model.encoder.weight * 0).sum(), idx)
    assert model.stats_last_nonzero.tolist() == [0, 0, 6, 6]  # selected = fired, zero value or not
    assert model.dead_mask().tolist() == [False, False, True, True]
    codes = encode_array(model, x.numpy(), 2, progress=False)
    assert unit_usage(codes).tolist() == [1, 0, 0, 0] and dead_fraction(codes) == 0.75  # non-zero = fired


# ----------------------------------------------------------------------------- unit-usage remedies

def test_data_init_puts_every_unit_in_some_topk_code():
    """Encoder rows = centred unit-norm training rows: by Cauchy-Schwarz each unit is the top-1 of its own row,
    so on the init data every unit fires; torch's random init on the same un-centred data leaves most dead."""
    from csr.encode import dead_fraction, encode_array
    from csr.remedies import init_encoder_from_data, init_pre_bias
    rng = np.random.default_rng(0)
    x = (np.abs(rng.normal(size=(400, 16))) + 3.0).astype(np.float32)  # non-negative, large common mean
    for tied in (True, False):
        m = make_model(d=16, h=128, k=2, tied=tied)
        init_pre_bias(m, x, "mean", 0)
        init_encoder_from_data(m, x, 0)
        assert dead_fraction(encode_array(m, x, 2, progress=False)) == 0.0
        scale = 1 / math.sqrt(2) if tied else 1 / 2  # k = 2 units share the reconstruction
        assert torch.allclose(m.encoder.weight.norm(dim=1), torch.full((128,), scale), atol=1e-5)
        assert torch.allclose(m.W_dec.norm(dim=1), torch.full((128,), scale if tied else 1.0), atol=1e-5)
        assert torch.allclose(m.W_dec / m.W_dec.norm(dim=1, keepdim=True),
                              m.encoder.weight / m.encoder.weight.norm(dim=1, keepdim=True), atol=1e-6)
        assert float(m.latent_bias.abs().max()) == 0.0
    random = make_model(d=16, h=128, k=2)
    with torch.no_grad():
        random.pre_bias.zero_()
        random.latent_bias.zero_()
    assert dead_fraction(encode_array(random, x, 2, progress=False)) > 0.5


def test_untied_decoder_step_removes_the_parallel_gradient_and_keeps_unit_norm():
    from csr.remedies import remove_parallel_decoder_grad
    from csr.train import optimizer_step
    m = make_model(d=12, h=48, k=3, tied=False)
    x = torch.randn(32, 12)
    loss = step_losses(m(x, dead=m.dead_mask()), x, TrainConfig(cl="none"), 48)["total"]
    loss.backward()
    g = m.decoder_weight.grad.clone()
    remove_parallel_decoder_grad(m)
    w = m.decoder_weight.detach()
    assert float(g.norm()) > 0 and float((m.decoder_weight.grad * w).sum(1).abs().max()) < 1e-6
    assert torch.allclose(m.decoder_weight.grad, g - (g * w).sum(1, keepdim=True) * w, atol=1e-7)
    # a full update: rows stay on the unit sphere (renormalised after the step, which is now second order)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = m.decoder_weight.detach().clone()
    loss = step_losses(m(x, dead=m.dead_mask()), x, TrainConfig(cl="none"), 48)["total"]
    optimizer_step(m, opt, sched, loss, m.encode(x)[0])
    assert torch.allclose(m.decoder_weight.norm(dim=1), torch.ones(48), atol=1e-6)
    assert not torch.equal(before, m.decoder_weight)


def test_recommended_v1_recipe_leaves_fewer_dead_units_on_real_pixels(tmp_path):
    """Fashion-MNIST pixels (non-negative, large common mean, like CNN features), the same number of steps:
    the paper's recipe leaves most units dead; each remedy alone leaves fewer, the recommended-v1 recipe (all of them) fewest."""
    from csr.encode import dead_fraction, encode_array
    from csr.fashion_mnist import DEFAULT_SOURCE, load_split
    from csr.recipes import apply_recipe
    xs, _ = load_split(DEFAULT_SOURCE, "train")
    x = (xs[:3000].reshape(3000, -1) / 255.0).astype(np.float32)
    base = (CSRConfig(input_dim=784, hidden_size=1024, topk=8, auxk=128), TrainConfig(batch_size=500, epochs=4))
    variants = {"paper": base, "recommended": apply_recipe("recommended-v1", *base, x),
                "geometric median": (base[0], replace(base[1], bpre_init="geometric_median")),
                "resampling": (base[0], replace(base[1], resample_every=6, resample_until=0.9))}
    assert variants["recommended"][0].hidden_size == 750  # the recipe's cap: 3000 rows / 4
    dead = {}
    for name, (mcfg, tcfg) in variants.items():
        torch.manual_seed(0)
        m = CSR(mcfg)
        summary = train(m, TrainData(x), tcfg, tmp_path / name, progress=False)
        assert summary["steps"] == 24
        dead[name] = dead_fraction(encode_array(m, x, 8, progress=False))
    assert dead["paper"] > 0.5, dead
    assert dead["recommended"] < dead["paper"] / 4, dead
    assert dead["geometric median"] < dead["paper"] and dead["resampling"] < dead["paper"], dead


def test_recipe_adapts_to_the_sign_and_number_of_training_rows():
    """Non-negative rows get the centring / untied branch, signed rows the paper's with no contrastive term; the
    hidden size is capped at one unit per 4 rows unless --hidden-size was given; `paper` changes nothing."""
    from csr.recipes import apply_recipe
    rng = np.random.default_rng(0)
    mcfg, tcfg = CSRConfig(input_dim=384, hidden_size=1536, topk=8), TrainConfig()
    signed = rng.normal(size=(1600, 384)).astype(np.float32)
    nonneg = np.abs(signed)
    m, t = apply_recipe("recommended-v1", mcfg, tcfg, nonneg)
    assert m.hidden_size == 400 and not m.tied and t.bpre_init == "geometric_median" and t.cl == "self"
    assert t.recon_loss == "nmse" and t.resample_every > 0
    m, t = apply_recipe("recommended-v1", mcfg, tcfg, signed)
    assert m.hidden_size == 400 and m.tied and t.bpre_init == "zeros" and t.cl == "none" and t.resample_every == 0
    big = np.abs(rng.normal(size=(60000, 8)).astype(np.float32))
    assert apply_recipe("recommended-v1", mcfg, tcfg, big)[0].hidden_size == 1536  # 4·d is already below rows / 4
    assert apply_recipe("recommended-v1", mcfg, tcfg, nonneg, hidden_fixed=True)[0].hidden_size == 1536
    assert apply_recipe("paper", mcfg, tcfg, signed) == (mcfg, tcfg)
    from csr.recipes import RECIPE_ROWS, RECIPES
    assert set(RECIPES) == {"paper", *RECIPE_ROWS}  # every recipe has a result row in the sweep / text demo
    m, t = apply_recipe("recommended-v1+labels", mcfg, tcfg, signed[:100])
    assert m.hidden_size == 32 and t.cl == "label" and t.cl_coef == 1.0  # at least 4·k units


def test_renamed_recipes_still_work_and_too_few_rows_for_a_sparse_code_is_an_error(capsys):
    """`adaptive` is the recommended recipe's earlier name: the same configs, one warning line. A recipe that would
    leave no more units than k (5 rows at k = 8) refuses, naming the recipe, rows and k."""
    from csr.io import CSRError
    from csr.recipes import apply_recipe
    rng = np.random.default_rng(0)
    mcfg, tcfg = CSRConfig(input_dim=16, hidden_size=64, topk=2), TrainConfig()
    x = np.abs(rng.normal(size=(400, 16))).astype(np.float32)
    assert apply_recipe("adaptive", mcfg, tcfg, x) == apply_recipe("recommended", mcfg, tcfg, x)
    assert apply_recipe("adaptive+labels", mcfg, tcfg, x) == apply_recipe("recommended+labels", mcfg, tcfg, x)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --recipe adaptive is now called recommended (same recipe)",
                   "warning: --recipe adaptive+labels is now called recommended+labels (same recipe)"]
    assert apply_recipe("recommended-v1", mcfg, tcfg, x) != apply_recipe("recommended", mcfg, tcfg, x)
    for recipe in ("recommended", "recommended+labels"):
        with pytest.raises(CSRError, match=rf"--recipe {re.escape(recipe)}: 8 units from 5 training rows at k=8"):
            apply_recipe(recipe, replace(mcfg, topk=8), tcfg, x[:5])


def test_resampled_units_fire_on_the_inputs_they_were_moved_to():
    """Idle units are moved onto badly reconstructed inputs: each then enters the top-k code of its input, its
    Adam moments and idle counter restart, and nothing else changes."""
    from csr.remedies import resample_dead_units
    for tied in (True, False):
        m = make_model(d=64, h=256, k=4, tied=tied)
        x = torch.randn(96, 64)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        step_losses(m(x, dead=m.dead_mask()), x, TrainConfig(cl="none"), 256)["total"].backward()
        opt.step()
        idle = torch.zeros(256, dtype=torch.bool)
        idle[::8] = True  # 32 idle units
        with torch.no_grad():
            m.stats_last_nonzero[idle] = 50
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        moments = {id(p): opt.state[p]["exp_avg"].clone() for p in m.parameters()}
        err_before = (x - m.decode(*m.encode(x))).pow(2).sum(1)
        units, rows = resample_dead_units(m, opt, x, 4, 30, torch.Generator().manual_seed(0))
        assert torch.equal(units, idle.nonzero().flatten()) and len(set(rows.tolist())) == 32
        idx, _ = m.encode(x[rows], 4)
        assert bool((idx == units[:, None]).any(1).all())  # every moved unit is in its input's top-k code
        assert float(err_before[rows].mean()) > float(err_before.mean())  # drawn by squared residual
        assert int(m.stats_last_nonzero[idle].max()) == 0 and int(m.stats_last_nonzero[~idle].min()) == 0
        for p in m.parameters():
            if p.shape[0] == 256:
                assert float(opt.state[p]["exp_avg"][idle].abs().max()) == 0.0
                assert torch.equal(opt.state[p]["exp_avg"][~idle], moments[id(p)][~idle])
        for n, p in m.named_parameters():
            if p.shape[0] == 256:
                assert torch.equal(p[~idle], before[n][~idle]) and not torch.equal(p[idle], before[n][idle])
        if not tied:
            assert torch.allclose(m.decoder_weight[idle].norm(dim=1), torch.ones(32), atol=1e-5)
        assert resample_dead_units(m, opt, x, 4, 30)[0].numel() == 0  # nobody idle any more


def test_trained_model_reports_units_dead_on_the_training_rows(tmp_path):
    """Log, sidecar and summary carry the fraction of units in no code of the training rows, equal to the
    dataset rule applied to the stored codes (and to a sample of rows when there are more than max_rows)."""
    import json
    from csr.encode import dead_fraction, dead_fraction_on_rows, encode_array
    m = make_model(d=16, h=64, k=2)
    with torch.no_grad():
        m.latent_bias[:20] = -1e4  # 20 units can never fire
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    summary = train(m, TrainData(x), TrainConfig(batch_size=100, epochs=1, cl="none"), tmp_path, progress=False)
    expected = dead_fraction(encode_array(m, x, 2, progress=False))
    assert expected >= 20 / 64 and summary["dead_fraction_rows"] == pytest.approx(expected)
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["dead_fraction_rows"] == pytest.approx(expected)
    assert json.loads((tmp_path / "csr.json").read_text())["final_stats"]["dead_fraction_rows"] == pytest.approx(expected)
    frac, used = dead_fraction_on_rows(m, x, max_rows=50, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(300, 50, replace=False))
    assert used == 50 and frac == pytest.approx(dead_fraction(encode_array(m, x[rows], 2, progress=False)))


def test_label_contrastive_is_repeatable_to_the_bit():
    """Per-class code sums and their gradient add in a fixed order (scatter-adds with atomics did not: the same
    step gave different gradients from run to run on 2 CPU threads)."""
    g = torch.Generator().manual_seed(0)
    B, h, k = 4096, 5120, 8
    idx = torch.argsort(torch.rand(B, h, generator=g), dim=1)[:, :k]
    vals, labels = torch.rand(B, k, generator=g), torch.randint(0, 10, (B,), generator=g)
    runs = []
    for _ in range(3):
        v = vals.clone().requires_grad_(True)
        loss = L.label_contrastive(idx, v, labels, h)
        loss.backward()
        runs.append((loss.detach(), v.grad))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_a_resampled_row_is_never_longer_than_the_longest_live_row():
    """Where an input's residual is almost orthogonal to the input, the scale that puts a moved unit into its top-k
    is huge (1.1 x the k-th pre-activation over a tiny projection): the moved encoder row is capped at the longest
    live row's norm, tied or untied (uncapped, an untied adaptive model on 60k Fashion-MNIST rows diverged to a
    reconstruction loss of 1e9)."""
    from csr.remedies import resample_dead_units
    for tied in (True, False):
        m = make_model(d=64, h=256, k=4, tied=tied)
        x = torch.randn(96, 64)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        idle = torch.zeros(256, dtype=torch.bool)
        idle[::8] = True
        with torch.no_grad():
            m.stats_last_nonzero[idle] = 50
            xp = m.preprocess(x)[0]
            centred = xp - m.pre_bias
            v = torch.randn_like(xp)
            v -= (v * centred).sum(1, keepdim=True) / centred.pow(2).sum(1, keepdim=True) * centred
            m.decode = lambda idx, vals: xp - v  # every residual v is orthogonal to its centred input
            longest = float(m.encoder.weight[~idle].norm(dim=1).max())
            units, _ = resample_dead_units(m, opt, x, 4, 30, torch.Generator().manual_seed(0))
        assert units.numel() == 32
        assert float(m.encoder.weight[idle].norm(dim=1).max()) <= longest * (1 + 1e-5)
