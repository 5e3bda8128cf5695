"""Checks of theory.py: every statement holds over a sweep of seeds and sizes, the checks fail when an
assumption is broken on purpose, and the transformer measurement (part 3) behaves as it must."""
import copy
import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch

from analysis import input_side_check, last_token_hidden, module_outputs, residual_shift, shift_subspace_share
from theory import (check_rows, control_rows, cor_f5_summed_shift, holds, make_net, Net, plot, principal_projector,
                    prop_4_6_single_layer, prop_4_7_whole_network, prop_4_9_accumulation, prop_4_9_growth,
                    prop_4_9_independent_growth, SWEEP, telescoping, TheoryConfig, vacuity_rows, wedin)

SIZES = [  # (d, L, delta, eps, k)
    (16, 4, 0.01, 0.01, 0),
    (32, 8, 0.01, 0.02, 0),
    (64, 12, 0.005, 0.01, 0),
    (32, 8, 0.02, 0.05, 3),
    (24, 16, 0.005, 0.01, 10),
]
CONFIGS = [TheoryConfig(d=d, L=L, delta=delta, eps=eps, k=k, seed=seed)
           for (d, L, delta, eps, k), seed in itertools.product(SIZES, range(4))]
CONFIGS += [TheoryConfig(d=32, L=12, k=4, frozen="top", seed=seed) for seed in range(2)]


def config_id(cfg):
    return f"d{cfg.d}-L{cfg.L}-delta{cfg.delta}-eps{cfg.eps}-k{cfg.k}{cfg.frozen[0]}-seed{cfg.seed}"


def alignment(net, l):
    """||P_l D_l||_F / ||D_l||_F: 0 when the shift is orthogonal to the principal subspace, 1 inside it."""
    D = net.Xt[l] - net.X[l]
    return np.linalg.norm(principal_projector(net.X[l], net.cfg.r) @ D) / np.linalg.norm(D)


# ---- the statements hold, and their bounds say something

@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_statements_hold(cfg):
    net = make_net(cfg)
    assert telescoping(net) <= 1e-10
    measured, bound = prop_4_6_single_layer(make_net(dataclasses.replace(cfg, update="input-orthogonal")))
    assert measured <= bound < 0.2            # 4.6, and the bound is far from the generic 1
    measured, bound = prop_4_7_whole_network(net)
    assert measured <= bound < 0.1            # 4.7, and far from vacuous
    s0 = np.linalg.svd(net.X[0], compute_uv=False)
    for l in range(1, cfg.L + 1):             # the proofs' key step: Wedin's bound on how far P_l turns
        P = principal_projector(net.X[l], cfg.r)
        s = np.linalg.svd(net.X[l - 1], compute_uv=False)
        assert np.linalg.norm(P - principal_projector(net.X[l - 1], cfg.r), 2) <= wedin(cfg.delta, s, cfg.r)
        assert np.linalg.norm(P - principal_projector(net.X[0], cfg.r), 2) <= wedin((1 + cfg.delta) ** l - 1, s0, cfg.r)
    a, L, k = 1 + cfg.delta + cfg.eps, cfg.L, cfg.k
    first = k + 1 if cfg.frozen == "bottom" else 1
    for l in range(first, L + 1):             # 4.9 / F.5 on every prefix of the network
        measured, lower, upper = prop_4_9_accumulation(net, l)
        assert 0 < lower <= measured * (1 + 1e-12) and measured <= upper  # equal at the first trained layer
        if cfg.frozen == "bottom":
            assert upper <= (l - k) * cfg.eps * a ** (l - 1) * (1 + 1e-12)  # equality at l = k + 1


def test_telescoping_is_exact_for_every_update_kind():
    for update in ("orthogonal", "independent", "aligned"):
        assert telescoping(make_net(TheoryConfig(update=update, L=12, delta=0.3, eps=0.2))) <= 1e-10


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("d", [16, 64])
def test_shift_grows_linearly_with_depth(seed, d):
    net = make_net(TheoryConfig(d=d, L=16, delta=0.005, seed=seed))
    shifts = np.array([prop_4_9_accumulation(net, l)[0] for l in range(1, 17)])
    per_layer = shifts / np.arange(1, 17)     # constant when the growth is linear
    assert np.corrcoef(np.arange(1, 17), shifts)[0, 1] > 0.999
    assert per_layer.max() / per_layer.min() < 1.1
    assert holds(prop_4_9_growth(net), "~=", 2.0)


@pytest.mark.parametrize("seed", [0, 100])
def test_independent_updates_grow_like_a_random_walk(seed):
    cfg = TheoryConfig(L=16, delta=0.005, seed=seed)
    assert holds(prop_4_9_independent_growth(cfg), "~=", 2 ** 0.5)  # in expectation: the mean over draws
    for i in range(8):                                     # and no single draw grows linearly
        assert prop_4_9_growth(make_net(dataclasses.replace(cfg, update="independent", seed=seed + i))) < 1.8


@pytest.mark.parametrize("seed", range(3))
def test_bottom_freezing_beats_top_freezing_on_the_summed_shift_only(seed):
    bottom, top = (make_net(TheoryConfig(L=12, k=3, frozen=f, seed=seed)) for f in ("bottom", "top"))
    (b_measured, _, b_upper), (t_measured, t_lower, _) = cor_f5_summed_shift(bottom), cor_f5_summed_shift(top)
    assert b_measured <= b_upper < t_lower <= t_measured    # provably less shift, summed over the layers
    last_bottom, last_top = prop_4_9_accumulation(bottom)[0], prop_4_9_accumulation(top)[0]
    assert last_bottom == pytest.approx(last_top, rel=0.03)  # the last layer alone: the old, symmetric F.5


def test_where_the_bounds_become_vacuous():
    rows = vacuity_rows()
    share_bounds = [r["share_bound"] for r in rows]
    assert share_bounds == sorted(share_bounds) and share_bounds[0] < 0.05 and share_bounds[-1] >= 1
    assert [r["upper_over_measured"] for r in rows] == sorted(r["upper_over_measured"] for r in rows)
    assert rows[0]["lower"] > 0 and rows[-1]["lower"] < 0
    assert all(r["share"] <= r["share_bound"] for r in rows)  # vacuous, but still true


@pytest.mark.parametrize("seed", range(3))
def test_freezing_shrinks_the_shift(seed):
    L = 12
    results = [prop_4_9_accumulation(make_net(TheoryConfig(L=L, k=k, seed=seed))) for k in range(L)]
    measured = np.array([m for m, _, _ in results])
    uppers = np.array([u for _, _, u in results])
    assert np.all(np.diff(measured) < 0) and np.all(np.diff(uppers) < 0)
    # each frozen layer removes about one layer's worth: shift(k) / shift(0) ~ (L - k) / L
    assert np.allclose(measured / measured[0], (L - np.arange(L)) / L, rtol=0.1)


# ---- the measurements on a network small enough to work out by hand

def hand_net(eps):
    """d = 2, two samples X_0 = diag(2, 1), r = 1 (P = e1 e1^T), two layers with W = 0 and the same update
    dW = eps e2 e1^T: it reads the principal direction e1 and writes e2, outside it. As (e2 e1^T)^2 = 0,
    X~_2 = (I + 2 eps e2 e1^T) X_0, so D_2 = [[0, 0], [4 eps, 0]]: a shift of 4 eps, all outside P."""
    cfg = TheoryConfig(d=2, n=2, r=1, L=2, delta=0.0, eps=eps)
    X0, dW = np.diag([2.0, 1.0]), eps * np.array([[0.0, 0.0], [1.0, 0.0]])
    X = [X0, X0, X0]
    Xt = [X0, X0 + dW @ X0, X0 + 2 * dW @ X0]
    return Net(cfg, W=[np.zeros((2, 2))] * 2, dW=[dW, dW], X=X, Xt=Xt)


def test_statements_measure_what_the_hand_computation_gives():
    eps = 0.1
    net = hand_net(eps)
    assert np.allclose(principal_projector(net.X[0], 1), [[1, 0], [0, 0]])
    assert telescoping(net) <= 1e-15
    # 4.9 at l = 2: measured ||D_2|| / ||X_0|| = 4 eps / sqrt(5); the drive ||2 dW X_0|| / ||X_0|| is the same;
    # upper = eps (1 + eps) + eps (layer 1's shift goes through layer 2's A~ = 1 + eps); lower = drive - eps^2.
    measured, lower, upper = prop_4_9_accumulation(net)
    assert measured == pytest.approx(4 * eps / 5 ** 0.5)
    assert upper == pytest.approx(eps * (2 + eps)) and lower == pytest.approx(4 * eps / 5 ** 0.5 - eps ** 2)
    assert prop_4_9_accumulation(net, 1) == pytest.approx((2 * eps / 5 ** 0.5, 2 * eps / 5 ** 0.5, eps))
    # 4.6: rho = 1 (dW reads e1 only), ||dW X_0|| / (||dW|| ||X_0||) = 2 / sqrt(5), tau / ||X_0|| = 1 / sqrt(5)
    assert prop_4_6_single_layer(net) == pytest.approx((2 / 5 ** 0.5, 1 + 1 / 5 ** 0.5))
    assert prop_4_6_single_layer(net, rho=0.0) == pytest.approx((2 / 5 ** 0.5, 1 / 5 ** 0.5))  # a false claim fails
    # F.5's sum over layers: (2 + 4) eps / sqrt(5) measured
    assert cor_f5_summed_shift(net)[0] == pytest.approx(6 * eps / 5 ** 0.5)


# ---- negative controls: break an assumption and the check must fail

@pytest.mark.parametrize("seed", range(4))
def test_aligned_updates_are_not_orthogonal(seed):
    net = make_net(TheoryConfig(update="aligned", seed=seed))
    for measured, bound in (prop_4_6_single_layer(net, rho=0.0), prop_4_7_whole_network(net)):  # 4.6: a false claim of rho = 0
        assert not holds(measured, "<=", bound)
    measured, bound = prop_4_6_single_layer(net)       # with the true rho the bound holds, and says nothing
    assert measured <= bound and bound > 1
    assert alignment(net, net.cfg.L) > 0.9


@pytest.mark.parametrize("seed", range(4))
def test_large_delta_breaks_orthogonality(seed):
    big = make_net(TheoryConfig(d=16, L=8, delta=1.0, seed=seed))
    assert alignment(big, big.cfg.L) > 0.3    # the shift is no longer nearly orthogonal
    measured, bound = prop_4_7_whole_network(big, delta=0.01)
    assert not holds(measured, "<=", bound)   # the small-delta bound fails
    measured, bound = prop_4_7_whole_network(big)
    assert bound >= 1 and measured <= bound   # the true-delta bound is vacuous, yet still true


@pytest.mark.parametrize("seed", range(4))
def test_independent_updates_grow_sublinearly(seed):
    net = make_net(TheoryConfig(L=16, delta=0.005, update="independent", seed=seed))
    assert not holds(prop_4_9_growth(net), "~=", 2.0)  # about sqrt(2): a random walk, not a linear drift
    measured, lower, upper = prop_4_9_accumulation(net)
    assert lower <= measured <= upper         # the bounds themselves still hold


def test_table_rows_hold_and_controls_fail():
    for cfg in SWEEP:
        assert all(holds(m, rel, b) for _, _, m, rel, b in check_rows(cfg)), cfg
    assert not any(holds(m, rel, b) for _, _, m, rel, b in control_rows())


def test_plot_writes_pngs(tmp_path):
    plot(str(tmp_path / "plots"))
    assert sorted(os.listdir(tmp_path / "plots")) == ["shift_vs_depth.png", "shift_vs_frozen.png"]


# ---- part 3: residual-stream shift of a real transformer

@pytest.mark.parametrize("k", [0, 2])
def test_residual_shift_is_zero_below_the_perturbed_blocks(k):
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=4, n_head=4, d_model=32, d_ff=128, max_seq_len=64)
    before = Transformer(cfg)
    after = copy.deepcopy(before)
    with torch.no_grad():
        for block in after.blocks[k:]:
            for p in block.parameters():
                p.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 64, (24, 10))
    mask = torch.ones(24, 10, dtype=torch.long)
    mask[::3, :4] = 0                         # left padding on some prompts
    rows = residual_shift(before, after, idx, attention_mask=mask, batch_size=7)
    assert [r["layer"] for r in rows] == list(range(cfg.n_layer + 1))
    for r in rows[:k + 1]:                    # hidden[0..k] come from untouched weights
        assert r["shift"] == 0.0 and r["rel_shift"] == 0.0 and r["pc1_angle"] < 1e-6
    for r in rows[k + 1:]:
        assert all(np.isfinite(v) for v in r.values())
        assert r["shift"] > 0 and r["rel_shift"] > 0 and 0 < r["pc1_angle"] <= 90
    unchunked = residual_shift(before, after, idx, attention_mask=mask, batch_size=100)
    for a, b in zip(rows, unchunked):
        assert a["shift"] == pytest.approx(b["shift"], rel=1e-4, abs=1e-12)


# ---- part 4: the statements on a small trained transformer (tiny data, 4 blocks, trained in the test).
# These record one seed's outcome; the measurements they use are checked against known answers in
# test_analysis.py (analysis.py holds them), and the statements against the hand-made network above.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The Task-0 model and the model after Task 1 (SEQ), their Task-0 test prompts, and the Task-1 data."""
    import runs
    import train
    from model import left_pad
    flags = ["--preset", "tiny", "--runs", str(tmp_path_factory.mktemp("runs")), "--n-layer", "4",
             "--pretrain-epochs", "12", "--pretrain-lr", "0.01"]
    train.main(flags + ["--stage", "task1"])
    cfg = train.parse_args(flags)[0]
    exp = train.Experiment(cfg)
    before, after = (runs.load_checkpoint(os.path.join(runs.stage_dir(cfg, s)[0], "final"), "cpu") for s in ("task0", "task1"))
    idx, mask = left_pad(exp.qa_set("task0_test").prompts, exp.tok.pad_id)
    return cfg, exp, before, after, idx, mask


def test_trained_updates_against_proposition_4_6(trained):
    """4.6's bound holds on every real update (it is a theorem), but its premise does not: Task 1's updates
    act *more* on the principal directions of what a layer reads than r random directions would (rho above
    rho_random), so the bound says little (> 1). Documented in docs/theory.md."""
    _, _, before, after, idx, mask = trained
    rng = np.random.default_rng(0)
    rhos, randoms = [], []
    for bb, ba in zip(before.blocks, after.blocks):
        for linear, norm in (("mlp.up", "mlp_norm"), ("attn.q_proj", "attn_norm"), ("attn.v_proj", "attn_norm")):
            X = module_outputs(before, bb.get_submodule(norm), idx, mask)
            r = input_side_check(bb.get_submodule(linear).weight, ba.get_submodule(linear).weight, X, 4, rng)
            assert r["measured"] <= r["bound"] * (1 + 1e-9)
            rhos.append(r["rho"])
            randoms.append(r["rho_random"])
    print(f"rho: mean {np.mean(rhos):.3f}, random subspace {np.mean(randoms):.3f}")
    assert 0 < min(rhos) and max(rhos) <= 1 + 1e-9
    assert np.mean(rhos) > np.mean(randoms)  # the premise fails on this model


def test_trained_residual_shift_against_4_7_and_4_9(trained):
    """4.7 on the trained model: the shift's share inside the top-4 principal subspace of the features, per
    block, against a random 4-dimensional subspace (sqrt(4/d)). 4.9: the shift's size by depth."""
    _, _, before, after, idx, mask = trained
    hb, ha = last_token_hidden(before, idx, mask), last_token_hidden(after, idx, mask)
    shares = [shift_subspace_share(hb[l], ha[l], 4) for l in range(1, len(hb))]
    shifts = [(ha[l] - hb[l]).norm().item() / hb[l].norm().item() for l in range(len(hb))]
    print("share in P_l by block:", [f"{s:.3f}" for s, _ in shares], f"random {shares[0][1]:.3f}")
    print("relative shift by depth:", [f"{s:.3f}" for s in shifts])
    # Documented, not hoped for: on this model 4.7 does not hold above the first block (the shift sits
    # *more* in the principal subspace than in a random one), and the shift grows over the first blocks,
    # then stays flat instead of growing with depth.
    assert shares[0][0] < shares[0][1] and np.mean([s for s, _ in shares[1:]]) > shares[0][1]
    assert shifts[0] < shifts[1] < shifts[2] and max(shifts[2:]) < 1.2 * min(shifts[2:])


def test_trained_bottom_versus_top_freezing(trained):
    """F.5 on the trained model: Task 1 from the Task-0 model with the bottom block or the top block frozen,
    the same steps: the shift at the last layer, and summed over the layers."""
    import train
    cfg, exp, before, _, idx, mask = trained
    shifts = {}
    for frozen in (0, cfg.n_layer - 1):
        model = copy.deepcopy(before)
        for p in model.blocks[frozen].parameters():
            p.requires_grad_(False)
        for step, _ in enumerate(train.fine_tuning_steps(model, exp.qa_set("task1"), [0], cfg), start=1):
            if step == 20:
                break
        hb, ha = last_token_hidden(before, idx, mask), last_token_hidden(model, idx, mask)
        per_layer = [(ha[l] - hb[l]).norm().item() / hb[l].norm().item() for l in range(1, len(hb))]
        shifts[frozen] = (per_layer[-1], sum(per_layer))
    print(f"bottom block frozen: last {shifts[0][0]:.3f}, summed {shifts[0][1]:.3f}; "
          f"top block frozen: last {shifts[cfg.n_layer - 1][0]:.3f}, summed {shifts[cfg.n_layer - 1][1]:.3f}")
    assert shifts[0][1] < shifts[cfg.n_layer - 1][1]  # summed over the layers, bottom freezing shifts less
