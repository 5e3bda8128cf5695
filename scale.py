"""The scale study: how each finding moves as the Biography setup grows, one axis at a time from a middle point.

    python scale.py --list                        # the points, and which are done
    python scale.py                               # every point not yet done (hours; each point cached)
    python scale.py --points "people=500;lr=1/50" # only these points (the names --list prints)
    python scale.py --out docs/scale              # where the table, figure and per-point results go

A point is a configuration of the cpu preset with one axis moved from MIDDLE: the population (pretraining people,
with Task 1 and the name pools scaled alike), the fine-tuning lr as a fraction of the pretraining peak, width,
depth, the Task-1 epoch budget, the pretraining passes, and the architecture (GPT-NeoX or Llama). Each point runs
the protocol the way the authors' two pipelines ran it (train.PIPELINES): SEQ with its recovery probe in the
HF-Trainer one, freeze, replay 20% and multi-task in the continual-learning framework, both with --stopping authors. Task 0's epochs are re-chosen at
every point by one rule: the epoch at which held-out Task-0 exact match peaks in a longer run. A finished point
is one JSON file under <out>/points/, read instead of rerun, so the study continues where it stopped.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts threads: busy-waiting stalls a 2-core box

import argparse
import dataclasses
import hashlib
import json

import numpy as np

import report
import runs
import train

# The middle point sits at 1,000 people so that a point takes about an hour on a 2-core CPU (2,000: two).
MIDDLE = {"people": 1000, "lr": 100, "d": 128, "L": 4, "epochs": 60, "passes": 16, "arch": "neox"}
AXES = {"people": [500, 1000, 2000, 8000], "lr": [50, 100, 200], "d": [128, 256, 384], "L": [4, 8],
        "epochs": [60, 120], "passes": [16, 32], "arch": ["neox", "llama"]}
TASK_SHARE = 0.4        # Task-1 people per pretraining person (the cpu preset: 200 for 500)
PEOPLE_PER_NAME = 20    # every first, middle and last name is shared by at least this many people
TASK0_SEARCH = 10       # Task 0's epochs are chosen within this many x (lr fraction / 50) epochs


def points():
    """The middle point, then each axis's other values with the rest at the middle: {name: point}."""
    return {"middle": MIDDLE} | {point_name(axis, v): MIDDLE | {axis: v} for axis, values in AXES.items()
                                 for v in values if v != MIDDLE[axis]}


def point_name(axis, value):
    return f"{axis}={'1/' if axis == 'lr' else ''}{value}"


def name_of(point):
    """The name of a point of the ladder: 'middle', or the axis moved and its value."""
    moved = [(axis, v) for axis, v in point.items() if v != MIDDLE[axis]]
    return point_name(*moved[0]) if moved else "middle"


def name_pools(people, task_size):
    """First, middle and last name pools in the cpu preset's ratios (25, 25 and 35 names for 500 + 200 people: 28, 28
    and 20 people a name; data.py deals names round-robin over everyone, Task-1 people too), so that every name is
    shared by at least PEOPLE_PER_NAME people at every size."""
    total = people + task_size
    return total // 28, total // 28, total // PEOPLE_PER_NAME


def config(point, runs_dir, **settings):
    """The TrainConfig of a point: the cpu preset with the point's sizes."""
    task_size = round(TASK_SHARE * point["people"])
    return train.preset_config(
        "cpu", runs=runs_dir, people=point["people"], task_size=task_size,
        name_pools=",".join(map(str, name_pools(point["people"], task_size))), d_model=point["d"],
        n_head=point["d"] // 32, d_ff=4 * point["d"], n_layer=point["L"], pretrain_epochs=point["passes"],
        ft_lr=train.TrainConfig.pretrain_lr / point["lr"], task_epochs=point["epochs"], arch=point["arch"], **settings)


def search_config(point, runs_dir):
    """Task 0 trained longer than any point needs (constant lr, the Trainer pipeline's AdamW), to choose its epochs."""
    return config(point, runs_dir, **train.PIPELINES["trainer"] | {"ft_end_share": 1.0,
                                                                   "task0_epochs": TASK0_SEARCH * point["lr"] // 50})


def pipeline_configs(point, runs_dir, epochs):
    """The point's configs in the authors' two pipelines, with Task 0's chosen epochs: (trainer, framework)."""
    return tuple(config(point, runs_dir, **train.PIPELINES[name], task0_epochs=epochs) for name in ("trainer", "framework"))


def task0_epochs(point, runs_dir, run):
    """The rule that chose the cpu preset's 7: train Task 0 longer (search_config) and take the epoch at which
    held-out exact match (evaluated every epoch) peaks."""
    cfg = search_config(point, runs_dir)
    curve = runs.read_metrics(run(cfg, "task0"))
    steps_per_epoch = curve[-1]["step"] // cfg.task0_epochs
    by_epoch = [(r["task0"]["em"], -r["step"]) for r in curve if r["step"] > 0]
    return -max(by_epoch)[1] // steps_per_epoch, [(r["step"] // steps_per_epoch, r["task0"]["em"]) for r in curve]


def methods(point):
    """The methods run in the framework pipeline: {key: (strategy, settings)}. Freeze holds the embedding and a
    quarter of the blocks (block 0 of 4, as the cpu preset; the paper: 7 of 12)."""
    return {"freeze": ("freeze", {"freeze_layers": point["L"] // 4}), "replay": ("replay", {"replay_fraction": 0.2}),
            "multitask": ("multitask", {})}


def measure(point, runs_dir, run):
    """Every run of a point, and its findings."""
    epochs, task0_curve = task0_epochs(point, runs_dir, run)
    trainer, framework = pipeline_configs(point, runs_dir, epochs)
    run(trainer, "recover")
    seq = report.seq_numbers(trainer)
    seq_curve = runs.read_metrics(runs.stage_dir(trainer, "task1")[0])
    found = {"task0_epochs": epochs, "task0_search": task0_curve, **seq,
             "seq_steps_to_0.5": (report.first_reach(seq_curve, 0.5) or {}).get("step"),
             "seq_steps_to_0.99": (report.first_reach(seq_curve, 0.99) or {}).get("step")}
    for key, (strategy, args) in methods(point).items():
        cfg = dataclasses.replace(framework, strategy=strategy, strategy_args=framework.strategy_args | args)
        run_dir = run(cfg, "task1")
        summary, curve = runs.read_json(os.path.join(run_dir, "summary.json")), runs.read_metrics(run_dir)
        reached = report.first_reach(curve, 0.99)
        found |= {f"{key}_task0_end": summary["results"]["task0"]["em"],
                  f"{key}_task1_end": summary["results"]["task1"]["em"], f"{key}_steps": summary["steps"],
                  f"{key}_task0_at_0.99": reached and reached["task0"]["em"],
                  f"{key}_steps_to_0.99": reached and reached["step"]}
    found["framework_extraction"] = runs.read_json(os.path.join(runs.stage_dir(framework, "task0")[0],
                                                                "summary.json"))["results"]["task0"]["em"]
    return found


# The findings in the table and the figure: (key, label, the paper's value as a fraction or None)
FINDINGS = [("task0_extraction", "extraction (Task-0 test EM after Task 0)", 1.0),
            ("seq_task0_at_150", "SEQ: lowest Task 0 in the first 150 steps", 0.10),
            ("seq_task0_end", "SEQ: Task 0 at the end", 0.1118),
            ("recovered_share_early", "recovered / ceiling, steps 1-150", 1.0),
            ("recovered_share_end", "recovered / ceiling, end", 0.96),
            ("freeze_task0_end", "freeze: Task 0 at its stop", 0.4422),
            ("replay_task0_end", "replay 20%: Task 0 at the end", 0.7693),
            ("multitask_task0_end", "multi-task: Task 0 at the end", None)]
# Task 1's side of each run: how far and how fast it learnt the new task (a Task-0 number means little without it)
TASK1 = [("seq_task1_end", "SEQ: Task 1 at the end"), ("seq_steps_to_0.5", "SEQ: steps to Task 1 >= 0.5"),
         ("seq_steps_to_0.99", "SEQ: steps to Task 1 >= 0.99"), ("freeze_task1_end", "freeze: Task 1 at its stop"),
         ("freeze_steps", "freeze: Task-1 steps"), ("replay_task1_end", "replay 20%: Task 1 at the end"),
         ("multitask_task1_end", "multi-task: Task 1 at the end"), ("task0_epochs", "Task-0 epochs (rule)")]


def write_report(done, out):
    """scale.md (a row per finding, a column per point), scale.json and scale.png (each finding against each axis)."""
    names = list(done)
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else f"{v:,}"  # noqa: E731
    lines = ["| finding | paper | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key, label, ref in FINDINGS + [(key, label, None) for key, label in TASK1]:
        lines.append(f"| {label} | {'-' if ref is None else f'{ref:.3g}'} | "
                     + " | ".join(fmt(done[name]["findings"].get(key)) for name in names) + " |")
    lines.append("| hours on 2 cores | - | " + " | ".join(f"{done[n]['seconds'] / 3600:.1f}" for n in names) + " |")
    runs.write_text(os.path.join(out, "scale.md"), "\n".join(lines) + "\n")
    runs.write_json(os.path.join(out, "scale.json"), {"middle": MIDDLE, "axes": AXES, "points": done})
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(AXES), figsize=(3.2 * len(AXES), 4.2), sharey=True, layout="constrained")
    for ax, (axis, values) in zip(axes, AXES.items()):
        for i, (key, label, ref) in enumerate(FINDINGS):
            xs = [x for x, v in enumerate(values) if name_of(MIDDLE | {axis: v}) in done]  # evenly spaced values
            ys = [done[name_of(MIDDLE | {axis: values[x]})]["findings"].get(key) for x in xs]
            ax.plot(xs, [np.nan if y is None else y for y in ys], "o-", color=f"C{i}", label=label)
            if ref is not None:
                ax.axhline(ref, color=f"C{i}", lw=0.8, ls=":")
        ax.set(xlabel=axis + (" (1/x of the pretraining lr)" if axis == "lr" else ""), xticks=range(len(values)),
               xticklabels=values, xlim=(-0.5, len(values) - 0.5), ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match, or share of the ceiling")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, frameon=False, fontsize=8)
    fig.suptitle("findings against scale, one axis at a time from the middle point "
                 + ", ".join(point_name(*item) for item in MIDDLE.items())
                 + " (dotted: the paper's values)", fontsize=9)
    report.save_figure(fig, os.path.join(out, "scale.png"))


def main(argv=None):
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="", help="names of the points to run (default: every point); ';'-separated")
    parser.add_argument("--out", default=None, help="table, figure and per-point results (default: <runs>/scale)")
    parser.add_argument("--runs", default="runs", help="directory where the stages are cached (default: runs)")
    parser.add_argument("--list", action="store_true", help="list the points and which are done, then stop")
    args = parser.parse_args(argv)
    ladder, out = points(), args.out or os.path.join(args.runs, "scale")
    chosen = [p for p in args.points.split(";") if p] or list(ladder)
    if unknown := [p for p in chosen if p not in ladder]:
        parser.error(f"--points {unknown[0]!r}: expected one of {'; '.join(ladder)}")

    def path_of(name):  # a point's file names the settings it ran with, so that edited settings never reuse it
        key = json.dumps(dataclasses.asdict(config(ladder[name], args.runs)) | {"runs": None}, sort_keys=True)
        file_name = name.replace("1/", "1_")  # lr=1/50: lr=1_50
        return os.path.join(out, "points", f"{file_name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.json")

    if args.list:
        for name in ladder:
            print(f"{'done' if os.path.exists(path_of(name)) else 'to do':>6}  {name}")
        return
    with runs.process_setup(os.path.join(args.runs, "cpu")):
        run = lambda cfg, stage: train.run_protocol(cfg, until=stage, resume=True)  # noqa: E731
        for name in chosen:
            if os.path.exists(path_of(name)):
                continue
            print(f"\n=== scale point {name}")
            os.makedirs(os.path.dirname(path_of(name)), exist_ok=True)
            found = measure(ladder[name], args.runs, run)
            seconds = sum(runs.read_json(os.path.join(d, "summary.json"))["seconds"]
                          for d in stage_dirs(ladder[name], args.runs, found["task0_epochs"]))
            runs.write_json(path_of(name), {"point": ladder[name], "findings": found, "seconds": seconds,
                                            **runs.environment()})
        done = {name: runs.read_json(path_of(name)) for name in ladder if os.path.exists(path_of(name))}
        write_report(done, out)
        print(open(os.path.join(out, "scale.md")).read())


def stage_dirs(point, runs_dir, epochs):
    """Every stage directory a point ran (for its time), each once."""
    search, (trainer, framework) = search_config(point, runs_dir), pipeline_configs(point, runs_dir, epochs)
    dirs = [runs.stage_dir(search, "pretrain")[0], runs.stage_dir(search, "task0")[0]]
    dirs += [runs.stage_dir(trainer, s)[0] for s in ("task0", "task1", "recover")]
    dirs += [runs.stage_dir(framework, "task0")[0]]
    dirs += [runs.stage_dir(dataclasses.replace(framework, strategy=s, strategy_args=framework.strategy_args | a),
                            "task1")[0] for s, a in methods(point).values()]
    return list(dict.fromkeys(dirs))


if __name__ == "__main__":
    runs.cli(main)
