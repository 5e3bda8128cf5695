"""analysis.py: each view's measurement on hand-made cases, and the whole run on the tiny preset."""
import math
import os

import numpy as np
import pytest
import torch

import analysis
import runs
from model import ModelConfig, Transformer

torch.set_num_threads(1)


def test_update_angle_is_0_for_the_same_space_and_90_for_orthogonal_ones():
    torch.manual_seed(0)
    A = torch.randn(12, 3) @ torch.randn(3, 8)                    # rank 3
    assert analysis.update_angle(A, A) == pytest.approx(0.0, abs=1e-4)
    Q = torch.linalg.qr(torch.randn(12, 12)).Q
    left, right = Q[:, :3] @ torch.randn(3, 8), Q[:, 3:6] @ torch.randn(3, 8)  # orthogonal column spaces
    left, right = left - left.mean(), right - right.mean()       # z-scoring keeps them orthogonal: zero mean
    assert analysis.update_angle(left, right) == pytest.approx(90.0, abs=1.0)


def test_rank_rule_on_known_singular_values():
    assert analysis.rank_99([10.0, 1.0, 1.0]) == 2                # 100 of 102 is 98%; 101 of 102 is 99.02%
    assert analysis.rank_99([10.0, 1.0, 0.1]) == 1                # 100 of 101.01 is 99.0001%
    assert analysis.rank_99([1.0, 1.0, 1.0, 1.0]) == 4
    assert analysis.rank_99([1.0, 0.0, 0.0]) == 1
    assert analysis.rank_99([3.0, 1.0], share=0.9) == 1           # 9 of 10


def small_model(seed):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=20, n_layer=2, n_head=1, d_model=8, d_ff=16, max_seq_len=8)).eval()


def test_landscape_corners_are_the_three_checkpoints_and_the_plane_holds_them():
    models = [small_model(s) for s in range(3)]
    origin, u, v = analysis.plane(*(analysis.flat(m) for m in models))
    idx = torch.randint(0, 20, (4, 6))
    loss = lambda m: m(idx[:, :-1], idx[:, 1:])[1].item()  # noqa: E731
    grid = analysis.landscape(small_model(9), origin, u, v, [0.0, 1.0], [0.0, 1.0], {"loss": loss})["loss"]
    assert grid[0, 0] == loss(models[0]) and grid[0, 1] == loss(models[1]) and grid[1, 1] == loss(models[2])
    x, y, residual = analysis.project(origin + 0.3 * u - 0.7 * v, origin, u, v)
    assert (x, y) == pytest.approx((0.3, -0.7)) and residual < 1e-10
    _, _, off_plane = analysis.project(analysis.flat(small_model(5)), origin, u, v)
    assert off_plane > 0.1


def test_pc1_angle_ignores_the_sign_of_the_component():
    torch.manual_seed(0)
    H = torch.randn(50, 6, dtype=torch.float64) * torch.tensor([5.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    u = analysis.pc1(H)
    assert analysis.angle_deg(u, -u) == pytest.approx(0.0, abs=1e-6)
    assert analysis.angle_deg(u, u) == pytest.approx(0.0, abs=1e-6)


def test_permutation_test_separates_independent_from_planted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(40)
    r, p = analysis.pearson_permutation(x, rng.standard_normal(40), permutations=2000)
    assert p > 0.05
    r, p = analysis.pearson_permutation(x, x + 0.3 * rng.standard_normal(40), permutations=2000)
    assert r > 0.9 and p < 0.01


def test_collapse_window_is_the_fastest_fall_between_saved_steps():
    curve = [{"step": s, "task0": {"em": e}} for s, e in [(0, 0.9), (5, 0.85), (10, 0.8), (20, 0.2), (50, 0.1)]]
    assert analysis.collapse_window(curve, {0, 10, 20, 50}) == (10, 20)


# ------------------------------------------------------------------------------------------------
# Hand cases with known answers: weight-update angles by matrix, feature shift, Fisher by matrix

PATHS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj", "mlp_in": "mlp.up",
         "mlp_out": "mlp.down"}  # written out here, not read from analysis.COMPONENTS


def matrices_by_hand(model):
    """{key: the weight Parameter} for analysis.weight_matrices' keys, from the model's own names."""
    out = {("emb", "embed"): model.embed.weight, ("head", "unembed"): model.lm_head.weight}
    return out | {(l, c): block.get_submodule(p).weight for l, block in enumerate(model.blocks) for c, p in PATHS.items()}


def rank_one_update(rows, cols, direction, g):
    """direction (rows,) times a random row of zero sum: its column space is the line of `direction`, and
    z-scoring (which subtracts the mean entry, here 0) leaves it there."""
    b = torch.randn(cols, generator=g, dtype=torch.float64)
    return torch.outer(direction, b - b.mean())


def test_angles_pairs_the_first_update_with_the_second_for_every_matrix():
    """Every matrix gets update A (m0 -> m1), an unrelated update (m1 -> m2), then update B (m2 -> m3) whose
    column space is a line at a chosen angle to A's: each matrix its own angle, 0 to 90 degrees."""
    models = [small_model(0) for _ in range(4)]
    keys = list(matrices_by_hand(models[0]))
    want = {key: 90.0 * i / (len(keys) - 1) for i, key in enumerate(keys)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key in keys:
            W = [matrices_by_hand(m)[key] for m in models]
            rows, cols = W[0].shape
            q1, q2 = torch.linalg.qr(torch.randn(rows, 2, generator=g, dtype=torch.float64)).Q.T
            theta = math.radians(want[key])
            A = rank_one_update(rows, cols, q1, g)
            B = rank_one_update(rows, cols, math.cos(theta) * q1 + math.sin(theta) * q2, g)
            W[1].copy_(W[0] + A)
            W[2].copy_(W[1] + torch.randn(rows, cols, generator=g))  # between the two: must not count
            W[3].copy_(W[2] + B)
    got = analysis.angles(*models)
    assert set(got) == set(keys) == {("emb", "embed"), ("head", "unembed")} | {(l, c) for l in (0, 1) for c in PATHS}
    for key in keys:
        assert got[key] == pytest.approx(want[key], abs=1e-3), key


def embedding_only_model(embed):
    """A model whose blocks add nothing (zero output projections): at every layer the residual stream of a
    token is its embedding row, so the features can be set by hand."""
    model = Transformer(ModelConfig(vocab_size=embed.shape[0], n_layer=2, n_head=1, d_model=embed.shape[1], d_ff=16,
                                    max_seq_len=8)).eval()
    with torch.no_grad():
        model.embed.weight.copy_(embed)
        for block in model.blocks:
            for proj in (block.attn.o_proj, block.mlp.down):
                proj.weight.zero_()
                proj.bias.zero_()
    return model


def prompts_ending_in_every_token(vocab):
    """Left-padded prompts whose last tokens are 0..vocab-1 in order: the last-token features are the rows."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (vocab, 5), generator=g)
    idx[:, -1] = torch.arange(vocab)
    mask = torch.ones_like(idx)
    mask[::3, :2] = 0
    return idx, mask


def test_feature_shift_of_a_translation_is_its_length_and_leaves_pc1():
    g = torch.Generator().manual_seed(2)
    E = torch.randn(24, 8, generator=g) * torch.tensor([4.0, 2, 1, 1, 1, 1, 1, 1])
    c = torch.tensor([0.0, 3.0, 0, 0, 4.0, 0, 0, 0])  # length 5
    idx, mask = prompts_ending_in_every_token(24)
    rows, scatter = analysis.feature_shift(embedding_only_model(E), embedding_only_model(E + c), idx, mask)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    mean_norm = E.double().norm(dim=1).mean().item()
    for r in rows:
        assert r["shift"] == pytest.approx(5.0, rel=1e-5)
        assert r["rel_shift"] == pytest.approx(5.0 / mean_norm, rel=1e-5)  # relative to the features before
        assert r["pc1_angle"] == pytest.approx(0.0, abs=1e-3)  # PC1 is taken after centring
    moved = np.array(scatter["after"]) - np.array(scatter["before"])  # (mean-shift direction, PC1 before)
    assert np.allclose(moved, [5.0, 0.0], atol=1e-4)


def test_feature_shift_of_a_rotation_turns_pc1_by_its_angle():
    """Features in a plane, rotated in it by 30 degrees: PC1 turns by 30, and every feature moves by
    2 sin(15 degrees) of its length."""
    g = torch.Generator().manual_seed(3)
    E = torch.zeros(24, 8)
    E[:, 0], E[:, 1] = 4 * torch.randn(24, generator=g), torch.randn(24, generator=g)
    theta = math.radians(30)
    R = torch.eye(8)
    R[:2, :2] = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    idx, mask = prompts_ending_in_every_token(24)
    rows, _ = analysis.feature_shift(embedding_only_model(E), embedding_only_model(E @ R.T), idx, mask)
    for r in rows:
        assert r["pc1_angle"] == pytest.approx(30.0, abs=1e-3)
        assert r["rel_shift"] == pytest.approx(2 * math.sin(theta / 2), rel=1e-5)


def test_fisher_by_component_reads_each_matrix_its_own_fisher(monkeypatch):
    model = small_model(0)
    names = {id(p): name for name, p in model.named_parameters()}
    fake = {name: (i + 1) * torch.arange(p.numel(), dtype=torch.float32).view_as(p)  # mean (i + 1)(n - 1) / 2
            for i, (name, p) in enumerate(model.named_parameters())}
    monkeypatch.setattr(analysis, "diagonal_fisher", lambda m, qa, batch_size: fake)
    got = analysis.component_fisher(model, qa=None, batch_size=1)
    assert set(got) == set(matrices_by_hand(model))
    for key, param in matrices_by_hand(model).items():
        assert got[key] == pytest.approx(fake[names[id(param)]].double().mean().item(), rel=1e-6), key
    weights = analysis.weight_matrices(model)  # the angles' matrices: a Fisher point pairs the same matrix
    assert all(weights[key].data_ptr() == param.data_ptr() for key, param in matrices_by_hand(model).items())

# ------------------------------------------------------------------------------------------------
# The theory's quantities on real layers (analysis.py, part 5), on cases with known answers


def test_angle_between_lines_and_pc1_of_a_known_direction():
    e = torch.eye(3, dtype=torch.float64)
    for degrees, want in ((0, 0), (30, 30), (90, 90), (150, 30), (180, 0)):
        t = math.radians(degrees)
        assert analysis.angle_deg(e[0], math.cos(t) * e[0] + math.sin(t) * e[1]) == pytest.approx(want, abs=1e-9)
    d = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    H = torch.linspace(-2, 3, 11, dtype=torch.float64)[:, None] * d + torch.tensor([5.0, -1.0, 7.0], dtype=torch.float64)
    assert analysis.angle_deg(analysis.pc1(H), d) == pytest.approx(0.0, abs=1e-6)  # the offset is centred away


def orthonormal(d, k, seed):
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


def test_shift_subspace_share_inside_outside_and_between():
    d, r, n = 10, 3, 40
    Q = orthonormal(d, r + 1, 0)
    U, w = Q[:, :r], Q[:, r]                                 # the features' subspace, and a direction outside it
    H = torch.randn(n, r, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ U.T * 5  # (n, d), rank r
    inside = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[:, None] * U[:, 0]
    outside = inside.norm(dim=1, keepdim=True) * w           # the same length per sample
    for phi in (0, 30, 60, 90):
        t = math.radians(phi)
        share, random_share = analysis.shift_subspace_share(H, H + math.cos(t) * inside + math.sin(t) * outside, r)
        assert share == pytest.approx(math.cos(t), abs=1e-9)
        assert random_share == pytest.approx(math.sqrt(r / d))


def test_input_side_check_of_an_update_reading_a_known_direction():
    """Inputs X of rank 2 (no energy outside their principal subspace); an update dW = c v^T with |c| = 1
    reading v at angle phi to the subspace: rho = cos phi, and the bound rho + 0 is met with equality
    when v reads the subspace's second direction only (X's energy there is ||s2|| of ||X||_F)."""
    d_in, d_out, n = 8, 5, 30
    Q = orthonormal(d_in, 3, 0)
    g = torch.Generator().manual_seed(1)
    s1, s2 = 3 * torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    X = torch.outer(Q[:, 0], s1) + torch.outer(Q[:, 1], s2)              # (d_in, n)
    c = orthonormal(d_out, 1, 2)[:, 0]
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    for phi in (0, 45, 90):
        t = math.radians(phi)
        dW = torch.outer(c, math.cos(t) * Q[:, 1] + math.sin(t) * Q[:, 2])
        got = analysis.input_side_check(W0, W0 + dW, X, 2, np.random.default_rng(0))
        assert got["rho"] == pytest.approx(math.cos(t), abs=1e-9)
        assert got["rho_frobenius"] == pytest.approx(math.cos(t), abs=1e-9)
        assert got["bound"] == pytest.approx(math.cos(t), abs=1e-9)
        assert got["measured"] == pytest.approx(math.cos(t) * s2.norm().item() / X.norm().item(), abs=1e-9)


def test_module_outputs_and_last_token_features_are_the_embedding_rows():
    model = small_model(0)
    idx, mask = prompts_ending_in_every_token(20)
    E = model.embed.weight.detach()
    out = analysis.module_outputs(model, model.embed, idx, mask)
    assert torch.equal(out, E[idx[mask.bool()]].T)                        # (width, real tokens), row-major
    hidden = analysis.last_token_hidden(model, idx, mask, batch_size=7)
    assert len(hidden) == 3 and torch.equal(hidden[0], E.double())       # layer 0: the embedding of the last token
    assert all(torch.equal(a, b) for a, b in zip(hidden, analysis.last_token_hidden(model, idx, mask)))


def test_theory_on_model_rho_of_an_update_inside_and_outside_the_features():
    """Only block 1's q changes, by an update reading the top principal direction of what q reads, or a
    direction outside its top 4: rho 1 or 0 there, and nothing measured at block 0, which did not move."""
    before = small_model(0)
    idx, mask = prompts_ending_in_every_token(20)
    seen = []
    handle = before.blocks[1].attn_norm.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    with torch.no_grad():
        before(idx, attention_mask=mask)
    handle.remove()
    U = torch.linalg.svd(seen[0][mask.bool()].T.double(), full_matrices=False).U  # (8, 8) what q reads, by energy
    for direction, rho in ((U[:, 0], 1.0), (U[:, 5], 0.0)):
        after = small_model(0)
        with torch.no_grad():
            after.blocks[1].attn.q_proj.weight += torch.outer(torch.ones(8, dtype=torch.float64), direction).float()
        rows = analysis.theory_on_model(before, after, idx, mask, r=4)
        assert [r["layer"] for r in rows] == [0, 1]
        assert rows[0]["rho"] is None and rows[0]["share"] is None and rows[0]["rel_shift"] == 0.0
        assert rows[1]["rho"] == pytest.approx(rho, abs=1e-5)
        assert rows[1]["rel_shift"] > 0 and rows[1]["share"] is not None  # block 1's output moved


def test_tiny_preset_end_to_end(tmp_path):
    out = analysis.main(["--preset", "tiny", "--runs", str(tmp_path)])
    assert sorted(os.listdir(out)) == ["analysis.json", "feature-shift.png", "fisher-vs-angle.png",
                                       "landscape-freeze.png", "landscape.png", "weight-angles.png"]
    result = runs.read_json(os.path.join(out, "analysis.json"))
    assert "pretraining: 1st half vs 2nd half" in result["angles"]  # a fresh run saves the mid-pretraining model
    every_matrix = {"emb.embed", "head.unembed"} | {f"{l}.{c}" for l in (0, 1) for c in PATHS}
    assert all(set(group) == every_matrix for group in result["angles"].values())  # values: the hand cases above
    assert set(result["theory"]) == {"seq", "freeze bottom 1", "freeze top 1"}
    assert result["theory"]["freeze bottom 1"][0]["rel_shift"] == 0.0  # the frozen bottom block moves nothing
