"""
Why forgetting can be spurious: shifts in a residual network, stated precisely and checked numerically.

This file is this project's own formulation of the theory in Zheng et al. (ICLR 2025), section 4 and
appendix F. The paper's exact statements were not available to us; every statement below carries
explicit constants, a short proof, and a numerical check (run `python theory.py`, or pytest).

Setting (the paper's Definition 4.1 and Assumptions 4.3-4.4). Features X_0 in R^{d x n} (n samples as
columns) pass through L linear residual layers

    X_l = A_l X_{l-1},   A_l = I + W_l,   ||W_l||_2 <= delta,

and an update (say, fine-tuning on a new task) perturbs the weights, W_l -> W_l + dW_l with
||dW_l||_2 <= eps, giving A~_l = I + W_l + dW_l and features X~_l (X~_0 = X_0). The shift of layer l is
D_l = X~_l - X_l. P_l is the orthogonal projector onto the principal subspace of X_l: the span of its
top-r left singular vectors (uncentred PCA; the samples of our X_0 average to about zero). s_1 >= s_2 >= ... are the
singular values of X_0, and g = s_r - s_{r+1} its spectral gap. Two facts used throughout:
  (a) ||(I + M_1)...(I + M_j) - I||_2 <= (1 + m)^j - 1 if every ||M_i||_2 <= m  (expand the product);
  (b) Wedin's sin-theta theorem: if Y = X + E, the top-r left singular subspaces of X and Y satisfy
      ||P_Y - P_X||_2 <= ||E||_2 / (s_r(X) - s_{r+1}(X) - ||E||_2) when the denominator is positive
      (Stewart & Sun 1990, Thm V.4.4, whose gap s_r(Y) - s_{r+1}(X) is at least this by Weyl's inequality).
We write w(b) for (b) with ||E||_2 = b s_1 on X_0 (w(b) = 1 when vacuous), and beta_l = (1+delta)^l - 1,
so that X_l = (I + E_l) X_0 with ||E_l||_2 <= beta_l by (a), hence ||P_l - P_0||_2 <= w(beta_l).
"""
import argparse
import math
import os
import tempfile
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class TheoryConfig:
    d: int = 32                  # feature dimension
    n: int = 256                 # number of samples (columns of X_0)
    r: int = 4                   # dimension of the principal subspace
    L: int = 8                   # number of residual layers
    delta: float = 0.01          # ||W_l||_2, the (assumed) size of the pretrained weights
    eps: float = 0.01            # ||dW_l||_2, the size of the update
    k: int = 0                   # freeze layers 1..k: dW_l = 0 there (Corollary F.5)
    update: str = "orthogonal"   # "orthogonal": one update direction that writes outside P_{l-1};
                                 # "independent": a fresh such direction per layer; "aligned": writes inside P_{l-1}
    noise: float = 0.05          # isotropic noise on top of the rank-r signal of X_0
    seed: int = 0


@dataclass
class Net:
    cfg: TheoryConfig
    W: list    # L matrices (d, d), ||W_l||_2 = delta
    dW: list   # L matrices (d, d), ||dW_l||_2 = eps, zero for frozen layers
    X: list    # L+1 features (d, n): X[l] = X_l before the update
    Xt: list   # L+1 features (d, n): X~_l after the update


def orth(G):
    return np.linalg.qr(G)[0]


def spec(M):
    return np.linalg.norm(M, 2)


def principal_projector(X, r):
    U = np.linalg.svd(X, full_matrices=False)[0][:, :r]  # (d, r)
    return U @ U.T                                        # (d, d)


def forward(X0, W):
    X = [X0]
    for Wl in W:
        X.append(X[-1] + Wl @ X[-1])  # (I + W_l) X_{l-1}
    return X


def make_net(cfg):
    """Features with a clear principal subspace, small random weights, and an update that reads the
    principal features and writes them into new directions: the picture of a new task moving features."""
    rng = np.random.default_rng(cfg.seed)
    d, n, r = cfg.d, cfg.n, cfg.r
    signal = orth(rng.standard_normal((d, r))) * np.linspace(1.5, 1.0, r) @ orth(rng.standard_normal((n, r))).T
    X0 = math.sqrt(n) * signal + cfg.noise * rng.standard_normal((d, n))  # (d, n), s_1..s_r ~ (1.5..1) sqrt(n)
    W = [cfg.delta * G / spec(G) for G in rng.standard_normal((cfg.L, d, d))]
    X = forward(X0, W)
    U0 = np.linalg.svd(X0, full_matrices=False)[0][:, :r]  # (d, r) the inputs the update reads
    G = orth(rng.standard_normal((d, r))) @ U0.T            # (d, d) shared direction: coherent across layers
    dW = []
    for l in range(1, cfg.L + 1):
        if l <= cfg.k:
            dW.append(np.zeros((d, d)))
            continue
        if cfg.update == "independent":
            G = orth(rng.standard_normal((d, r))) @ U0.T
        P = principal_projector(X[l - 1], r)
        M = (P if cfg.update == "aligned" else np.eye(d) - P) @ G  # output side inside / outside P_{l-1}
        dW.append(cfg.eps * M / spec(M))
    Xt = forward(X0, [Wl + dWl for Wl, dWl in zip(W, dW)])
    return Net(cfg, W, dW, X, Xt)


def wedin(b, s, r):
    """Bound (b) on ||P_Y - P_X||_2 for ||E||_2 = b s_1, where s are the singular values of X."""
    gap = s[r - 1] - s[r] - b * s[0]
    return 1.0 if gap <= 0 else min(1.0, b * s[0] / gap)


def telescoping(net):
    """Identity: X~_L - X_L = sum_l (A~_L ... A~_{l+1}) dW_l X_{l-1}.
    Proof: D_l = A~_l X~_{l-1} - A_l X_{l-1} = A~_l D_{l-1} + dW_l X_{l-1}; unroll from D_0 = 0.
    Returns the largest entrywise error (float64 rounding only)."""
    d = net.cfg.d
    total = np.zeros_like(net.X[0])
    for l in range(1, net.cfg.L + 1):
        prod = np.eye(d)
        for m in range(l + 1, net.cfg.L + 1):
            prod = (np.eye(d) + net.W[m - 1] + net.dW[m - 1]) @ prod  # A~_L ... A~_{l+1}
        total += prod @ net.dW[l - 1] @ net.X[l - 1]
    return np.abs(total - (net.Xt[-1] - net.X[-1])).max()


def single_layer(net):
    """Proposition 4.6 (one layer). Let X = X_{l-1} have singular values s_i and assume P_{l-1} dW_l = 0
    (the update writes outside the principal subspace of its input). The shift the update causes at
    the layer's output, T = dW_l X_{l-1}, has in-subspace share
        ||P_l T||_F / ||T||_F  <=  delta s_1 / (s_r - s_{r+1} - delta s_1)   (when the denominator is > 0),
    and its square bounds the share of the shift's energy inside P_l.
    Proof: P_{l-1} T = 0, so P_l T = (P_l - P_{l-1}) T and the share is at most ||P_l - P_{l-1}||_2;
    X_l = X + W_l X with ||W_l X||_2 <= delta s_1, so Wedin's theorem (b) gives the bound.
    Returns (measured, bound) at the layer where measured / bound is largest."""
    cfg, worst = net.cfg, (0.0, 1.0)
    for l in range(cfg.k + 1, cfg.L + 1):
        T = net.dW[l - 1] @ net.X[l - 1]  # (d, n)
        measured = np.linalg.norm(principal_projector(net.X[l], cfg.r) @ T) / np.linalg.norm(T)
        bound = wedin(cfg.delta, np.linalg.svd(net.X[l - 1], compute_uv=False), cfg.r)
        worst = max(worst, (measured, bound), key=lambda mb: mb[0] / mb[1])
    return worst


def whole_network(net):
    """Proposition 4.7 (every layer). If P_{m-1} dW_m = 0 for every m, then for every layer l > k
        ||P_l D_l||_F  <=  c_l * S_l,   c_l = 2 w(beta_l) + (1 + delta + eps)^(l-k-1) - 1,
    where S_l = sum_m ||dW_m X_{m-1}||_F is the first-order size of the shift (the sum of what each
    layer injects). For small delta, eps and a clear gap, c_l = O(l (delta s_1 / g + eps)): the shift
    stays nearly orthogonal to the features' principal components at every depth.
    Proof: by the identity, D_l = sum_m (I + R_m) T_m with T_m = dW_m X_{m-1} = (I - P_{m-1}) T_m and
    R_m = A~_l ... A~_{m+1} - I, ||R_m||_2 <= (1+delta+eps)^(l-m) - 1 by (a). Then
    P_l (I + R_m) T_m = (P_l - P_{m-1}) T_m + P_l R_m T_m, and ||P_l - P_{m-1}||_2 <= w(beta_l) + w(beta_{m-1})
    <= 2 w(beta_l) by the triangle inequality through P_0 and (b) (w grows with b); sum over
    k < m <= l, where (1+delta+eps)^(l-m) <= (1+delta+eps)^(l-k-1).
    Returns (measured ||P_l D_l||_F / S_l, c_l) at the layer where their ratio is largest."""
    cfg, worst = net.cfg, (0.0, 1.0)
    s = np.linalg.svd(net.X[0], compute_uv=False)
    budget = 0.0
    for l in range(cfg.k + 1, cfg.L + 1):
        budget += np.linalg.norm(net.dW[l - 1] @ net.X[l - 1])
        D = net.Xt[l] - net.X[l]  # (d, n)
        measured = np.linalg.norm(principal_projector(net.X[l], cfg.r) @ D) / budget
        c = 2 * wedin((1 + cfg.delta) ** l - 1, s, cfg.r) + (1 + cfg.delta + cfg.eps) ** (l - cfg.k - 1) - 1
        worst = max(worst, (measured, c), key=lambda mb: mb[0] / mb[1])
    return worst


def accumulation(net, l=None):
    """Proposition 4.9 and Corollary F.5 (accumulation, with the bottom k layers frozen). For the
    first l layers, with a = 1 + delta + eps and b = 1 + delta,
        ||D_l||_F / ||X_0||_F  <=  U_l = b^k (a^(l-k) - b^(l-k))  <=  (l - k) eps a^(l-1),
        ||D_l||_F / ||X_0||_F  >=  F_l - (U_l - (l - k) eps),
    where F_l = ||sum_{m>k} dW_m X_0||_F / ||X_0||_F is the first-order drive of the update.
    Upper: in the identity ||term_m||_F <= a^(l-m) eps b^(m-1) ||X_0||_F (by (a) and ||X_{m-1}||_F <=
    b^(m-1) ||X_0||_F), and the geometric sum over m = k+1..l is U_l; a^j - b^j <= j (a - b) a^(j-1)
    gives the last form. To first order in (delta, eps) U_l = (l - k) eps: the bound grows linearly in
    depth with constant eps ||X_0||_F per unfrozen layer, and freezing removes the bottom k terms.
    Lower: X_{m-1} = X_0 + S_m with ||S_m||_F <= (b^(m-1) - 1) ||X_0||_F, so term_m = dW_m X_0 + err_m
    with ||err_m||_F <= eps ||X_0||_F (a^(l-m) b^(m-1) - 1); the errors sum to (U_l - (l-k) eps) ||X_0||_F,
    a second-order remainder. When the updates point one way (dW_m ~ dW), F_l ~ (l - k) ||dW X_0||_F /
    ||X_0||_F (about (l - k) eps here, as the update reads the principal features), so the measured
    shift itself grows linearly with the number of unfrozen layers; independent directions give only
    ~ sqrt(l - k), and then the lower bound says little (see the control in the table).
    Returns (measured, lower, upper), all relative to ||X_0||_F."""
    cfg = net.cfg
    l = cfg.L if l is None else l
    a, b, m = 1 + cfg.delta + cfg.eps, 1 + cfg.delta, max(l - cfg.k, 0)
    x0 = np.linalg.norm(net.X[0])
    measured = np.linalg.norm(net.Xt[l] - net.X[l]) / x0
    upper = b ** cfg.k * (a ** m - b ** m)
    drive = np.linalg.norm(sum(net.dW[i] for i in range(l)) @ net.X[0]) / x0
    return measured, drive - (upper - m * cfg.eps), upper


# ----------------------------------------------------------------------------------------------------
# The same measurements on a real transformer (model.py): residual-stream shift between two checkpoints.

@torch.no_grad()
def last_token_hidden(model, idx, attention_mask=None, batch_size=256):
    """Residual stream at the last position (the last prompt token; prompts are left-padded), for
    hidden[0] = embedding and hidden[l] = after block l: a list of n_layer + 1 tensors (B, d_model), float64."""
    was_training = model.training
    model.eval()
    chunks = []
    for i in range(0, idx.shape[0], batch_size):
        mask = None if attention_mask is None else attention_mask[i:i + batch_size]
        _, _, hidden = model(idx[i:i + batch_size], attention_mask=mask, return_hidden=True)
        chunks.append([h[:, -1].double() for h in hidden])
    model.train(was_training)
    return [torch.cat(layer) for layer in zip(*chunks)]


def pc1(H):
    """First principal component (unit vector) of the rows of H (B, d), after centring."""
    return torch.linalg.svd(H - H.mean(0), full_matrices=False).Vh[0]


def angle_deg(u, v):
    """Angle between the lines spanned by unit vectors u and v, in [0, 90] degrees. atan2 of sine and
    cosine stays accurate near 0, where arccos of a rounded cosine would not."""
    c = u @ v
    return math.degrees(math.atan2((v - c * u).norm().item(), abs(c.item())))


def residual_shift(model_before, model_after, idx, attention_mask=None, batch_size=256):
    """Per layer l = 0..n_layer, at the last token: shift = mean_i ||h_after_i - h_before_i||,
    rel_shift = shift / mean_i ||h_before_i||, pc1_angle = angle (degrees) between PC1 before and after."""
    before = last_token_hidden(model_before, idx, attention_mask, batch_size)
    after = last_token_hidden(model_after, idx, attention_mask, batch_size)
    rows = []
    for l, (hb, ha) in enumerate(zip(before, after)):
        shift = (ha - hb).norm(dim=1).mean().item()
        rows.append(dict(layer=l, shift=shift, rel_shift=shift / hb.norm(dim=1).mean().item(),
                         pc1_angle=angle_deg(pc1(hb), pc1(ha))))
    return rows


# ----------------------------------------------------------------------------------------------------
# The sweep: one table of statement, setting, measured, bound, holds.

SWEEP = [
    TheoryConfig(d=16, L=4, delta=0.01, eps=0.01),
    TheoryConfig(d=32, L=8, delta=0.01, eps=0.01),
    TheoryConfig(d=64, L=8, delta=0.02, eps=0.05, seed=1),
    TheoryConfig(d=32, L=16, delta=0.005, eps=0.01, seed=2),
    TheoryConfig(d=32, L=16, delta=0.005, eps=0.01, k=8, seed=2),
    TheoryConfig(d=64, L=8, delta=0.01, eps=0.02, k=4, seed=3),
]


def setting(cfg):
    return f"d={cfg.d} L={cfg.L} delta={cfg.delta:g} eps={cfg.eps:g} k={cfg.k}"


def growth(net):
    """shift(L) / shift(L/2) for an unfrozen net: 2 when the shift grows linearly with depth."""
    return accumulation(net)[0] / accumulation(net, net.cfg.L // 2)[0]


def check_rows(cfg):
    """Rows (statement, setting, measured, relation, bound) for every statement on one configuration."""
    net, where = make_net(cfg), setting(cfg)
    (m6, b6), (m7, b7), (measured, lower, upper) = single_layer(net), whole_network(net), accumulation(net)
    acc = "F.5" if cfg.k else "4.9"
    rows = [("identity, max |error|", where, telescoping(net), "<=", 1e-10),
            ("4.6 share in P_l", where, m6, "<=", b6),
            ("4.7 share in P_l", where, m7, "<=", b7),
            (f"{acc} shift, upper", where, measured, "<=", upper),
            (f"{acc} shift, lower", where, measured, ">=", lower)]
    if not cfg.k:
        rows.append(("4.9 s(L)/s(L/2)", where, growth(net), "~=", 2.0))
    return rows


def control_rows():
    """Assumptions broken on purpose: each of these checks should fail."""
    aligned = make_net(TheoryConfig(update="aligned"))
    big = make_net(TheoryConfig(d=16, L=8, delta=1.0))    # weights 100x larger than the bound assumes
    big = replace(big, cfg=replace(big.cfg, delta=0.01))
    independent = make_net(TheoryConfig(L=16, delta=0.005, update="independent"))
    (m6, b6), (m7, b7), (mb, bb) = single_layer(aligned), whole_network(aligned), whole_network(big)
    return [("4.6 ctrl: aligned dW", "dW writes inside P_{l-1}", m6, "<=", b6),
            ("4.7 ctrl: aligned dW", "dW writes inside P_{l-1}", m7, "<=", b7),
            ("4.7 ctrl: large delta", "||W_l||=1, bound assumes 0.01", mb, "<=", bb),
            ("4.9 ctrl: s(L)/s(L/2)", "independent dW per layer, L=16", growth(independent), "~=", 2.0)]


def holds(measured, relation, bound):
    """<= and >= are the bounds; ~= is the linear-growth check, within 10% of the target."""
    if relation == "~=":
        return abs(measured - bound) <= 0.1 * bound
    return measured <= bound if relation == "<=" else measured >= bound


def save_fig(fig, path):
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)  # readers never see a half-written PNG


def plot(out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    cfg = TheoryConfig(L=16, delta=0.005)
    depth = range(1, cfg.L + 1)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for update in ("orthogonal", "independent"):
        net = make_net(replace(cfg, update=update))
        ax.plot(depth, [accumulation(net, l)[0] for l in depth], "o-", label=f"measured ({update} dW)")
    net = make_net(cfg)
    ax.plot(depth, [accumulation(net, l)[2] for l in depth], "k--", label="upper bound U_l")
    ax.plot(depth, [accumulation(net, l)[1] for l in depth], "k:", label="lower bound (orthogonal dW)")
    ax.set(xlabel="depth l", ylabel=r"$\|\tilde X_l - X_l\|_F \,/\, \|X_0\|_F$",
           title="Prop. 4.9: the shift accumulates with depth")
    ax.legend()
    fig.tight_layout()
    save_fig(fig, os.path.join(out_dir, "shift_vs_depth.png"))
    plt.close(fig)
    frozen = range(cfg.L)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    results = [accumulation(make_net(replace(cfg, k=k))) for k in frozen]
    ax.plot(frozen, [m for m, _, _ in results], "o-", label="measured")
    ax.plot(frozen, [u for _, _, u in results], "k--", label="upper bound")
    ax.plot(frozen, [lo for _, lo, _ in results], "k:", label="lower bound")
    ax.set(xlabel="frozen bottom layers k", ylabel=r"$\|\tilde X_L - X_L\|_F \,/\, \|X_0\|_F$",
           title=f"Cor. F.5: freezing reduces the shift (L={cfg.L})")
    ax.legend()
    fig.tight_layout()
    save_fig(fig, os.path.join(out_dir, "shift_vs_frozen.png"))
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--plot", metavar="DIR", help="also save shift_vs_depth.png and shift_vs_frozen.png here")
    args = parser.parse_args()
    rows = [row for cfg in SWEEP for row in check_rows(cfg)] + control_rows()
    print(f"{'statement':<23} {'setting':<36} {'measured':>9}  {'bound':<12} holds")
    for statement, where, measured, relation, bound in rows:
        ok = "yes" if holds(measured, relation, bound) else "NO"
        print(f"{statement:<23} {where:<36} {measured:>#9.3g}  {relation} {bound:<#9.3g} {ok}")
    if args.plot:
        plot(args.plot)


if __name__ == "__main__":
    main()
