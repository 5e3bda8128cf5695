"""What the runs found: the printed report of one configuration, and the commands that run many (the headline
over seeds, the freeze sweep, the paper's Table 1 of methods), with their tables and plots. Each run comes from
train.py, which passes its protocol in as `run(cfg, stage) -> directory`; everything else is read from the
runs' files.

    python train.py --stage headline      # SEQ + recovery probe and freeze, for seeds 0,1,2: mean +- std
    python train.py --stage freeze-sweep  # Task 1 with k = 0..n_layer bottom blocks frozen, and SEQ (paper Fig. 7a)
    python train.py --stage table         # every method of the paper's Table 1 (strategies.py)
"""
import dataclasses
import hashlib
import json
import os

import numpy as np

import runs
from model import atomic_write
from strategies import make_strategy

# The paper's numbers (Pythia-160M shape, 100K + 20K people), beside which ours are set: the findings of the
# headline table, then Table 1's Task-0 exact match (%) after Task 1 (it reports EWC, LAMOL, task vectors and
# gradient projection together: "from 11% to at most 22%").
PAPER = {"task0_extraction": "~100", "seq_task0_at_150": "~10", "seq_task0_end": "11.18",
         "recovered_share_early": "~100%", "recovered_share_end": "96%", "freeze_task0_end": "44.22",
         "seq": "11.18", "ewc": "<= 22", "lamol": "<= 22", "taskvector": "<= 22; 30.75 (T1 95.76)",
         "gradproj": "<= 22", "replay0.2": "76.93", "freeze": "44.22 (7 of 12)"}

# -----------------------------------------------------------------------------------------------
# One configuration: the printed report and its plot


def cl_metrics(R):
    """Summaries of an accuracy matrix R: R[i][j] = accuracy on task j after training tasks 0..i.
    Row i may stop at column i (later tasks are not trained yet); entries with j > i are ignored.
    With T = len(R) tasks trained:

    average accuracy  A   = mean_j R[T-1][j]                              (the final model on every task)
    forgetting        F   = mean_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j])  (drop from each task's best)
    backward transfer BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])            (negative when old tasks suffer)

    (Chaudhry et al. 2018 for F; Lopez-Paz & Ranzato 2017 for BWT.) With one task, F = BWT = 0.
    Here column 0 is Task-0 *extraction* (held-out people) and columns k >= 1 are accuracy on the very
    pairs Task k trained on, as in the paper.
    """
    T = len(R)
    old = range(T - 1)
    return {"average_accuracy": float(np.mean(R[-1][:T])),
            "forgetting": float(np.mean([max(R[i][j] for i in range(j, T - 1)) - R[-1][j] for j in old])) if T > 1 else 0.0,
            "backward_transfer": float(np.mean([R[-1][j] - R[j][j] for j in old])) if T > 1 else 0.0}


def first_reach(curve, level):
    """The first evaluation of a task's metrics at which the task itself (its 'current' exact match) reached
    `level`, or None: where the authors' freeze runs stop, and the first of the two points read from a run that
    trains its whole budget."""
    return next((r for r in curve if "current" in r and r["current"]["em"] >= level), None)


def task0_at(curve, step):
    """Task-0 exact match (fixed subset) at the last evaluation at or before `step`."""
    return [r["task0"]["em"] for r in curve if r["step"] <= step and "task0" in r][-1]


def related_runs(cfg, stage):
    """Completed runs of `stage` (any strategy) that share this configuration's pretraining and Task 0."""
    shared, _ = runs.stage_dir(cfg, "task0")
    task0_settings = runs.read_json(os.path.join(shared, "summary.json"))["settings"]
    # Task 0's settings and those that would be, changed (a setting keyed only when changed may be absent)
    keys = set(task0_settings) | {f.name for f in dataclasses.fields(cfg) if f.metadata.get("stage") in ("pretrain", "task0")}
    root = os.path.join(cfg.runs, cfg.preset)
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "summary.json")
        if name.startswith(stage + "-") and os.path.exists(path):
            summary = runs.read_json(path)
            if {k: v for k, v in summary["settings"].items() if k in keys} == task0_settings:
                found.append((os.path.join(root, name), summary))
    return found


def print_report(cfg):
    """Print what the completed stages of one configuration found, and plot Task 1's dense curves with the
    recovery probe."""
    pre = runs.read_json(os.path.join(runs.stage_dir(cfg, "pretrain")[0], "summary.json"))
    print(f"\npretraining: biography attribute first-token accuracy {pre['bio']['first_token']:.3f}")
    task0 = os.path.join(runs.stage_dir(cfg, "task0")[0], "summary.json")
    if not os.path.exists(task0):
        return
    print(f"task 0: held-out (extraction) exact match {runs.read_json(task0)['results']['task0']['em']:.3f}")
    summaries = [os.path.join(runs.stage_dir(cfg, f"task{k}")[0], "summary.json") for k in range(cfg.n_tasks + 1)]
    rows = [runs.read_json(path)["accuracy_row"] for path in summaries if os.path.exists(path)]
    if len(rows) > 1:
        print(f"accuracy matrix (exact match; row i = after task i, {cfg.strategy}): {rows}")
        print("  " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in cl_metrics(rows).items()))
    recovered = {s["task1_run"]: s for _, s in related_runs(cfg, "recover")}
    level = cfg.early_stop or 0.99
    print(f"\n{'task 1 run':<28}{'steps':>6}{'T0 start':>10}{'T0 min@150':>11}{f'T1>={level:g} at':>12}{'T0 there':>9}"
          f"{'T0 end':>8}{'T1 end':>8}{'T0 recovered':>14}")
    for run_dir, s in related_runs(cfg, "task1"):
        curve = runs.read_metrics(run_dir)
        early, reached = [r["task0"]["em"] for r in curve if r["step"] <= 150], first_reach(curve, level)
        reached_at, task0_there = (reached["step"], f"{reached['task0']['em']:.3f}") if reached else ("-", "-")
        rec = recovered.get(os.path.basename(run_dir))
        rec_end = f"{rec['rows'][-1]['task0_em_after']:.3f}" if rec else "-"
        print(f"{s['strategy'] + (' (early stop)' if s['stopped_early'] else ''):<28}{s['steps']:>6}"
              f"{curve[0]['task0']['em']:>10.3f}{min(early):>11.3f}{reached_at:>12}{task0_there:>9}"
              f"{s['results']['task0']['em']:>8.3f}{s['results']['task1']['em']:>8.3f}{rec_end:>14}")
    root = os.path.join(cfg.runs, cfg.preset)
    for rec in recovered.values():
        task1_dir = os.path.join(root, rec["task1_run"])
        print(f"\nrecovery probe of {task1_dir} ({rec['probe_steps']} steps on the Task-0 training QA)")
        print(f"{'checkpoint':>14}{'T0 EM before':>14}{'after':>8}{'after / ceiling':>17}")
        for row in rec["rows"]:
            name = row["checkpoint"] if row["task1_step"] is None else f"task1 {row['task1_step']}"
            print(f"{name:>14}{row['task0_em_before']:>14.3f}{row['task0_em_after']:>8.3f}{row['recovered_share']:>17.3f}")
        plot_run(task1_dir, rec, task1_dir + ".png")


def plot_run(task1_dir, recovery, path):
    """Task-0 and Task-1 exact match over Task-1 steps, with the recovered Task-0 accuracy overlaid."""
    plt = pyplot()
    curve = runs.read_metrics(task1_dir)
    steps = [r["step"] for r in curve]
    probed = [r | {"task1_step": 0} if r["checkpoint"] == "task0" else r  # the Task-0 model is Task-1 step 0
              for r in recovery["rows"] if r["checkpoint"] != "pretrained"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["task0"]["em"] for r in curve], label="Task 0 (test people)", color="C0")
    ax.plot([r["step"] for r in curve if "current" in r], [r["current"]["em"] for r in curve if "current" in r],
            label="Task 1", color="C1")
    ax.plot([r["task1_step"] for r in probed], [r["task0_em_after"] for r in probed], "o--",
            color="C2", label="Task 0 after recovery probe")
    ax.axhline(recovery["ceiling"], color="C2", lw=0.8, ls=":", label="ceiling: best probe of pretrained, Task-0 model")
    ax.set_xscale("symlog", linthresh=10)  # linear for the first 10 steps, where the collapse starts
    ax.set(xlabel="Task-1 training step", ylabel="exact match", ylim=(-0.02, 1.02), xlim=(0, max(steps)),
           title=os.path.basename(task1_dir))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    save_figure(fig, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" keeps its own layout
        fig.tight_layout()
    if runs.DIST.main:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        print(f"plot: {path}")
    pyplot().close(fig)

# -----------------------------------------------------------------------------------------------
# Over seeds and over frozen depths: the headline table and the freeze sweep (paper Fig. 7a)


def seq_numbers(seq_cfg):
    """The findings of one finished SEQ run with its recovery probe: extraction, collapse, end, recovery."""
    task0 = runs.read_json(os.path.join(runs.stage_dir(seq_cfg, "task0")[0], "summary.json"))
    seq_dir = runs.stage_dir(seq_cfg, "task1")[0]
    seq, curve = runs.read_json(os.path.join(seq_dir, "summary.json")), runs.read_metrics(seq_dir)
    rec = runs.read_json(os.path.join(runs.stage_dir(seq_cfg, "recover")[0], "summary.json"))
    probed = [r for r in rec["rows"] if r["task1_step"] is not None]
    early = [r for r in probed if 0 < r["task1_step"] <= 150]
    return {
        "task0_extraction": task0["results"]["task0"]["em"],
        "seq_task0_at_150": min(r["task0"]["em"] for r in curve if r["step"] <= 150),
        "seq_task0_end": seq["results"]["task0"]["em"], "seq_task1_end": seq["results"]["task1"]["em"],
        "seq_steps": seq["steps"], "probe_ceiling": rec["ceiling"],
        "recovered_share_early": float(np.mean([r["recovered_share"] for r in early])),
        "recovered_share_end": probed[-1]["recovered_share"],
    }


def headline_numbers(seq_cfg, freeze_cfg):
    """One seed's row of the headline table, read from its finished SEQ, recovery and freeze runs."""
    freeze = runs.read_json(os.path.join(runs.stage_dir(freeze_cfg, "task1")[0], "summary.json"))
    return seq_numbers(seq_cfg) | {
        "freeze_task0_end": freeze["results"]["task0"]["em"], "freeze_task1_end": freeze["results"]["task1"]["em"],
        "freeze_steps": freeze["steps"]}


def row_file(root, label, run_dirs):
    """<root>/rows/<label>-<hash>.json: one row of a table over many runs, keyed by the runs' cache directories
    (whose names hold every setting), so that a row is read back only for the runs that made it."""
    digest = hashlib.sha256(json.dumps([os.path.basename(d) for d in run_dirs]).encode()).hexdigest()[:10]
    return os.path.join(root, "rows", f"{label}-{digest}.json")


def row_from_file_or(path, name, make_row):
    """The row saved at `path` (row_file) if an earlier command wrote it; else make_row(), saved there."""
    if os.path.exists(path):
        print(f"\n=== {name}: its row, from {path}")
        return runs.read_json(path)["row"]
    print(f"\n=== {name}")
    row = make_row()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    runs.write_json(path, {"row": row, **runs.environment()})
    return row


def headline(cfg, run, seeds):
    """SEQ with its recovery probe, and freeze, for each seed; then the mean +- std over the seeds. Each seed's row
    is also written to its own small file and read from there later: the seeds of an hours-long preset can run on
    several machines or days, and their row files, copied into one <runs>/<preset>/rows, make one table."""
    root = os.path.join(cfg.runs, cfg.preset)
    per_seed = []
    for seed in seeds:
        seq_cfg = dataclasses.replace(cfg, seed=seed, strategy="seq")
        freeze_cfg = dataclasses.replace(seq_cfg, strategy="freeze")
        path = row_file(root, f"headline-seed{seed}", [runs.stage_dir(seq_cfg, "recover")[0],
                                                       runs.stage_dir(freeze_cfg, "task1")[0]])

        def seed_row(seq_cfg=seq_cfg, freeze_cfg=freeze_cfg):
            run(seq_cfg, "recover")
            run(freeze_cfg, "task1")
            return headline_numbers(seq_cfg, freeze_cfg)
        per_seed.append(row_from_file_or(path, f"seed {seed}", seed_row))
    freeze = make_strategy("freeze", cfg.strategy_args).config
    stats = {k: {"mean": float(np.mean([r[k] for r in per_seed])),
                 "std": float(np.std([r[k] for r in per_seed], ddof=1)) if len(seeds) > 1 else 0.0}
             for k in per_seed[0]}
    labels = {"task0_extraction": "Task-0 test EM after Task 0 (extraction)",
              "seq_task0_at_150": "SEQ: lowest Task-0 EM in the first 150 Task-1 steps",
              "seq_task0_end": "SEQ: Task-0 EM at the end of Task 1",
              "seq_task1_end": "SEQ: Task-1 EM at the end",
              "seq_steps": "SEQ: Task-1 steps",
              "probe_ceiling": "recovery-probe ceiling: best probe of the pretrained and Task-0 models",
              "recovered_share_early": "recovered / ceiling, probes in steps 1-150 (mean)",
              "recovered_share_end": "recovered / ceiling, probe of the final SEQ model",
              "freeze_task0_end": f"freeze {freeze.freeze_layers} ({freeze.freeze_by}): Task-0 EM at early stop",
              "freeze_task1_end": f"freeze {freeze.freeze_layers}: Task-1 EM at the end",
              "freeze_steps": f"freeze {freeze.freeze_layers}: Task-1 steps"}
    lines = [f"| finding | paper | ours: mean +- std | seeds {', '.join(map(str, seeds))} |", "|---|---|---|---|"]
    for k, s in stats.items():
        scale = 100 if k in PAPER and not k.startswith("recovered") else 1  # the paper gives percentages
        fmt = "{:.0f}" if k.endswith("steps") else "{:.1f}" if scale == 100 else "{:.3f}"
        ours = f"{fmt.format(scale * s['mean'])} +- {fmt.format(scale * s['std'])}"
        each = ", ".join(fmt.format(scale * r[k]) for r in per_seed)
        lines.append(f"| {labels[k]} | {PAPER.get(k, '-')} | {ours} | {each} |")
    table = "\n".join(lines)
    runs.write_json(os.path.join(root, "headline.json"), {"seeds": seeds, "per_seed": per_seed, "stats": stats,
                                                     "settings": dataclasses.asdict(cfg), **runs.environment()})
    runs.write_text(os.path.join(root, "headline.md"), table + "\n")
    print(f"\n{table}\n\nwritten to {root}/headline.md and headline.json")
    return root


def freeze_sweep(cfg, run, seeds=None):
    """Task 1 with the embedding and k = 0..L bottom blocks frozen, and SEQ: final Task-0 and Task-1
    exact match against k, one plot (paper Fig. 7a)."""
    configs = [("seq", dataclasses.replace(cfg, strategy="seq"))]
    configs += [(k, dataclasses.replace(cfg, strategy="freeze", strategy_args=cfg.strategy_args | {"freeze_layers": k}))
             for k in range(cfg.n_layer + 1)]
    rows = []
    for k, run_cfg in configs:
        summary = runs.read_json(os.path.join(run(run_cfg, "task1"), "summary.json"))
        rows.append({"frozen_blocks": k, "task0_em": summary["results"]["task0"]["em"],
                     "task1_em": summary["results"]["task1"]["em"], "steps": summary["steps"],
                     "stopped_early": summary["stopped_early"]})
    root = os.path.join(cfg.runs, cfg.preset)
    runs.write_json(os.path.join(root, "freeze-sweep.json"), {"rows": rows, "settings": dataclasses.asdict(cfg),
                                                         **runs.environment()})
    print(f"\n{'frozen blocks':>14}{'T0 EM':>8}{'T1 EM':>8}{'steps':>7}")
    for r in rows:
        print(f"{r['frozen_blocks']:>14}{r['task0_em']:>8.3f}{r['task1_em']:>8.3f}{r['steps']:>7}"
              f"{'  (early stop)' if r['stopped_early'] else ''}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [-1] + [r["frozen_blocks"] for r in rows[1:]]
    ax.plot(x, [r["task0_em"] for r in rows], "o-", label="Task 0 (test people)")
    ax.plot(x, [r["task1_em"] for r in rows], "s-", label="Task 1")
    ax.set_xticks(x, ["SEQ"] + [str(k) for k in x[1:]])
    freeze_by = make_strategy("freeze", cfg.strategy_args).config.freeze_by
    ax.set(xlabel=f"blocks frozen with the embedding ({freeze_by}; SEQ freezes nothing)", ylabel="exact match",
           ylim=(-0.02, 1.02), title=f"{cfg.preset}: freezing the bottom blocks, early stop {cfg.early_stop:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, os.path.join(root, "freeze-sweep.png"))
    return root

# -----------------------------------------------------------------------------------------------
# The paper's Table 1: every method from the same cached Task-0 model


# Every method of the paper's Table 1, from the same cached Task-0 model: (row, strategy, its settings, the
# key of its number in PAPER).
TABLE = [
    ("SEQ", "seq", {}, "seq"),
    ("SEQ with the authors' hidden freeze ('layers.1')", "seq-authors", {}, None),
    ("EWC, per-sample Fisher, lambda 1", "ewc", {"ewc_lambda": 1.0}, "ewc"),
    ("EWC, per-sample Fisher, lambda 10", "ewc", {"ewc_lambda": 10.0}, "ewc"),
    ("EWC, per-sample Fisher, lambda 100", "ewc", {"ewc_lambda": 100.0}, "ewc"),
    ("EWC, the authors' Fisher, lambda 5000", "ewc", {"ewc_lambda": 5000.0, "ewc_fisher": "authors"}, "ewc"),
    ("LAMOL_g (shared generation token)", "lamol", {"lamol_token": "shared"}, "lamol"),
    ("LAMOL_t (a token per task)", "lamol", {"lamol_token": "task"}, "lamol"),
    ("Task vector (best point with Task 1 >= 0.95)", "taskvector", {}, "taskvector"),
    ("Gradient projection (the authors' rule)", "gradproj", {}, "gradproj"),
    ("Replay 10%", "replay", {"replay_fraction": 0.1}, None),
    ("Replay 20%", "replay", {"replay_fraction": 0.2}, "replay0.2"),
    ("Replay 20% with the authors' hidden freeze ('layers.1')", "replay",
     {"replay_fraction": 0.2, "replay_hidden_freeze": "yes"}, "replay0.2"),
    ("Freeze the embedding + bottom blocks", "freeze", {}, "freeze"),
    ("Multi-task: Task 0 + Task 1 jointly (upper bound)", "multitask", {}, None),
    ("Multi-task's control: Task 0 alone for as many steps", "multitask-control", {}, None),
]


def method_row(run_cfg, run_dir, label, paper, level, earlier):
    """One method's row of the table, read from its finished Task-1 run (and its own Task 0, if it trains one)."""
    summary = runs.read_json(os.path.join(run_dir, "summary.json"))
    seconds, own_task0 = summary["seconds"], None
    if make_strategy(run_cfg.strategy, run_cfg.strategy_args).changes_task0:  # its own Task 0: time and accuracy
        task0 = runs.read_json(os.path.join(runs.stage_dir(run_cfg, "task0")[0], "summary.json"))
        seconds, own_task0 = seconds + task0["seconds"], task0["results"]["task0"]["em"]
    curve = runs.read_metrics(run_dir)
    reached = first_reach(curve, level)
    row = {"method": label, "strategy": summary["strategy"], "paper_task0": paper,
           "task0_em": summary["results"]["task0"]["em"], "task1_em": summary["results"]["task1"]["em"],
           "steps": summary["steps"], "stopped_early": summary["stopped_early"], "seconds": seconds,
           "own_task0_em": own_task0, "reached_step": reached and reached["step"],
           "task0_em_at_reach": reached and reached["task0"]["em"],
           "run": os.path.basename(run_dir), "strategy_state": summary["strategy_state"]}
    multitask = next((r for r in earlier if r["strategy"] == "multitask"), None)
    if summary["strategy"] == "multitask-control" and multitask:  # Task 0 alone after as many steps
        row["task0_em_at_multitask_end"] = task0_at(curve, multitask["steps"])
    return row


def table(cfg, run, seeds=None):
    """Run every method of TABLE on Task 1 (each cached and resumable), then write table.md/.json and a bar plot.
    Each method's row is also written to its own small file and read from there later, as the headline's are."""
    root, level = os.path.join(cfg.runs, cfg.preset), cfg.early_stop or 0.99
    rows = []
    for label, name, settings, paper in TABLE:
        run_cfg = dataclasses.replace(cfg, strategy=name, strategy_args=cfg.strategy_args | settings)
        paper_task0 = PAPER.get(paper, "-")
        # the control's row is read where multi-task ended: it depends on that run too
        after = [r["run"] for r in rows if r["strategy"] == "multitask" and name == "multitask-control"]
        path = row_file(root, "table", [runs.stage_dir(run_cfg, "task1")[0], *after])
        row = row_from_file_or(path, label, lambda: method_row(run_cfg, run(run_cfg, "task1"), label,
                                                               paper_task0, level, rows))
        rows.append(row | {"method": label, "paper_task0": paper_task0})  # a saved row's labels yield to TABLE's
    lines = [f"| method | paper: Task 0 (%) | Task 0 EM | Task 1 EM | steps | first step with Task 1 >= {level:g}:"
             " Task 0 there (subset) | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['paper_task0']} | {r['task0_em']:.3f}"
              + (f" (own Task 0: {r['own_task0_em']:.3f})" if r["own_task0_em"] is not None else "")
              + (f" ({r['task0_em_at_multitask_end']:.3f} at multi-task's end)" if "task0_em_at_multitask_end" in r
                 else "")
              + f" | {r['task1_em']:.3f} | {r['steps']}{'' if r['stopped_early'] else ' (no early stop)'} | "
              + (f"{r['reached_step']}: {r['task0_em_at_reach']:.3f}" if r["reached_step"] is not None else "never")
              + f" | {r['seconds']:.0f} |" for r in rows]
    text = "\n".join(lines)
    runs.write_json(os.path.join(root, "table.json"), {"rows": rows, "settings": dataclasses.asdict(cfg), **runs.environment()})
    runs.write_text(os.path.join(root, "table.md"), text + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["task0_em"] for r in rows], height=0.4, label="Task 0 (test people)")
    ax.barh(y + 0.2, [r["task1_em"] for r in rows], height=0.4, label="Task 1")
    ax.set_yticks(y, [r["method"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="exact match after Task 1", xlim=(0, 1), title=f"{cfg.preset}: continual-learning methods")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False, fontsize=8)  # below: no bar hidden
    save_figure(fig, os.path.join(root, "table.png"))
    tv = next((r for r in rows if r["strategy"] == "taskvector"), None)
    if tv and tv["strategy_state"]["grid"]:
        plot_task_vector(tv["strategy_state"], os.path.join(root, "task-vector.png"))
    print(f"\n{text}\n\nwritten to {root}/table.md, table.json, table.png")
    return root


def plot_task_vector(state, path):
    """The task-vector sweep's trade-off: Task-0 against Task-1 exact match, one point per (e, E, alpha)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    grid = state["grid"]
    points = ax.scatter([p["new_em"] for p in grid], [p["task0_em"] for p in grid], c=[p["alpha"] for p in grid],
                        s=12, cmap="viridis")
    fig.colorbar(points, label="alpha")
    if state["best"]:
        ax.plot(state["best"]["new_em"], state["best"]["task0_em"], "r*", ms=12, label="chosen")
        ax.legend()
    ax.set(xlabel="Task 1 EM (subset)", ylabel="Task 0 EM (subset)", title="theta_T1[e] - alpha (theta_T1[E] - theta_T0)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


# The commands over several configurations: train.py --stage NAME runs COMMANDS[NAME](cfg, run, seeds).
COMMANDS = {"headline": headline, "freeze-sweep": freeze_sweep, "table": table}
