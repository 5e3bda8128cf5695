"""Checks of theory.py: every statement holds over a sweep of seeds and sizes, the checks fail when an
assumption is broken on purpose, and the transformer measurement (part 3) behaves as it must."""
import copy
import itertools
import os

import numpy as np
import pytest
import torch

from theory import (SWEEP, TheoryConfig, accumulation, check_rows, control_rows, growth, holds, make_net,
                    plot, principal_projector, residual_shift, single_layer, telescoping, wedin, whole_network)

SIZES = [  # (d, L, delta, eps, k)
    (16, 4, 0.01, 0.01, 0),
    (32, 8, 0.01, 0.02, 0),
    (64, 12, 0.005, 0.01, 0),
    (32, 8, 0.02, 0.05, 3),
    (24, 16, 0.005, 0.01, 10),
]
CONFIGS = [TheoryConfig(d=d, L=L, delta=delta, eps=eps, k=k, seed=seed)
           for (d, L, delta, eps, k), seed in itertools.product(SIZES, range(4))]


def config_id(cfg):
    return f"d{cfg.d}-L{cfg.L}-delta{cfg.delta}-eps{cfg.eps}-k{cfg.k}-seed{cfg.seed}"


def alignment(net, l):
    """||P_l D_l||_F / ||D_l||_F: 0 when the shift is orthogonal to the principal subspace, 1 inside it."""
    D = net.Xt[l] - net.X[l]
    return np.linalg.norm(principal_projector(net.X[l], net.cfg.r) @ D) / np.linalg.norm(D)


# ---- the statements hold, and their bounds say something

@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_statements_hold(cfg):
    net = make_net(cfg)
    assert telescoping(net) <= 1e-10
    measured, bound = single_layer(net)
    assert measured <= bound < 0.1            # 4.6, and the bound is far from the trivial 1
    measured, bound = whole_network(net)
    assert measured <= bound < 1              # 4.7, and not vacuous
    s0 = np.linalg.svd(net.X[0], compute_uv=False)
    for l in range(1, cfg.L + 1):             # the proofs' key step: Wedin's bound on how far P_l turns
        P = principal_projector(net.X[l], cfg.r)
        s = np.linalg.svd(net.X[l - 1], compute_uv=False)
        assert np.linalg.norm(P - principal_projector(net.X[l - 1], cfg.r), 2) <= wedin(cfg.delta, s, cfg.r)
        assert np.linalg.norm(P - principal_projector(net.X[0], cfg.r), 2) <= wedin((1 + cfg.delta) ** l - 1, s0, cfg.r)
    a, L, k = 1 + cfg.delta + cfg.eps, cfg.L, cfg.k
    for l in range(k + 1, L + 1):             # 4.9 / F.5 on every prefix of the network
        measured, lower, upper = accumulation(net, l)
        assert 0 < lower <= measured <= upper
        assert upper <= (l - k) * cfg.eps * a ** (l - 1) * (1 + 1e-12)  # equality at l = k + 1


def test_telescoping_is_exact_for_every_update_kind():
    for update in ("orthogonal", "independent", "aligned"):
        assert telescoping(make_net(TheoryConfig(update=update, L=12, delta=0.3, eps=0.2))) <= 1e-10


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("d", [16, 64])
def test_shift_grows_linearly_with_depth(seed, d):
    net = make_net(TheoryConfig(d=d, L=16, delta=0.005, seed=seed))
    shifts = np.array([accumulation(net, l)[0] for l in range(1, 17)])
    per_layer = shifts / np.arange(1, 17)     # constant when the growth is linear
    assert np.corrcoef(np.arange(1, 17), shifts)[0, 1] > 0.999
    assert per_layer.max() / per_layer.min() < 1.1
    assert holds(growth(net), "~=", 2.0)


@pytest.mark.parametrize("seed", range(3))
def test_freezing_shrinks_the_shift(seed):
    L = 12
    results = [accumulation(make_net(TheoryConfig(L=L, k=k, seed=seed))) for k in range(L)]
    measured = np.array([m for m, _, _ in results])
    uppers = np.array([u for _, _, u in results])
    assert np.all(np.diff(measured) < 0) and np.all(np.diff(uppers) < 0)
    # each frozen layer removes about one layer's worth: shift(k) / shift(0) ~ (L - k) / L
    assert np.allclose(measured / measured[0], (L - np.arange(L)) / L, rtol=0.1)


# ---- negative controls: break an assumption and the check must fail

@pytest.mark.parametrize("seed", range(4))
def test_aligned_updates_are_not_orthogonal(seed):
    net = make_net(TheoryConfig(update="aligned", seed=seed))
    for measured, bound in (single_layer(net), whole_network(net)):
        assert measured > 0.9 and not holds(measured, "<=", bound)
    assert alignment(net, net.cfg.L) > 0.9


@pytest.mark.parametrize("seed", range(4))
def test_large_delta_breaks_orthogonality(seed):
    big = make_net(TheoryConfig(d=16, L=8, delta=1.0, seed=seed))
    assert alignment(big, big.cfg.L) > 0.3    # the shift is no longer nearly orthogonal
    claimed = copy.copy(big)
    claimed.cfg = TheoryConfig(d=16, L=8, delta=0.01, seed=seed)
    measured, bound = whole_network(claimed)
    assert not holds(measured, "<=", bound)   # the small-delta bound fails
    measured, bound = whole_network(big)
    assert bound >= 1 and measured <= bound   # the true-delta bound is vacuous, yet still true


@pytest.mark.parametrize("seed", range(4))
def test_independent_updates_grow_sublinearly(seed):
    net = make_net(TheoryConfig(L=16, delta=0.005, update="independent", seed=seed))
    assert not holds(growth(net), "~=", 2.0)  # about sqrt(2): a random walk, not a linear drift
    measured, lower, upper = accumulation(net)
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
