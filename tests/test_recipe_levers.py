"""Mechanisms of the recipe levers of issue #21 (each checked against a plain reference)."""
import numpy as np
import pytest
import torch

from csr.model import CSR, CSRConfig
from csr.remedies import init_encoder_from_pca, init_pre_bias


def anisotropic_rows(n: int = 400, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * np.linspace(3, 0.1, d) + 0.5).astype(np.float32)


def test_pca_init_codes_are_the_best_k_terms_of_the_principal_basis():
    x = anisotropic_rows()
    for tied in (True, False):
        m = CSR(CSRConfig(16, 32, topk=4, tied=tied))
        init_pre_bias(m, x, "mean", seed=0)
        init_encoder_from_pca(m, x, seed=0)
        mu = x.mean(0)
        evals, evecs = np.linalg.eigh(np.cov((x - mu).T, bias=True))
        u = evecs[:, ::-1].T  # principal directions, largest variance first
        w = m.encoder.weight.detach().numpy()
        assert np.allclose(np.abs(w[0::2] @ u.T), np.eye(16), atol=1e-4)  # unit 2i = ±u_i ...
        assert np.allclose(w[1::2], -w[0::2])  # ... and unit 2i+1 its opposite
        xt = torch.from_numpy(x)
        idx, vals = m.encode(xt, 4)
        rec = m.decode(idx, vals).detach().numpy()
        c = (x - mu) @ u.T  # principal coefficients
        best = np.argsort(-np.abs(c), 1, kind="stable")[:, :4]  # reference: the 4 largest |c_i| of each row
        ref = mu + np.einsum("nk,nkd->nd", np.take_along_axis(c, best, 1), u[best])
        assert np.allclose(rec, ref, atol=1e-4)
        pca_k = mu + c[:, :4] @ u[:4]  # PCA's first 4 coefficients
        err = ((x - rec) ** 2).sum(1)
        assert (err <= ((x - pca_k) ** 2).sum(1) + 1e-4).all()  # never worse than PCA, row by row


def test_pca_init_fills_units_past_two_d_from_data():
    x = anisotropic_rows(d=8)
    m = CSR(CSRConfig(8, 24, topk=2))
    init_pre_bias(m, x, "mean", seed=0)
    init_encoder_from_pca(m, x, seed=0)
    w = m.encoder.weight.detach()
    assert torch.allclose(w[:16].norm(dim=1), torch.ones(16), atol=1e-5)
    extra = w[16:] / w[16:].norm(dim=1, keepdim=True)
    centred = torch.from_numpy(x) - m.pre_bias.detach()
    centred = centred / centred.norm(dim=1, keepdim=True)
    assert ((extra @ centred.T).max(1).values > 0.999).all()  # each extra unit is the direction of a training row


def test_panel_table_and_summary_equal_a_direct_computation(tmp_path):
    """The panel runner on a tiny panel (one non-negative set, one signed 'text' set): its PCA and full-dim cells
    equal a direct PCA / full embedding + exact 1-NN on the same split, and its summary counts equal a plain recount of its cells."""
    import json
    from bench import recipe_val as rv
    from csr.baselines import PCA
    from csr.sweep import evaluate
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 12)) * 2
    y = rng.integers(0, 4, 240)
    for name, shift in (("img", 3.0), ("txt", 0.0)):
        x = (centers[y] + rng.standard_normal((240, 12))).astype(np.float32) + shift
        if shift:
            x = np.maximum(x, 0)
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "train_emb.npy", x)
        np.save(tmp_path / name / "train_labels.npy", y)
    res = rv.main(["--sets", f"img={tmp_path / 'img'}:200", f"txt={tmp_path / 'txt'}", "--text-sets", "txt",
                   "--ks", "2", "4", "--epochs", "2", "--batch-size", "64", "--hidden-size", "32", "--auxk", "8",
                   "--mrl-epochs", "1", "--min-queries", "40", "--runs", str(tmp_path / "runs"), "--try", "encoder_init=pca"])
    cells = res["cells"]
    cand = "recommended encoder_init=pca"
    assert {c["method"] for c in cells} == {"full", "pca", "mrl_unsup", "paper", cand} and len(cells) == 20
    x = np.load(tmp_path / "img" / "train_emb.npy")
    direct = {2: [], 4: []}
    full = []
    queried = []
    for fold in (0, 1):  # --min-queries 40 over blocks of 20 rows: two folds, disjoint queries
        xdb, ydb, xq, yq = rv.val_split(x, y, 200, 0.1, 0, fold)
        assert len(xdb) == 180 and len(xq) == 20
        queried.append({tuple(r) for r in xq})
        pca = PCA(12).fit(xdb)
        full.append(evaluate(xdb, xq, ydb, yq)["top1"])
        for k in (2, 4):
            direct[k].append(evaluate(pca.transform(xdb, k), pca.transform(xq, k), ydb, yq)["top1"])
    assert not queried[0] & queried[1]
    for k in (2, 4):
        cell = next(c for c in cells if c["set"] == "img" and c["method"] == "pca" and c["k"] == k)
        assert cell["top1"] == pytest.approx(np.mean(direct[k])) and cell["queries"] == 40
        cell = next(c for c in cells if c["set"] == "img" and c["method"] == "full" and c["k"] == k)
        assert cell["top1"] == pytest.approx(np.mean(full))  # the full-dim ceiling, the same at every k
    assert all("v_measure" in c for c in cells if c["set"] == "txt")
    assert not any("v_measure" in c for c in cells if c["set"] == "img")
    for comp in res["comparisons"]:  # a plain recount of the candidate against each baseline
        m, b = comp["metric"], comp["baseline"]
        gaps = [c[m] - d[m] for c in cells for d in cells if c["method"] == cand and d["method"] == b
                and (c["set"], c["k"]) == (d["set"], d["k"]) and m in c]
        assert (comp["wins"], comp["ties"], comp["losses"]) == (sum(g > 0.3 for g in gaps),
                                                                sum(abs(g) <= 0.3 for g in gaps), sum(g < -0.3 for g in gaps))
        assert comp["worst_gap"] == round(min(gaps), 2)
        assert f"{comp['wins']} wins / {comp['ties']} ties / {comp['losses']} losses" in res["report"]
    saved = json.loads((tmp_path / "runs" / "panel_recommended_encoder_init-pca.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(cells))
    for c in cells:  # the table shows every cell's number
        assert f"{c['top1']:.2f}" in res["report"]


def test_recommended_recipe_sizes_the_model_from_rows_and_k():
    """The recommended recipe: each unit fires for at least FIRES_PER_UNIT rows (by sign) on average (rows·k / hidden) unless
    the 2·k floor holds, never more units than the flag or one per 4 rows, and on signed rows never more than
    SIGNED_UNITS unless 2·k is more; the batch halves (powers of two) until
    an epoch holds STEPS_PER_EPOCH steps or it reaches MIN_BATCH; the encoder starts from training rows when the code
    is sparse (more than DATA_INIT_UNITS_PER_K·k units), from the principal directions otherwise (always on signed
    rows); an explicit --hidden-size is kept."""
    from csr.recipes import (DATA_INIT_UNITS_PER_K, FIRES_PER_UNIT, MIN_BATCH, ROWS_PER_UNIT, SIGNED_UNITS,
                             STEPS_PER_EPOCH, apply_recipe)
    from csr.train import TrainConfig
    rng = np.random.default_rng(0)
    seen = set()
    for rows in (300, 1600, 5000, 60000):
        x = rng.normal(size=(rows, 16)).astype(np.float32)
        for k in (2, 8, 64):
            mcfg, tcfg = CSRConfig(input_dim=384, hidden_size=1536, topk=k), TrainConfig()
            for xs in (x, np.abs(x)):
                m, t = apply_recipe("recommended", mcfg, tcfg, xs)
                assert m.topk == k
                assert t.encoder_init == ("data" if m.hidden_size > DATA_INIT_UNITS_PER_K * k else "pca")
                if xs.min() < 0:
                    assert t.encoder_init == "pca"
                assert t.bpre_init == ("geometric_median" if xs.min() >= 0 else "mean")
                # non-negative rows resample during the first half of the steps only (recommended-v1: 90 %)
                assert (t.resample_every, t.resample_until) == ((14, 0.5) if xs.min() >= 0 else (0, 0.5))
                assert apply_recipe("recommended-v1", mcfg, tcfg, np.abs(x))[1].resample_until == 0.9
                assert k <= m.hidden_size <= 1536 and m.hidden_size <= max(rows // ROWS_PER_UNIT, k)
                fires = FIRES_PER_UNIT["nonnegative" if xs.min() >= 0 else "signed"]
                assert rows * k / m.hidden_size >= fires or m.hidden_size <= 2 * k or \
                    m.hidden_size in (1536, rows // ROWS_PER_UNIT)
                if xs.min() < 0:
                    assert m.hidden_size <= max(SIGNED_UNITS, 2 * k)
                assert t.batch_size <= 4096 and 4096 % t.batch_size == 0
                assert rows // t.batch_size >= STEPS_PER_EPOCH or t.batch_size == MIN_BATCH
                assert t.batch_size == 4096 or rows // (2 * t.batch_size) < STEPS_PER_EPOCH
                assert apply_recipe("recommended", mcfg, tcfg, xs, hidden_fixed=True)[0].hidden_size == 1536
            seen.add(m.hidden_size)
    assert len(seen) > 5  # the size really follows rows and k
    m, t = apply_recipe("recommended+labels", CSRConfig(input_dim=384, hidden_size=1536, topk=8), TrainConfig(),
                        np.abs(rng.normal(size=(5000, 16))))
    assert t.cl == "label" and t.encoder_init == "data" and m.hidden_size == 5000 * 8 // FIRES_PER_UNIT["nonnegative"]
    for k in (2, 8, 64):  # the panel's image sizes: 27k non-negative rows of 1280 dims, 4·d units at most
        m, t = apply_recipe("recommended", CSRConfig(input_dim=1280, hidden_size=5120, topk=k), TrainConfig(),
                            np.abs(rng.normal(size=(27000, 4))).astype(np.float32))
        assert t.encoder_init == "data" and m.hidden_size > DATA_INIT_UNITS_PER_K * k
    m, t = apply_recipe("recommended", CSRConfig(input_dim=1280, hidden_size=5120, topk=64), TrainConfig(),
                        np.abs(rng.normal(size=(2700, 4))).astype(np.float32))
    assert (m.hidden_size, t.encoder_init) == (675, "pca")  # 2.7k rows at k = 64: a dense code
    assert FIRES_PER_UNIT["signed"] > FIRES_PER_UNIT["nonnegative"]
    # the signed cap binds where rows·k / FIRES would give more units, and gives way to 2·k at large k
    signed = rng.normal(size=(60000, 16)).astype(np.float32)
    for k, want in ((2, SIGNED_UNITS), (8, SIGNED_UNITS), (64, 2 * 64)):
        assert 60000 * k // FIRES_PER_UNIT["signed"] > want
        m, _ = apply_recipe("recommended", CSRConfig(input_dim=384, hidden_size=1536, topk=k), TrainConfig(), signed)
        assert m.hidden_size == want
    m, _ = apply_recipe("recommended", CSRConfig(input_dim=384, hidden_size=1536, topk=2), TrainConfig(), signed[:1600])
    assert m.hidden_size == 1600 * 2 // FIRES_PER_UNIT["signed"]  # below the cap: rows·k / FIRES as before


def tiny_panel_set(folder, seed: int) -> None:
    """A panel set of 200 non-negative rows in 3 classes (train_emb.npy + train_labels.npy under `folder`)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 200)
    x = np.maximum(rng.standard_normal((3, 10))[y] + rng.standard_normal((200, 10)) + 2, 0).astype(np.float32)
    folder.mkdir()
    np.save(folder / "train_emb.npy", x)
    np.save(folder / "train_labels.npy", y)


def test_panel_compares_a_labelled_candidate_with_the_labelled_mrl_adaptor(tmp_path):
    """A candidate that trains with labels (`--recipe recommended+labels`) is also compared with the MRL adaptor
    trained with the same labels; a label-free candidate is not."""
    from bench import recipe_val as rv
    tiny_panel_set(tmp_path / "s", seed=1)
    res = rv.main(["--sets", f"s={tmp_path / 's'}", "--recipe", "recommended+labels", "--ks", "2", "--epochs", "1",
                   "--mrl-epochs", "1", "--min-queries", "20", "--runs", str(tmp_path / "runs")])
    assert {c["method"] for c in res["cells"]} == {"full", "pca", "mrl_unsup", "mrl", "paper", "recommended+labels"}
    assert [c["baseline"] for c in res["comparisons"]] == ["pca", "mrl_unsup", "paper", "mrl"]
    assert "MRL adaptor (labels)" in res["report"]


@pytest.mark.parametrize("mode", ["rank", "gram"])
def test_similarity_term_equals_its_dense_formula_values_and_gradients(mode):
    from csr import losses as L
    torch.manual_seed(0)
    B, h, k, tau = 24, 40, 5, 0.1
    idx = torch.stack([torch.randperm(h)[:k] for _ in range(B)])
    vals = torch.rand(B, k, requires_grad=True)
    x = torch.randn(B, 9)
    got = L.similarity_preservation(idx, vals, x, h, mode, tau)
    g_got, = torch.autograd.grad(got, vals)
    z = torch.nn.functional.normalize(torch.zeros(B, h).scatter(1, idx, vals), dim=1)  # dense reference
    xn = torch.nn.functional.normalize(x, dim=1)
    s, t = z @ z.T, xn @ xn.T
    if mode == "gram":
        ref = ((s - t) ** 2).mean()
    else:  # KL of each row's softmax over the OTHER rows, written row by row
        ref = 0
        for i in range(B):
            o = torch.arange(B) != i
            p = torch.softmax(t[i, o] / tau, 0)
            ref = ref + (p * (p.log() - torch.log_softmax(s[i, o] / tau, 0))).sum()
        ref = ref / B
    g_ref, = torch.autograd.grad(ref, vals)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(g_got, g_ref, atol=1e-5)


def test_similarity_term_pulls_the_codes_neighbours_toward_the_inputs():
    """Codes of a fixed support trained on the rank term alone: each row's nearest code becomes its nearest input
    (the 1-NN agreement rises from chance level to nearly every row), and the term decreases."""
    from csr import losses as L
    torch.manual_seed(1)
    B, h, k = 64, 24, 12
    x = torch.randn(B, 6)
    idx = torch.stack([torch.randperm(h)[:k] for _ in range(B)])
    vals = torch.rand(B, k).requires_grad_(True)
    opt = torch.optim.Adam([vals], lr=0.05)

    def nn_agreement() -> float:
        with torch.no_grad():
            eye = torch.eye(B, dtype=torch.bool)
            s = L.sparse_gram(idx, L.normalized_values(vals.relu()), h).masked_fill(eye, -2)
            xn = torch.nn.functional.normalize(x, dim=1)
            t = (xn @ xn.T).masked_fill(eye, -2)
            return float((s.argmax(1) == t.argmax(1)).float().mean())

    before, losses = nn_agreement(), []
    for _ in range(300):
        loss = L.similarity_preservation(idx, vals.relu(), x, h, "rank", 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert before < 0.15 and nn_agreement() > 0.8


def test_panel_seeds_average_the_cells_of_single_seed_runs(tmp_path):
    """`--seeds a b` trains every model of a cell once per seed: each cell is the mean of the two single-seed
    panels' cells (PCA, which has no seed, is the same in all three), over the same queries."""
    from bench import recipe_val as rv
    tiny_panel_set(tmp_path / "s", seed=2)
    common = ["--sets", f"s={tmp_path / 's'}", "--recipe", "recommended", "--ks", "2", "--epochs", "2",
              "--mrl-epochs", "1", "--min-queries", "20", "--runs", str(tmp_path / "runs")]
    one, two = (rv.main(common + ["--seed", s]) for s in ("3", "4"))
    both = rv.main(common + ["--seeds", "3", "4"])
    cand = "recommended seeds=3,4"
    assert any(c["method"] == cand for c in both["cells"])
    for c in both["cells"]:
        m = "recommended" if c["method"] == cand else c["method"]
        a, b = ([d for d in r["cells"] if d["method"] == m and d["k"] == c["k"]][0] for r in (one, two))
        assert c["top1"] == pytest.approx((a["top1"] + b["top1"]) / 2) and c["queries"] == a["queries"]
        if m in ("recommended", "paper"):
            assert c["dead"] == pytest.approx((a["dead"] + b["dead"]) / 2)
    assert [d["top1"] for d in one["cells"] if d["method"] == "pca"] == \
        [d["top1"] for d in both["cells"] if d["method"] == "pca"]
    def scores(r):  # what a seed can change (not the timings)
        return [(c["method"], c["top1"], c.get("dead")) for c in r["cells"]]
    assert scores(one) != scores(two)  # the seeds really differ (here: the MRL adaptor's top-1, the paper's dead units)
    from csr.io import CSRError
    with pytest.raises(CSRError, match="--seeds"):
        rv.main(common + ["--seeds", "3", "4", "--try", "seed=5"])
