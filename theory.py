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

Each statement is checked by the function named after it (prop_4_6_single_layer, prop_4_7_whole_network,
prop_4_9_accumulation, prop_4_9_growth, cor_f5_summed_shift). The same quantities measured on a trained
transformer are analysis.py's fifth view.
"""
import argparse
import math
import os
from dataclasses import dataclass, replace

import numpy as np

from model import atomic_write  # the project's one atomic-write helper


@dataclass
class TheoryConfig:
    d: int = 32                  # feature dimension
    n: int = 256                 # number of samples (columns of X_0)
    r: int = 4                   # dimension of the principal subspace
    L: int = 8                   # number of residual layers
    delta: float = 0.01          # ||W_l||_2, the (assumed) size of the pretrained weights
    eps: float = 0.01            # ||dW_l||_2, the size of the update
    k: int = 0                   # freeze k layers: dW_l = 0 there (Corollary F.5) ...
    frozen: str = "bottom"       # ... layers 1..k ("bottom") or L-k+1..L ("top")
    update: str = "orthogonal"   # "orthogonal": one direction in every layer (coherent) that reads the principal
                                 #   features and writes outside P_{l-1}; "independent": a fresh such direction
                                 #   per layer; "aligned": writes inside P_{l-1}; "input-orthogonal": reads only
                                 #   directions outside P_{l-1} (the premise of 4.6), writes anywhere
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
        if l in frozen_layers(cfg):
            dW.append(np.zeros((d, d)))
            continue
        if cfg.update == "independent":
            G = orth(rng.standard_normal((d, r))) @ U0.T
        P = principal_projector(X[l - 1], r)
        if cfg.update == "input-orthogonal":
            M = rng.standard_normal((d, d)) @ (np.eye(d) - P)   # input side outside P_{l-1}
        else:
            M = (P if cfg.update == "aligned" else np.eye(d) - P) @ G  # output side inside / outside P_{l-1}
        dW.append(cfg.eps * M / spec(M))
    Xt = forward(X0, [Wl + dWl for Wl, dWl in zip(W, dW)])
    return Net(cfg, W, dW, X, Xt)


def frozen_layers(cfg):
    return set(range(1, cfg.k + 1)) if cfg.frozen == "bottom" else set(range(cfg.L - cfg.k + 1, cfg.L + 1))


def trained_layers(net):
    return [l for l in range(1, net.cfg.L + 1) if l not in frozen_layers(net.cfg)]


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


def prop_4_6_single_layer(net, rho=None):
    """Proposition 4.6 (one layer: an update on directions the features barely use barely moves them).
    Let X = X_{l-1}, P = P_{l-1}, and measure how much of the update acts on the principal directions of
    its input: rho_l = ||dW_l P||_2 / ||dW_l||_2 (0 when dW_l reads only directions outside P). Then the
    shift the update injects at the layer's output, T = dW_l X, satisfies
        ||T||_F  <=  ||dW_l||_2 (rho_l ||X||_F + tau),   tau = ||(I - P) X||_F = sqrt(sum_{i>r} s_i(X)^2),
    and so do the moves of the principal coordinates U_l^T X_l (||U_l^T T||_F <= ||T||_F). A generic
    update of the same size moves the features by up to ||dW_l||_2 ||X||_F; one with small rho_l, on
    features whose energy sits in their top r directions (small tau), by a fraction rho_l + tau/||X||_F.
    Proof: T = (dW_l P)(P X) + dW_l (I - P) X; bound each term by ||AB||_F <= ||A||_2 ||B||_F.
    rho: the value the premise claims, instead of the measured one (the control: a claim that is false).
    Returns (measured ||T||_F / (||dW_l||_2 ||X||_F), bound rho_l + tau / ||X||_F) at the layer where
    their ratio is largest."""
    cfg, worst = net.cfg, (0.0, 1.0)
    for l in trained_layers(net):
        X, dW = net.X[l - 1], net.dW[l - 1]
        P = principal_projector(X, cfg.r)
        rho_l = spec(dW @ P) / spec(dW) if rho is None else rho
        x = np.linalg.norm(X)
        measured = np.linalg.norm(dW @ X) / (spec(dW) * x)
        bound = rho_l + np.linalg.norm(X - P @ X) / x
        worst = max(worst, (measured, bound), key=lambda mb: mb[0] / mb[1])
    return worst


def prop_4_7_whole_network(net, delta=None):
    """Proposition 4.7 (every layer). If every trained layer writes outside the principal subspace of its
    input (P_{m-1} dW_m = 0), then at every layer l
        ||P_l D_l||_F  <=  sum_{m <= l} c_{m,l} ||T_m||_F,   T_m = dW_m X_{m-1},
        c_{m,l} = w_{m,l} + (1 + delta + eps)^(l-m) - 1,
    where w_{m,l} is Wedin's bound (b) between X_{m-1} and X_l = (A_l ... A_m) X_{m-1}, a perturbation of
    size at most beta_{l-m+1} s_1(X_{m-1}) by (a), on the spectrum of X_{m-1}. Every c_{m,l} is
    O((l - m + 1)(delta s_1 / g + eps)): small when the layers between m and l change the features little,
    however deep m sits. So the shift stays nearly orthogonal to the principal components at every depth.
    Proof: by the identity, D_l = sum_m (I + R_m) T_m with T_m = (I - P_{m-1}) T_m and R_m = A~_l ... A~_{m+1}
    - I, ||R_m||_2 <= (1+delta+eps)^(l-m) - 1 by (a); P_l (I + R_m) T_m = (P_l - P_{m-1}) T_m + P_l R_m T_m.
    (Going directly from X_{m-1} to X_l, not through P_0, avoids a term ||P_l - P_{m-1}|| <= 2 w(beta_l) that
    grows with the depth l whatever is frozen.)
    delta: the weight size the premise claims (default: the configuration's).
    Returns (measured ||P_l D_l||_F / S_l, bound / S_l), S_l = sum_m ||T_m||_F, at the layer where their
    ratio is largest."""
    cfg, worst = net.cfg, (0.0, 1.0)
    delta = cfg.delta if delta is None else delta
    injected = {m: np.linalg.norm(net.dW[m - 1] @ net.X[m - 1]) for m in trained_layers(net)}
    spectra = {m: np.linalg.svd(net.X[m - 1], compute_uv=False) for m in injected}
    for l in range(1, cfg.L + 1):
        below = [m for m in injected if m <= l]
        if not below:
            continue
        S = sum(injected[m] for m in below)
        bound = sum((wedin((1 + delta) ** (l - m + 1) - 1, spectra[m], cfg.r) + (1 + delta + cfg.eps) ** (l - m) - 1)
                    * injected[m] for m in below)
        D = net.Xt[l] - net.X[l]  # (d, n)
        measured = np.linalg.norm(principal_projector(net.X[l], cfg.r) @ D) / S
        worst = max(worst, (measured, bound / S), key=lambda mb: mb[0] / mb[1])
    return worst


def prop_4_9_accumulation(net, l=None):
    """Proposition 4.9 and Corollary F.5 (accumulation, with k layers frozen). For the first l layers, with
    a = 1 + delta + eps, b = 1 + delta and c_j = a for a trained layer j, b for a frozen one,
        ||D_l||_F / ||X_0||_F  <=  U_l = sum_{trained m <= l} eps b^(m-1) c_{m+1} ... c_l,
        ||D_l||_F / ||X_0||_F  >=  F_l - (U_l - n_l eps),
    where n_l counts the trained layers up to l and F_l = ||sum_{trained m <= l} dW_m X_0||_F / ||X_0||_F is
    the first-order drive of the update. With the bottom k frozen, U_l = b^k (a^(l-k) - b^(l-k)) <= (l - k)
    eps a^(l-1). To first order in (delta, eps), U_l = n_l eps: the bound grows linearly with the number
    of trained layers below l, eps ||X_0||_F each.
    Upper: in the identity ||term_m||_F <= (c_l ... c_{m+1}) eps ||X_{m-1}||_F, ||X_{m-1}||_F <= b^(m-1) ||X_0||_F.
    Lower: X_{m-1} = X_0 + S_m with ||S_m||_F <= (b^(m-1) - 1) ||X_0||_F, so term_m = dW_m X_0 + err_m, and
    the errors sum to at most (U_l - n_l eps) ||X_0||_F, a second-order remainder.
    How F_l itself grows is the premise of the growth statements (see prop_4_9_growth()): n_l eps when every layer's
    update points one way (coherent), ~ sqrt(n_l) eps for independent random directions.
    Returns (measured, lower, upper), all relative to ||X_0||_F."""
    cfg = net.cfg
    l = cfg.L if l is None else l
    a, b, eps = 1 + cfg.delta + cfg.eps, 1 + cfg.delta, cfg.eps
    trained = [m for m in trained_layers(net) if m <= l]
    gain = lambda m: math.prod(a if j in trained else b for j in range(m + 1, l + 1))  # noqa: E731
    upper = sum(eps * b ** (m - 1) * gain(m) for m in trained)
    x0 = np.linalg.norm(net.X[0])
    measured = np.linalg.norm(net.Xt[l] - net.X[l]) / x0
    drive = np.linalg.norm(sum((net.dW[m - 1] for m in trained), np.zeros_like(net.W[0])) @ net.X[0]) / x0
    return measured, drive - (upper - len(trained) * eps), upper


def cor_f5_summed_shift(net):
    """Corollary F.5, asymmetric form: the shift summed over every layer, sum_l ||D_l||_F / ||X_0||_F, since
    every layer above a shifted one reads shifted features. Returns (measured, lower, upper): the sums of
    prop_4_9_accumulation()'s three values over l = 1..L.
    Freezing the bottom k layers removes their shift from every layer above; freezing the top k only from
    those k. With coherent updates of equal size (premise: each trained layer's drive adds
    ||dW X_0||_F ~ eps ||X_0||_F, so F_l ~ n_l eps), the sums are to first order eps (L-k)(L-k+1)/2 for the
    bottom and eps ((L-k)(L-k+1)/2 + k (L-k)) for the top: the upper bound of the first falls below the
    lower bound of the second, and bottom freezing provably leaves less shift. The last layer alone
    cannot tell them apart: there both leave (L - k) layers' worth."""
    values = np.array([prop_4_9_accumulation(net, l) for l in range(1, net.cfg.L + 1)])  # (L, 3)
    return tuple(values.sum(axis=0))


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


def prop_4_9_growth(net):
    """shift(L) / shift(L/2) for an unfrozen net. Proposition 4.9's two cases, to first order in (delta, eps):
    coherent updates (one direction in every layer, the drive F_l = l ||dW X_0||_F / ||X_0||_F) give 2: linear
    growth, true by construction once the directions agree; independent random directions (zero mean,
    independent across layers, E||sum_m dW_m X_0||^2 = sum_m E||dW_m X_0||^2) give sqrt(2): a random walk."""
    return prop_4_9_accumulation(net)[0] / prop_4_9_accumulation(net, net.cfg.L // 2)[0]


def prop_4_9_independent_growth(cfg, draws=8):
    """prop_4_9_growth() with independent update directions, averaged over `draws` seeds: the statement is about the
    expectation, and one draw of 16 random directions can land 15% from it."""
    return float(np.mean([prop_4_9_growth(make_net(replace(cfg, update="independent", seed=cfg.seed + i))) for i in range(draws)]))


def check_rows(cfg):
    """Rows (statement, setting, measured, relation, bound) for every statement on one configuration."""
    net, where = make_net(cfg), setting(cfg)
    (m6, b6) = prop_4_6_single_layer(make_net(replace(cfg, update="input-orthogonal")))
    (m7, b7), (measured, lower, upper) = prop_4_7_whole_network(net), prop_4_9_accumulation(net)
    acc = "F.5" if cfg.k else "4.9"
    rows = [("identity, max |error|", where, telescoping(net), "<=", 1e-10),
            ("4.6 feature move", where, m6, "<=", b6),
            ("4.7 share in P_l", where, m7, "<=", b7),
            (f"{acc} shift, upper", where, measured, "<=", upper),
            (f"{acc} shift, lower", where, measured, ">=", lower)]
    if not cfg.k:
        rows.append(("4.9 coherent s(L)/s(L/2)", where, prop_4_9_growth(net), "~=", 2.0))
        if cfg.L >= 8:  # a random walk needs a few steps, and a few draws, to average
            rows.append(("4.9 indep. s(L)/s(L/2), 8 draws", where, prop_4_9_independent_growth(cfg), "~=", math.sqrt(2)))
    else:
        bottom, top = cor_f5_summed_shift(net), cor_f5_summed_shift(make_net(replace(cfg, frozen="top")))
        rows += [("F.5 sum_l shift, bottom", where, bottom[0], "<=", bottom[2]),
                 ("F.5 sum_l shift, top", where, top[0], ">=", top[1]),
                 ("F.5 bottom upper < top lower", where, bottom[2], "<", top[1])]
    return rows


def control_rows():
    """Assumptions broken on purpose: each of these checks should fail."""
    aligned = make_net(TheoryConfig(update="aligned"))
    big = make_net(TheoryConfig(d=16, L=8, delta=1.0))    # weights 100x larger than the bound assumes
    independent = TheoryConfig(L=16, delta=0.005)
    coherent = make_net(TheoryConfig(L=16, delta=0.005))
    bottom, top = (make_net(TheoryConfig(L=16, delta=0.005, k=4, frozen=f)) for f in ("bottom", "top"))
    (m6, b6), (m7, b7), (mb, bb) = prop_4_6_single_layer(aligned, rho=0.0), prop_4_7_whole_network(aligned), prop_4_7_whole_network(big, delta=0.01)
    return [("4.6 ctrl: reads P_{l-1}", "premise claims rho=0; dW reads principal", m6, "<=", b6),
            ("4.7 ctrl: aligned dW", "dW writes inside P_{l-1}", m7, "<=", b7),
            ("4.7 ctrl: large delta", "||W_l||=1, bound assumes 0.01", mb, "<=", bb),
            ("4.9 ctrl: coherent, indep.", "independent dW per layer, L=16", prop_4_9_independent_growth(independent), "~=", 2.0),
            ("4.9 ctrl: indep., coherent", "one dW direction, L=16", prop_4_9_growth(coherent), "~=", math.sqrt(2)),
            ("F.5 ctrl: last layer only", "s_L(bottom 4) / s_L(top 4), L=16", prop_4_9_accumulation(bottom)[0] / prop_4_9_accumulation(top)[0],
             "<", 0.9)]


def vacuity_rows(deltas=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5), L=8):
    """Where the bounds stop saying anything, as the weights grow: per delta, 4.7's bound on the in-subspace
    share (vacuous at >= 1), 4.9's upper bound over the measured shift (its looseness), and 4.9's lower
    bound (vacuous at <= 0)."""
    rows = []
    for delta in deltas:
        net = make_net(TheoryConfig(L=L, delta=delta))
        (m7, b7), (measured, lower, upper) = prop_4_7_whole_network(net), prop_4_9_accumulation(net)
        rows.append(dict(delta=delta, share=m7, share_bound=b7, shift=measured, upper_over_measured=upper / measured,
                         lower=lower))
    return rows


def holds(measured, relation, bound):
    """<=, >= and < are the bounds; ~= is a growth check, within 10% of the target."""
    if relation == "~=":
        return abs(measured - bound) <= 0.1 * bound
    return {"<=": measured <= bound, ">=": measured >= bound, "<": measured < bound}[relation]


def tightness(measured, relation, bound):
    """How far a bound sits from what it bounds: bound / measured for upper bounds, measured / bound for
    lower ones (1 = tight); blank for the other rows."""
    if relation in ("<=", "<") and measured > 0:
        return bound / measured
    if relation == ">=" and bound > 0:
        return measured / bound
    return float("nan")


def save_fig(fig, path):
    with atomic_write(path, "wb") as f:  # readers never see a half-written PNG
        fig.savefig(f, format="png", dpi=120)


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
        ax.plot(depth, [prop_4_9_accumulation(net, l)[0] for l in depth], "o-", label=f"measured ({update} dW)")
    net = make_net(cfg)
    ax.plot(depth, [prop_4_9_accumulation(net, l)[2] for l in depth], "k--", label="upper bound U_l")
    ax.plot(depth, [prop_4_9_accumulation(net, l)[1] for l in depth], "k:", label="lower bound (orthogonal dW)")
    ax.set(xlabel="depth l", ylabel=r"$\|\tilde X_l - X_l\|_F \,/\, \|X_0\|_F$",
           title="Prop. 4.9: the shift accumulates with depth")
    ax.legend()
    fig.tight_layout()
    save_fig(fig, os.path.join(out_dir, "shift_vs_depth.png"))
    plt.close(fig)
    frozen = range(cfg.L)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    results = [prop_4_9_accumulation(make_net(replace(cfg, k=k))) for k in frozen]
    ax.plot(frozen, [m for m, _, _ in results], "o-", label="measured")
    ax.plot(frozen, [u for _, _, u in results], "k--", label="upper bound")
    ax.plot(frozen, [lo for _, lo, _ in results], "k:", label="lower bound")
    ax.set(xlabel="frozen bottom layers k", ylabel=r"$\|\tilde X_L - X_L\|_F \,/\, \|X_0\|_F$",
           title=f"Cor. F.5: freezing reduces the shift (L={cfg.L})")
    ax.legend()
    fig.tight_layout()
    save_fig(fig, os.path.join(out_dir, "shift_vs_frozen.png"))
    plt.close(fig)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, without the usage
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--plot", metavar="DIR", help="also save shift_vs_depth.png and shift_vs_frozen.png here")
    args = parser.parse_args(argv)
    if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
        parser.error(f"--plot {args.plot}: expected a directory, not a file")
    rows = [row for cfg in SWEEP for row in check_rows(cfg)] + control_rows()
    print(f"{'statement':<29} {'setting':<36} {'measured':>9}  {'bound':<12} {'tightness':>9}  holds")
    for statement, where, measured, relation, bound in rows:
        ok = "yes" if holds(measured, relation, bound) else "NO"
        tight = float("nan") if statement.startswith("identity") else tightness(measured, relation, bound)
        print(f"{statement:<29} {where:<36} {measured:>#9.3g}  {relation:<2} {bound:<#9.3g} "
              f"{'' if math.isnan(tight) else f'{tight:#9.3g}':>9}  {ok}")
    print("\nWhere the bounds stop saying anything (d=32, L=8, eps=0.01, coherent updates):")
    print(f"{'delta':>6} {'4.7 share':>10} {'4.7 bound':>10} {'4.9 shift':>10} {'upper/meas.':>12} {'4.9 lower':>10}")
    for r in vacuity_rows():
        print(f"{r['delta']:>6g} {r['share']:>10.3g} {r['share_bound']:>10.3g} {r['shift']:>10.3g}"
              f" {r['upper_over_measured']:>12.3g} {r['lower']:>10.3g}")
    if args.plot:
        try:
            plot(args.plot)
        except OSError as e:
            parser.exit(1, f"{parser.prog}: error: --plot {args.plot}: {e.strerror}\n")


if __name__ == "__main__":
    main()
