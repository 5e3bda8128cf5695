"""Why Task-0 accuracy collapses, and why it comes back: the paper's views (its Section 4) on the runs
that train.py makes.

    python analysis.py                         # cpu preset: runs/cpu/analysis/*.png, analysis.json, a table
    python analysis.py --out figures/analysis  # the same, written over the committed figures
    python analysis.py --preset tiny           # the same on the tiny preset, in about a minute
    python analysis.py --run runs/cpu/task1-freeze1-XXXX   # the landscape and shifts of another Task-1 run

1. Loss landscape: Task-0 and Task-1 loss on the plane through three Task-1 checkpoints (a just before the
   collapse, b just after, and the final model), with every saved checkpoint projected onto it.
2. Weight-update angles: between the column spaces of two updates of each weight matrix, per layer.
3. Feature shift: how the residual stream at the last prompt token moves, layer by layer.
4. Fisher vs angle: does the Task-0 Fisher (what EWC protects) predict where Task 1's updates turn?
5. The theory (theory.py) measured on the trained model: SEQ, bottom freezing and top freezing.

Missing train.py stages (SEQ Task 1, freeze, top-freeze) are run first. Everything is read from
checkpoints and metrics; nothing here trains, except the stages it asks train.py for.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts threads: busy-waiting stalls a 2-core box

import argparse
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import report
import runs
import theory
import train
from model import Transformer, left_pad
from strategies import diagonal_fisher, make_strategy

COMPONENTS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj", "mlp_in": "mlp.up",
              "mlp_out": "mlp.down"}

# -----------------------------------------------------------------------------------------------
# Checkpoints as flat weight vectors


def load(path):
    return Transformer.from_pretrained(path).eval()


def flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def set_flat(model, vector):
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


@torch.no_grad()
def answer_loss(model, qa, batch_size=512):
    """Mean cross-entropy over the answer tokens (and EOS) of every pair in qa."""
    total, count = 0.0, 0
    for s in range(0, len(qa), batch_size):
        inputs, targets, mask = qa.batch(np.arange(s, min(s + batch_size, len(qa))))
        _, loss = model(inputs, targets, loss_mask=mask)
        n = int(mask.sum())
        total, count = total + loss.item() * n, count + n
    return total / count

# -----------------------------------------------------------------------------------------------
# 1. Loss landscape (paper Fig. 3)


def collapse_window(curve, saved):
    """The saved Task-1 steps (a, b), consecutive, between which Task-0 exact match falls fastest per step."""
    em = {r["step"]: r["task0"]["em"] for r in curve if "task0" in r}
    steps = sorted(s for s in saved if s in em)
    pairs = list(zip(steps, steps[1:]))
    return max(pairs, key=lambda ab: (em[ab[0]] - em[ab[1]]) / (ab[1] - ab[0]))


def plane(theta_a, theta_b, theta_final):
    """theta(x, y) = theta_a + x (theta_b - theta_a) + y (theta_final - theta_b), as (origin, u, v)."""
    return theta_a, theta_b - theta_a, theta_final - theta_b


def project(theta, origin, u, v):
    """Least-squares coordinates (x, y) of theta on the plane, over all parameters, and the residual
    ||theta - theta(x, y)|| / ||theta - origin|| (0 = on the plane)."""
    basis = torch.stack([u, v], dim=1)                                       # (P, 2)
    coef = torch.linalg.lstsq(basis, (theta - origin)[:, None]).solution[:, 0]
    residual = (theta - origin - basis @ coef).norm() / (theta - origin).norm().clamp_min(1e-30)
    return coef[0].item(), coef[1].item(), residual.item()


def checkpoints(run_dir, task0_dir):
    """{Task-1 step: checkpoint directory} of a run (step 0 = the Task-0 model, the end = final), and the end step."""
    ckpts = {int(n[5:]): os.path.join(run_dir, "ckpt", n) for n in os.listdir(os.path.join(run_dir, "ckpt"))
             if n.startswith("step-")}
    end = runs.read_json(os.path.join(run_dir, "final", "training_state.json"))["step"]
    ckpts[end] = os.path.join(run_dir, "final")
    ckpts.setdefault(0, os.path.join(task0_dir, "final"))
    return ckpts, end


def run_landscape(run_dir, task0_dir, losses, resolution):
    """The landscape of one Task-1 run on its own plane (its collapse window and end), with every saved
    checkpoint projected onto it."""
    ckpts, end = checkpoints(run_dir, task0_dir)
    a, b = collapse_window(runs.read_metrics(run_dir), ckpts)
    origin, u, v = plane(*(flat(load(ckpts[s])) for s in (a, b, end)))
    xs, ys = np.linspace(-0.5, 1.5, resolution), np.linspace(-0.5, 1.5, resolution)
    grid = landscape(load(ckpts[a]), origin, u, v, xs, ys, losses)
    projected = [dict(zip(("step", "x", "y", "residual"), (step, *project(flat(load(path)), origin, u, v))))
                 for step, path in sorted(ckpts.items())]
    return dict(a=a, b=b, xs=xs.tolist(), ys=ys.tolist(), **{k: g.tolist() for k, g in grid.items()}, projected=projected)


def landscape(model, origin, u, v, xs, ys, losses):
    """{name: (len(ys), len(xs)) grid} of each loss function at theta(x, y)."""
    grid = {name: np.zeros((len(ys), len(xs))) for name in losses}
    for i, y in enumerate(tqdm(ys, desc="landscape", leave=False)):
        for j, x in enumerate(xs):
            set_flat(model, origin + x * u + y * v)
            for name, fn in losses.items():
                grid[name][i, j] = fn(model)
    return grid

# -----------------------------------------------------------------------------------------------
# 2. Weight-update angles (paper Fig. 4)


def rank_99(singular_values, share=0.99):
    """The smallest rank whose singular values hold `share` of the squared Frobenius norm."""
    energy = np.cumsum(np.asarray(singular_values, dtype=np.float64) ** 2)
    return int(np.searchsorted(energy, share * energy[-1] * (1 - 1e-12)) + 1)


def update_angle(A, B):
    """Mean angle (degrees) between B's top left singular vectors and A's column space: each update is
    z-scored (as the authors do), its column space is spanned by the top rank_99 left singular vectors;
    each of B's vectors makes angle arccos ||U_A^T u||. 0 = same space, 90 = orthogonal."""
    def space(M):
        M = (M - M.mean()) / M.std().clamp_min(1e-30)
        U, S, _ = torch.linalg.svd(M.double(), full_matrices=False)
        return U[:, :rank_99(S.numpy())]
    UA, UB = space(A), space(B)
    cos = (UA.T @ UB).norm(dim=0).clamp(max=1.0)                               # (r_B,)
    return math.degrees(torch.arccos(cos).mean().item())


def weight_matrices(model):
    """{(layer, component): weight} for every block's matrices, the embedding (layer 'emb') and the
    unembedding (layer 'head'). Rows index outputs, so left singular vectors live in the output space."""
    out = {("emb", "embed"): model.embed.weight.detach(), ("head", "unembed"): model.lm_head.weight.detach()}
    for l, block in enumerate(model.blocks):
        for name, path in COMPONENTS.items():
            out[(l, name)] = block.get_submodule(path).weight.detach()
    return out


def angles(m0, m1, m2, m3):
    """Per matrix: the angle between update m1 - m0 and update m3 - m2."""
    w = [weight_matrices(m) for m in (m0, m1, m2, m3)]
    return {key: update_angle(w[1][key] - w[0][key], w[3][key] - w[2][key]) for key in w[0]}

# -----------------------------------------------------------------------------------------------
# 3. Feature shift (paper Fig. 5)


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


def feature_shift(before, after, idx, mask):
    """Per layer: the mean shift norm at the last prompt token, the PC1 angle before/after, and the
    features projected on (mean-shift direction, PC1 before) at the last layer, for the scatter."""
    rows = residual_shift(before, after, idx, attention_mask=mask)
    hb = last_token_hidden(before, idx, mask)[-1]
    ha = last_token_hidden(after, idx, mask)[-1]
    shift = (ha - hb).mean(0)
    e1 = shift / shift.norm().clamp_min(1e-30)
    pc = pc1(hb)
    e2 = pc - (pc @ e1) * e1
    e2 = e2 / e2.norm().clamp_min(1e-30)
    scatter = {name: torch.stack([h @ e1, h @ e2], 1).tolist() for name, h in (("before", hb), ("after", ha))}
    return rows, scatter

# -----------------------------------------------------------------------------------------------
# 4. Fisher against angle


def pearson_permutation(x, y, permutations=10000, seed=0):
    """Pearson r of x and y, and the two-sided permutation-test p value (shuffling y)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    r = np.corrcoef(x, y)[0, 1]
    rng = np.random.default_rng(seed)
    null = np.array([np.corrcoef(x, rng.permutation(y))[0, 1] for _ in range(permutations)])
    return float(r), float((np.sum(np.abs(null) >= abs(r)) + 1) / (permutations + 1))


def component_fisher(model, qa, batch_size):
    """Mean diagonal Fisher (per-sample, the one EWC uses) of each weight matrix of weight_matrices()."""
    fisher = diagonal_fisher(model, qa, batch_size)
    names = {("emb", "embed"): "embed.weight", ("head", "unembed"): "lm_head.weight"}
    names |= {(l, c): f"blocks.{l}.{p}.weight" for l in range(len(model.blocks)) for c, p in COMPONENTS.items()}
    return {key: fisher[name].mean().item() for key, name in names.items()}

# -----------------------------------------------------------------------------------------------
# 5. The theory on the trained model: theory.py's quantities measured on real layers


def input_side_check(W_before, W_after, X, r, rng):
    """Proposition 4.6 on one real linear layer: W (out, in) before and after an update, X (in, n) the
    inputs it read (before the update). Returns rho (how much of the update acts on the inputs' top-r
    principal directions), the same for r random directions (what an update blind to the features would
    give), and the statement's measured / bound values."""
    dW, X = (W_after - W_before).detach().double().cpu().numpy(), X.detach().double().cpu().numpy()
    P = theory.principal_projector(X, r)
    Q = theory.orth(rng.standard_normal((X.shape[0], r)))
    x = np.linalg.norm(X)
    norm = theory.spec(dW)
    return dict(rho=theory.spec(dW @ P) / norm, rho_random=theory.spec(dW @ Q @ Q.T) / norm,
                rho_frobenius=np.linalg.norm(dW @ P) / np.linalg.norm(dW),  # the same, energy-wise
                measured=np.linalg.norm(dW @ X) / (norm * x),
                bound=theory.spec(dW @ P) / norm + np.linalg.norm(X - P @ X) / x)


@torch.no_grad()
def module_outputs(model, module, idx, attention_mask):
    """What `module` (a part of model) outputs on these prompts, at every real token: (width, n). In a
    pre-norm block, a norm's output is the input of the linear layers after it (attn_norm feeds q, k and v;
    mlp_norm feeds the MLP's first layer)."""
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        model(idx, attention_mask=attention_mask)
    finally:
        handle.remove()
    x = seen[0]                                                   # (B, T, width)
    real = attention_mask.bool() if attention_mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
    return x[real].T                                              # (width, n)


def shift_subspace_share(h_before, h_after, r):
    """Proposition 4.7 on real features (rows = samples): the share of the shift D = h_after - h_before
    inside the top-r principal subspace of h_before, ||D P||_F / ||D||_F, and what a random r-dimensional
    subspace would hold, sqrt(r / d)."""
    H, D = h_before.double().cpu().numpy().T, (h_after - h_before).double().cpu().numpy().T  # (d, n)
    share = np.linalg.norm(theory.principal_projector(H, r) @ D) / np.linalg.norm(D)
    return share, math.sqrt(r / H.shape[0])


def theory_on_model(before, after, idx, mask, r=4, seed=0):
    """Per block: input-side orthogonality rho of the update of each matrix that reads the residual stream
    (against random directions), the in-subspace share of the last-token shift, and the relative shift."""
    rng = np.random.default_rng(seed)
    hb, ha = last_token_hidden(before, idx, mask), last_token_hidden(after, idx, mask)
    rows = []
    for l, (bb, ba) in enumerate(zip(before.blocks, after.blocks)):
        rho = {}
        for name, norm in (("q", "attn_norm"), ("k", "attn_norm"), ("v", "attn_norm"), ("mlp_in", "mlp_norm")):
            X = module_outputs(before, bb.get_submodule(norm), idx, mask)
            path = COMPONENTS[name]
            W0, W1 = bb.get_submodule(path).weight, ba.get_submodule(path).weight
            rho[name] = input_side_check(W0, W1, X, r, rng) if not torch.equal(W0, W1) else None
        moved = not torch.equal(hb[l + 1], ha[l + 1])  # a frozen bottom leaves the features where they were
        share, random_share = shift_subspace_share(hb[l + 1], ha[l + 1], r) if moved else (None, None)
        trained = [v for v in rho.values() if v]
        rows.append(dict(layer=l, rho=float(np.mean([v["rho"] for v in trained])) if trained else None,
                         rho_random=float(np.mean([v["rho_random"] for v in trained])) if trained else None,
                         rho_frobenius=float(np.mean([v["rho_frobenius"] for v in trained])) if trained else None,
                         share=share, share_random=random_share,
                         rel_shift=((ha[l + 1] - hb[l + 1]).norm() / hb[l + 1].norm()).item()))
    return rows

# -----------------------------------------------------------------------------------------------
# Plots


def plot_landscape(result, path, title):
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs, ys = result["xs"], result["ys"]
    for ax, name in zip(axes, ("task0_loss", "task1_loss")):
        cs = ax.contourf(xs, ys, np.array(result[name]), levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax)
        for p in result["projected"]:
            ax.plot(p["x"], p["y"], "w.", ms=5)
            ax.annotate(str(p["step"]), (p["x"], p["y"]), color="w", fontsize=6)
        for label, (x, y) in (("a", (0, 0)), ("b", (1, 0)), ("end", (1, 1))):
            ax.plot(x, y, "r*", ms=9)
            ax.annotate(label, (x, y), color="r", fontsize=8)
        ax.set(xlabel=f"x: theta_b - theta_a (steps {result['a']}->{result['b']})", ylabel="y: theta_final - theta_b",
               title=f"{name.replace('_', ' ')}: {title}", xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]))
    report.save_figure(fig, path)


def plot_angles(groups, path):
    plt = report.pyplot()
    keys = list(next(iter(groups.values())))
    layers = list(dict.fromkeys(k[0] for k in keys))
    comps = list(dict.fromkeys(k[1] for k in keys if k[0] not in ("emb", "head")))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(4 * len(groups) + 4, 3.6))
    for number, (ax, (name, values)) in enumerate(zip(axes, groups.items()), start=1):
        grid = np.full((len(layers), len(comps) + 1), np.nan)
        for (layer, comp), v in values.items():
            i = layers.index(layer)
            grid[i, comps.index(comp) if comp in comps else len(comps)] = v
        im = ax.imshow(grid, vmin=0, vmax=90, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(comps) + 1), comps + ["emb/head"], rotation=45, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_title(f"{number}. {name}", fontsize=8)
    fig.colorbar(im, ax=axes[len(groups) - 1], label="degrees")
    axes[-1].violinplot([list(v.values()) for v in groups.values()], showmedians=True)
    axes[-1].set_xticks(range(1, len(groups) + 1), [str(i) for i in range(1, len(groups) + 1)])
    axes[-1].set(ylabel="degrees", ylim=(0, 90), xlabel="group", title="all matrices, by group")
    report.save_figure(fig, path)


def plot_shift(cases, path):
    plt = report.pyplot()
    fig, axes = plt.subplots(2, len(cases), figsize=(3.6 * len(cases), 6.4))
    for j, (name, (rows, scatter)) in enumerate(cases.items()):
        ax = axes[0, j]
        ax.plot([r["layer"] for r in rows], [r["shift"] for r in rows], "o-", label="shift norm")
        ax2 = ax.twinx()
        ax2.plot([r["layer"] for r in rows], [r["pc1_angle"] for r in rows], "s--", color="C1", label="PC1 angle")
        ax2.set_ylim(0, 90)
        ax.set(xlabel="layer (0 = embedding)", title=name, ylabel="mean shift norm")
        ax2.set_ylabel("PC1 angle (deg)", color="C1")
        ax = axes[1, j]
        for label, points in scatter.items():
            p = np.array(points)
            ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.5, label=label)
        ax.set(xlabel="mean-shift direction", ylabel="PC1 before (orthogonalised)", title="last layer")
        ax.legend(fontsize=7)
    report.save_figure(fig, path)


def plot_fisher(points, r, p, path):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([q["fisher"] for q in points], [q["angle"] for q in points], s=12)
    ax.set_xscale("log")
    ax.set(xlabel="mean Task-0 Fisher of the matrix", ylabel="update angle (deg), collapse vs later Task 1",
           title=f"Pearson r = {r:.3f}, permutation p = {p:.3f}")
    report.save_figure(fig, path)

# -----------------------------------------------------------------------------------------------
# The run: the runs analysed, then one function per view


@dataclass
class Analysed:
    """What every view reads: the configuration and its data, the Task-1 run analysed (SEQ, or --run) with
    its collapse window, the bottom- and top-freeze runs, and the Task-0 test prompts the feature views use."""
    cfg: object
    exp: object            # train.Experiment: the data, the tokenizer, the initial weights
    run_dir: str
    bottom_dir: str
    top_dir: str
    pre_dir: str
    task0_dir: str
    checkpoints: dict      # Task-1 step -> checkpoint directory of the run analysed
    end: int               # its last step
    a: int                 # the collapse window: the saved steps between which Task-0 EM falls fastest
    b: int
    idx: torch.Tensor      # (N, T) left-padded Task-0 test prompts, and their attention mask
    mask: torch.Tensor

    @property
    def frozen(self):
        return make_strategy("freeze", self.cfg.strategy_args).config.freeze_layers


def parse_args(argv):
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a completed Task-1 run directory to analyse (default: this preset's SEQ run)")
    parser.add_argument("--resolution", type=int, default=None, help="landscape grid points per axis (default: cpu"
                                                                      " 9, tiny 5; at least 2)")
    parser.add_argument("--out", help="where the plots and analysis.json go (default: runs/<preset>/analysis; the"
                                      " committed figures: --out figures/analysis)")
    parser.add_argument("--prompts", type=int, default=600, help="Task-0 test prompts for the feature views (>= 2)")
    args, rest = parser.parse_known_args(argv)
    cfg = train.parse_args(rest)[0]  # train.py's flags choose the configuration
    if args.resolution is None:
        args.resolution = 5 if cfg.preset == "tiny" else 9
    if args.resolution < 2:
        parser.error(f"--resolution {args.resolution}: expected 2 or more grid points")
    if args.prompts < 2:
        parser.error(f"--prompts {args.prompts}: expected 2 or more (the views take principal components)")
    if args.run and not os.path.exists(os.path.join(args.run, "summary.json")):
        parser.error(f"--run {args.run}: expected a completed Task-1 run directory (with summary.json)")
    if args.run and not os.path.isdir(os.path.join(args.run, "ckpt")):
        parser.error(f"--run {args.run}: expected a Task-1 run, with the checkpoints it saved (ckpt/)")
    args.out = args.out or os.path.join(cfg.runs, cfg.preset, "analysis")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: expected a directory, not a file")
    return cfg, args


def load_runs(cfg, args):
    """SEQ's Task-1 run (or --run), and Task 1 with the bottom k or the top k blocks frozen, trained first if
    missing."""
    seq_cfg = dataclasses.replace(cfg, strategy="seq")
    bottom_cfg = dataclasses.replace(cfg, strategy="freeze")
    top_cfg = dataclasses.replace(cfg, strategy="freeze", strategy_args=cfg.strategy_args | {"freeze_by": "top"})
    with runs.process_setup(os.path.join(cfg.runs, cfg.preset)):
        run_dir = args.run or train.run_protocol(seq_cfg, "task1")
        bottom_dir, top_dir = train.run_protocol(bottom_cfg, "task1"), train.run_protocol(top_cfg, "task1")
    task0_dir = runs.stage_dir(seq_cfg, "task0")[0]
    print(f"analysing {run_dir}")
    ckpts, end = checkpoints(run_dir, task0_dir)
    a, b = collapse_window(runs.read_metrics(run_dir), ckpts)
    print(f"collapse window: Task-1 steps {a} -> {b} (where Task-0 exact match falls fastest between saved checkpoints)")
    exp = train.Experiment(seq_cfg)
    idx, mask = left_pad(exp.qa_set("task0_test").prompts[:args.prompts], exp.tok.pad_id)
    return Analysed(cfg, exp, run_dir, bottom_dir, top_dir, runs.stage_dir(seq_cfg, "pretrain")[0], task0_dir, ckpts, end,
                a, b, idx, mask)


def landscape_view(r, resolution, out):
    """1. The loss landscape of the run analysed and of the bottom-freeze run, each on its own plane."""
    rng = np.random.default_rng([r.cfg.seed, 13])
    sub = lambda qa: qa.subset(sorted(rng.choice(len(qa), min(len(qa), r.cfg.eval_subset), replace=False).tolist()))  # noqa: E731
    t0_eval, t1_eval = sub(r.exp.qa_set("task0_test")), sub(r.exp.qa_set("task1"))
    losses = {"task0_loss": lambda m: answer_loss(m, t0_eval), "task1_loss": lambda m: answer_loss(m, t1_eval)}
    result = {}
    for name, d in (("landscape", r.run_dir), ("landscape-freeze", r.bottom_dir)):
        result[name] = run_landscape(d, r.task0_dir, losses, resolution)
        plot_landscape(result[name], os.path.join(out, f"{name}.png"), os.path.basename(d))
    return result


def angles_view(r, out):
    """2. Weight-update angles: pretraining's two halves, Task 0 against pretraining, the collapse against
    Task 0, and the rest of Task 1 against the collapse. Returns the angles by group and (layer, component)."""
    init = r.exp.initial_model()
    pre, t0 = load(os.path.join(r.pre_dir, "final")), load(os.path.join(r.task0_dir, "final"))
    m_a, m_b, m_end = load(r.checkpoints[r.a]), load(r.checkpoints[r.b]), load(r.checkpoints[r.end])
    groups = {}
    pre_ckpt = os.path.join(r.pre_dir, "ckpt")
    if os.path.isdir(pre_ckpt) and os.listdir(pre_ckpt):
        mid = load(os.path.join(pre_ckpt, sorted(os.listdir(pre_ckpt))[0]))
        groups["pretraining: 1st half vs 2nd half"] = angles(init, mid, mid, pre)
    else:
        print(f"  (no mid-pretraining checkpoint in {r.pre_dir}: made before train.py saved one; group skipped)")
    groups["Task 0 vs pretraining"] = angles(init, pre, pre, t0)
    groups[f"collapse ({r.a}->{r.b}) vs Task 0"] = angles(pre, t0, m_a, m_b)
    groups[f"later Task 1 vs collapse ({r.a}->{r.b})"] = angles(m_a, m_b, m_b, m_end)
    plot_angles(groups, os.path.join(out, "weight-angles.png"))
    return groups


def shift_view(r, out):
    """3. How the features at the last prompt token move: in Task 0, in the collapse, after it, in all of Task 1."""
    pre, t0 = load(os.path.join(r.pre_dir, "final")), load(os.path.join(r.task0_dir, "final"))
    m_a, m_b, m_end = load(r.checkpoints[r.a]), load(r.checkpoints[r.b]), load(r.checkpoints[r.end])
    cases = {"Task 0: start -> end": (pre, t0), f"Task 1: collapse {r.a} -> {r.b}": (m_a, m_b),
             "Task 1: 200 -> end": (load(r.checkpoints[200]) if 200 in r.checkpoints else m_b, m_end),
             "Task 1: start -> end": (t0, m_end)}
    shifts = {name: feature_shift(x0, x1, r.idx, r.mask) for name, (x0, x1) in cases.items()}
    plot_shift(shifts, os.path.join(out, "feature-shift.png"))
    return {name: rows for name, (rows, _) in shifts.items()}


def fisher_view(r, later, out):
    """4. Does the Task-0 Fisher of a matrix (what EWC protects) predict how far Task 1's later updates turn?"""
    fisher = component_fisher(load(os.path.join(r.task0_dir, "final")).train(), r.exp.qa_set("task0_train"),
                              r.cfg.ft_batch)
    points = [dict(component=f"{l}.{c}", fisher=fisher[(l, c)], angle=later[(l, c)]) for (l, c) in later]
    pearson_r, p = pearson_permutation([q["fisher"] for q in points], [q["angle"] for q in points])
    plot_fisher(points, pearson_r, p, os.path.join(out, "fisher-vs-angle.png"))
    return dict(pearson_r=pearson_r, p_value=p, points=points)


def theory_view(r):
    """5. theory.py's quantities on the trained model, Task 0 -> end of Task 1: SEQ, bottom-k and top-k freezing."""
    t0 = load(os.path.join(r.task0_dir, "final"))
    k = r.frozen
    return {name: theory_on_model(t0, load(os.path.join(d, "final")), r.idx, r.mask)
            for name, d in (("seq", r.run_dir), (f"freeze bottom {k}", r.bottom_dir), (f"freeze top {k}", r.top_dir))}


def main(argv=None):
    cfg, args = parse_args(argv)
    r = load_runs(cfg, args)
    os.makedirs(args.out, exist_ok=True)
    result = {"run": r.run_dir, "collapse_window": [r.a, r.b]} | landscape_view(r, args.resolution, args.out)
    groups = angles_view(r, args.out)
    result["angles"] = {g: {f"{l}.{c}": val for (l, c), val in vals.items()} for g, vals in groups.items()}
    result["feature_shift"] = shift_view(r, args.out)
    result["fisher_vs_angle"] = fisher_view(r, groups[f"later Task 1 vs collapse ({r.a}->{r.b})"], args.out)
    result["theory"] = theory_view(r)
    runs.write_json(os.path.join(args.out, "analysis.json"),
                    result | {"settings": dataclasses.asdict(cfg), **runs.environment()})
    print_report(result)
    return args.out


def print_report(result):
    a, b = result["collapse_window"]
    for name in ("landscape", "landscape-freeze"):
        land = result[name]
        print(f"\n{name}: plane through Task-1 steps {land['a']}, {land['b']} and the end; the checkpoints' (x, y) and"
              " projection residual (0 = on the plane):")
        print("  " + ", ".join(f"{p['step']}: ({p['x']:.2f}, {p['y']:.2f}) {p['residual']:.2f}" for p in land["projected"]))
    print("\nweight-update angles (degrees, mean over matrices; per layer in analysis.json):")
    for group, values in result["angles"].items():
        by_layer = {}
        for key, v in values.items():
            by_layer.setdefault(key.split(".")[0], []).append(v)
        print(f"  {group:<40} mean {np.mean(list(values.values())):5.1f}   " +
              " ".join(f"{layer}:{np.mean(v):.0f}" for layer, v in by_layer.items()))
    print("\nfeature shift at the last prompt token (mean shift norm by layer):")
    for name, rows in result["feature_shift"].items():
        print(f"  {name:<28} " + " ".join(f"{r['shift']:.2f}" for r in rows))
    f = result["fisher_vs_angle"]
    print(f"\nFisher vs angle: Pearson r = {f['pearson_r']:.3f}, permutation p = {f['p_value']:.3f} (the paper: 0.054, 0.71)")
    print("\ntheory on the trained model, per block [rho / random rho, share in P / random share, relative shift],"
          " and the Frobenius ratio ||dW P||_F / ||dW||_F:")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731  (None: the matrix was frozen)
    for name, rows in result["theory"].items():
        print(f"  {name:<16} " + "  ".join(f"[{fmt(r['rho'])}/{fmt(r['rho_random'])} {fmt(r['share'])}/"
                                            f"{fmt(r['share_random'])} {r['rel_shift']:.2f}]" for r in rows))
        print(f"  {'':<16} Frobenius: " + "  ".join(fmt(r["rho_frobenius"]) for r in rows))


if __name__ == "__main__":
    runs.cli(main)
