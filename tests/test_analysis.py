"""analysis.py: each view's measurement on hand-made cases, and the whole run on the tiny preset."""
import os

import numpy as np
import pytest
import torch

import analysis
import theory
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
    u = theory.pc1(H)
    assert theory.angle_deg(u, -u) == pytest.approx(0.0, abs=1e-6)
    assert theory.angle_deg(u, u) == pytest.approx(0.0, abs=1e-6)


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


def test_tiny_preset_end_to_end(tmp_path):
    out = analysis.main(["--preset", "tiny", "--runs", str(tmp_path)])
    assert sorted(os.listdir(out)) == ["analysis.json", "feature-shift.png", "fisher-vs-angle.png",
                                       "landscape-freeze.png", "landscape.png", "weight-angles.png"]
    result = analysis.train.read_json(os.path.join(out, "analysis.json"))
    assert "pretraining: 1st half vs 2nd half" in result["angles"]  # a fresh run saves the mid-pretraining model
    projected = {p["step"]: p for p in result["landscape"]["projected"]}
    a, b = result["collapse_window"]
    assert projected[a]["residual"] < 1e-6 and projected[b]["residual"] < 1e-6  # on the plane by construction
    assert all(0 <= v <= 90 for group in result["angles"].values() for v in group.values())
    assert set(result["theory"]) == {"seq", "freeze bottom 1", "freeze top 1"}
    assert result["theory"]["freeze bottom 1"][0]["rel_shift"] == 0.0  # the frozen bottom block moves nothing
