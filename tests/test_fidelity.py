"""The authors' protocol, as mechanics on tiny runs: each method's stopping rule (--stopping authors), the two
fine-tuning pipelines' AdamW (one optimizer carried across the task sequence), LAMOL_t's per-task markers, the
replay run with the authors' hidden freeze, multi-task's control, the scale study's name pools, and --arch llama."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import data
import report
import runs
import scale
import strategies
import train
from run_helpers import copy_runs, parameters, read_json, read_metrics, stage, summary, tiny, tiny_base  # noqa: F401

torch.set_num_threads(1)


class CrossesAt:
    """A stand-in for train.evaluate: 0 on every set, except the new task's pairs (told apart by their tokens),
    which score 0 at their first `n - 1` evaluations and 1 from the n-th on. Task 1 evaluates itself every
    sparse_every = 4 steps from step 0, so n = 3 crosses at step 8."""

    def __init__(self, task_tokens, n):
        self.task_tokens, self.n, self.calls = task_tokens, n, 0

    def __call__(self, model, qa, tok, exact_match=True, batch_size=1024):
        value = 0.0
        if qa.tokens.shape == self.task_tokens.shape and torch.equal(qa.tokens, self.task_tokens):
            self.calls += 1
            value = float(self.calls >= self.n)
        return {m: value for m in ("first_token", "first_token_prob", "em")} | {
            f"{m}_by_attribute": {a: value for a in data.ATTRIBUTES} for m in ("first_token", "first_token_prob", "em")}


def task1_tokens():
    exp = train.Experiment(train.preset_config("tiny"))
    return exp.qa_set("task1").tokens


@pytest.mark.parametrize("strategy", ["freeze", "replay", "seq"])
def test_authors_stopping_stops_freeze_alone_and_the_report_reads_both_points(strategy, tiny_base, tmp_path,
                                                                              monkeypatch):
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", CrossesAt(task1_tokens(), n=3))
    tiny(runs_dir, "--stage", "task1", "--strategy", strategy, "--stopping", "authors")
    task1 = stage(runs_dir, f"task1-{strategy}")
    cfg = train.parse_args(["--preset", "tiny", "--strategy", strategy])[0]
    steps_per_epoch = {"replay": 19, "seq": 10, "freeze": 10}[strategy]  # 150 pairs; replay: 8 new + 8 old a batch
    curve = read_metrics(task1)
    assert report.first_reach(curve, 0.99)["step"] == 8
    if strategy == "freeze":  # twice the budget, stopped where Task 1 first reached 0.99
        assert summary(task1)["steps"] == 8 and summary(task1)["stopped_early"]
        assert curve[-1]["step"] == 8
    else:  # the whole budget, both points on record
        assert summary(task1)["steps"] == cfg.task_epochs * steps_per_epoch and not summary(task1)["stopped_early"]
        assert [r["step"] for r in curve if "current" in r][-1] == cfg.task_epochs * steps_per_epoch
    budget = runs.read_json(os.path.join(task1, "settings.json"))["settings"]
    assert budget["stopping"] == "authors" and budget["task_epochs"] == cfg.task_epochs


def test_every_stopping_stops_every_method(tiny_base, tmp_path, monkeypatch):
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", CrossesAt(task1_tokens(), n=3))
    tiny(runs_dir, "--stage", "task1", "--strategy", "replay")
    assert summary(stage(runs_dir, "task1-replay"))["steps"] == 8


def first_step_states(monkeypatch, task):
    """Record, at the first training step of `task`, a copy of the optimizer's moments by parameter name, its
    settings, and whether the gradient norm was clipped from then on."""
    seen = {"clipped": False}
    original_step, original_clip = train.train_step, torch.nn.utils.clip_grad_norm_

    def train_step(model, opt, params, batch, strategy, ctx, weight=None, bf16=False, clip=1.0):
        if ctx is not None and ctx.task == task and "moments" not in seen:
            names = {p: n for n, p in model.named_parameters()}
            seen["moments"] = {names[p]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
            seen["groups"] = [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")} for g in opt.param_groups]
            seen["clip"] = clip
        return original_step(model, opt, params, batch, strategy, ctx, weight, bf16, clip)

    monkeypatch.setattr(train, "train_step", train_step)
    def clip_grad_norm_(*args, **kwargs):
        seen["clipped"] |= "moments" in seen  # in the task
        return original_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    return seen


def test_the_framework_pipeline_carries_task0s_adamw_into_task1(tiny_base, tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    seen = first_step_states(monkeypatch, task=1)
    tiny(runs_dir, "--stage", "task1", "--pipeline", "framework")
    saved = runs.load_moments(os.path.join(stage(runs_dir, "task0-"), "final"))
    assert saved and seen["moments"].keys() == saved.keys()
    for name, moments in saved.items():
        assert moments.keys() == {"exp_avg", "exp_avg_sq", "step"}
        assert all(torch.equal(seen["moments"][name][k], v) for k, v in moments.items()), name
    task0_steps = read_json(os.path.join(stage(runs_dir, "task0-"), "final", "training_state.json"))["step"]
    assert {float(m["step"]) for m in saved.values()} == {float(task0_steps)}
    assert {g["betas"] for g in seen["groups"]} == {(0.9, 0.999)} and {g["eps"] for g in seen["groups"]} == {1e-8}
    assert sorted(g["weight_decay"] for g in seen["groups"]) == [0.0, 5e-4]
    assert seen["clip"] == 0.0 and not seen["clipped"]


def test_the_trainer_pipeline_starts_each_task_fresh_and_decays_the_lr_by_a_tenth(tiny_base, tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    seen = first_step_states(monkeypatch, task=1)
    tiny(runs_dir, "--stage", "recover", "--pipeline", "trainer")
    assert seen["moments"] == {} and seen["clip"] == 1.0 and seen["clipped"]
    assert {g["betas"] for g in seen["groups"]} == {(0.9, 0.999)} and {g["eps"] for g in seen["groups"]} == {1e-6}
    assert not os.path.exists(os.path.join(stage(runs_dir, "task0-"), "final", "optimizer.safetensors"))
    ft_lr = train.preset_config("tiny").ft_lr
    for prefix in ("task0-", "task1-seq", "recover-seq"):
        for path in [os.path.join(stage(runs_dir, prefix), "metrics.jsonl")] if prefix != "recover-seq" else [
                os.path.join(stage(runs_dir, prefix), "task0", "metrics.jsonl")]:
            lrs = [r["lr"] for r in runs.read_jsonl(path) if "lr" in r]
            assert lrs == sorted(lrs, reverse=True) and lrs[-1] < ft_lr, path  # falling ...
            assert min(lrs) >= 0.9 * ft_lr * (1 - 1e-12), path  # ... to a tenth below the lr at most


def test_lamol_t_learns_each_pseudo_sample_behind_its_own_tasks_marker(monkeypatch):
    """Task 2 of LAMOL_t: its own pairs behind ' 3', the pseudo samples of Task 0 behind ' 1' and of Task 1
    behind ' 2' (the generation samples themselves are stood in for by real pairs of those tasks)."""
    cfg = train.preset_config("tiny", strategy="lamol", strategy_args={"lamol_token": "task"})
    exp = train.Experiment(cfg)
    model = exp.initial_model()
    ctx = exp.context(model, task=2)
    lamol = strategies.make_strategy("lamol", cfg.strategy_args)

    def pseudo_samples(self, ctx, task, n):
        qa = ctx.train[task]
        return qa.prompts[:n], qa.answers[:n], {"sampled": n}

    monkeypatch.setattr(strategies.Lamol, "pseudo_samples", pseudo_samples)
    lamol.start(ctx)
    task_of = {}  # a QA row (prompt + answer) -> the task it came from
    for task in range(3):
        for p, a in zip(ctx.train[task].prompts, ctx.train[task].answers):
            task_of[tuple(p + a)] = task
    seen = set()
    for inputs, targets, mask, markers in lamol.epoch(ctx, np.random.default_rng(0)):
        rows = torch.cat([inputs[:, :1], targets], dim=1)
        for row, marker in zip(rows.tolist(), markers.tolist()):
            task = task_of[tuple(t for t in row if t != exp.tok.pad_id)]
            assert marker == [exp.tok.eos_id] + exp.tok.encode(f" {task + 1}"), task
            seen.add(task)
    assert seen == {0, 1, 2}
    batch = next(iter(lamol.epoch(ctx, np.random.default_rng(0))))
    qa_loss = torch.tensor(0.0)
    wrong = (*batch[:3], torch.full_like(batch[3], exp.tok.eos_id))  # a marker that is no task's
    assert not torch.equal(lamol.loss(ctx, batch, qa_loss), lamol.loss(ctx, wrong, qa_loss))  # the marker is read


def test_lamol_logs_why_pseudo_samples_are_rejected():
    cfg = train.preset_config("tiny", strategy="lamol")
    exp = train.Experiment(cfg)
    ctx = exp.context(exp.initial_model(), task=1)
    lamol = strategies.make_strategy("lamol", cfg.strategy_args)
    prompts, answers, quality = lamol.pseudo_samples(ctx, 0, 20)
    assert quality["sampled"] == 20 and sum(quality["rejected"].values()) + quality["well_formed"] == 20
    assert len(prompts) == quality["well_formed"]


def test_replay_with_the_hidden_freeze_holds_layers_1_and_trains_the_rest(tiny_base, tmp_path):
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    tiny(runs_dir, "--stage", "task1", "--strategy", "replay", "--replay-hidden-freeze", "yes")
    before = parameters(os.path.join(stage(runs_dir, "task0-"), "final"))
    after = parameters(os.path.join(stage(runs_dir, "task1-replay0.2-hidden-freeze"), "final"))
    frozen = {n for n in before if n.startswith("blocks.1.")}  # the tiny model's 2 blocks: 'layers.1' is block 1
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in before if n not in frozen)


def test_multitask_control_trains_task0_alone_in_epochs_as_long_as_multitask():
    cfg = train.preset_config("tiny")
    exp = train.Experiment(cfg)
    ctx = exp.context(exp.initial_model(), task=1)
    joint, control = strategies.make_strategy("multitask"), strategies.make_strategy("multitask-control")
    joint.start(ctx)
    control.start(ctx)
    joint_epoch, control_epoch = joint.epoch(ctx, np.random.default_rng(0)), control.epoch(ctx, np.random.default_rng(0))
    assert len(joint_epoch) == len(control_epoch) > len(ctx.train[0].epoch(cfg.ft_batch, np.random.default_rng(0)))
    task0_rows = {tuple(r) for r in ctx.train[0].tokens.tolist()}
    for inputs, targets, _ in control_epoch:
        for row in torch.cat([inputs[:, :1], targets], dim=1).tolist():
            assert tuple(row + [exp.tok.pad_id] * (ctx.train[0].tokens.shape[1] - len(row))) in task0_rows


def test_the_scale_ladder_keeps_20_people_per_name_at_every_size():
    for name, point in scale.points().items():
        cfg = scale.config(point, "runs")
        pools, total = train.data_config(cfg).name_pools, cfg.people + cfg.n_tasks * cfg.task_size
        assert min(total // size for size in pools) >= 20, name  # data.py deals names round-robin: each +-1
    assert train.data_config(scale.config(scale.MIDDLE | {"people": 500}, "runs")) == train.data_config(train.TrainConfig())
    bio = data.build_dataset(train.data_config(scale.config(scale.MIDDLE | {"people": 500}, "runs")), data.build_tokenizer())
    assert min(np.bincount(column).min() for column in bio.names.T) >= 20


def test_one_axis_moves_at_a_time_from_the_middle():
    ladder = scale.points()
    assert ladder["middle"] == scale.MIDDLE
    for name, point in ladder.items():
        assert sum(point[axis] != scale.MIDDLE[axis] for axis in scale.AXES) == (name != "middle")
    assert {p["people"] for p in ladder.values()} >= {500, 2000, 8000} and {p["lr"] for p in ladder.values()} == {50, 100, 200}


def test_the_llama_1k_preset_is_the_scale_studys_llama_point_as_it_ran():
    """The preset is the point's Trainer-pipeline config (its SEQ + probe), with the Task-0 epochs the point chose."""
    points = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "scale", "points")
    (path,) = [p for p in os.listdir(points) if p.startswith("arch=llama-")]
    chosen = read_json(os.path.join(points, path))["findings"]["task0_epochs"]
    point = scale.config(scale.MIDDLE | {"arch": "llama"}, "runs", **train.PIPELINES["trainer"], task0_epochs=chosen)
    assert dataclasses.replace(point, preset="llama-1k") == train.preset_config("llama-1k")


@pytest.mark.parametrize("setting,value", [("arch", "llama"), ("ft_beta2", 0.999), ("ft_eps", 1e-8), ("ft_clip", 0.0),
                                           ("ft_end_share", 0.9), ("optimizer_scope", "sequence"),
                                           ("stopping", "authors")])
def test_a_protocol_setting_keys_its_stage_only_when_changed(setting, value):
    cfg = train.preset_config("tiny")
    changed = dataclasses.replace(cfg, **{setting: value})
    first = dataclasses.fields(train.TrainConfig)[[f.name for f in dataclasses.fields(train.TrainConfig)].index(setting)]
    first_stage = first.metadata["stage"]
    assert runs.stage_dir(changed, first_stage)[0] != runs.stage_dir(cfg, first_stage)[0]
    if first_stage != "pretrain":
        earlier = runs.STAGE_KINDS[runs.STAGE_KINDS.index(first_stage) - 1]
        assert runs.stage_dir(changed, earlier)[0] == runs.stage_dir(cfg, earlier)[0]


def test_arch_llama_builds_a_llama_model_and_runs_the_tiny_pipeline(tmp_path):
    tiny(tmp_path, "--stage", "recover", "--arch", "llama")
    config = read_json(os.path.join(stage(tmp_path, "pretrain-"), "final", "config.json"))
    assert config["model_type"] == "llama" and config["hidden_act"] == "silu"
    model = train.Transformer.from_pretrained(os.path.join(stage(tmp_path, "pretrain-"), "final"))
    assert model.cfg.norm == "rmsnorm" and model.cfg.rotary_pct == 1.0 and not model.cfg.parallel_residual
    assert summary(stage(tmp_path, "recover-seq"))["rows"]


def tiny_point_config(point, runs_dir, **settings):
    """A scale point on the tiny preset's sizes (the ladder's own sizes take an hour a point)."""
    return train.preset_config("tiny", runs=runs_dir, **{"people": point["people"] // 20, "ft_lr": 5e-3 / point["lr"],
                                                         "name_pools": "10,10,10"} | settings)


def test_a_scale_point_runs_once_and_is_read_from_its_file_after(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "config", tiny_point_config)
    monkeypatch.setattr(scale, "TASK0_SEARCH", 1)
    scale.main(["--runs", str(tmp_path), "--points", "middle;lr=1/50"])
    (point,) = [p for p in os.listdir(tmp_path / "scale" / "points") if p.startswith("middle-")]
    found = read_json(tmp_path / "scale" / "points" / point)["findings"]
    trainer = tiny_point_config(scale.MIDDLE, str(tmp_path), **train.PIPELINES["trainer"],
                                task0_epochs=found["task0_epochs"])
    assert found["seq_task0_end"] == summary(runs.stage_dir(trainer, "task1")[0])["results"]["task0"]["em"]
    assert summary(runs.stage_dir(trainer, "task1")[0])["settings"]["stopping"] == "authors"
    table = open(tmp_path / "scale" / "scale.md").read()
    assert table.startswith("| finding | paper | middle | lr=1/50 |")  # a column per point, the middle first
    assert os.path.exists(tmp_path / "scale" / "scale.png")
    monkeypatch.setattr(train, "run_protocol", lambda *a, **k: pytest.fail("a finished point ran again"))
    scale.main(["--runs", str(tmp_path), "--points", "middle"])


def test_the_report_keeps_runs_of_another_task0_apart(tiny_base, tmp_path):
    """A pipeline's Task 0 differs from the default's in settings keyed only when changed: the report of one
    configuration lists its own Task-1 runs, not those of the other's Task 0."""
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    tiny(runs_dir, "--stage", "task1")
    tiny(runs_dir, "--stage", "task1", "--pipeline", "trainer")
    for flags in ([], ["--pipeline", "trainer"]):
        cfg = train.parse_args(["--preset", "tiny", "--runs", str(runs_dir), "--pretrain-epochs", "1", *flags])[0]
        assert [d for d, _ in report.related_runs(cfg, "task1")] == [runs.stage_dir(cfg, "task1")[0]]
