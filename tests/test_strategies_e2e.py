"""Strategies through whole tiny runs: the task-vector search recomputed from the saved checkpoints, each
strategy's state across tasks and kills compared tensor by tensor with the one in memory, and LAMOL_t's
generation prompts."""
import os
import random

import numpy as np
import pytest
import torch

import strategies
import train
from model import Transformer
from run_helpers import (Killed, assert_same, copy_runs, fake_em, fake_evaluate, instances, kill_at_end, kill_during,
                         parameters, qa_tokens, read_json, same_tensors, set_salt, stage, strategy_attributes, summary,
                         tensors, tiny, tiny_base, weight_score)  # noqa: F401 (tiny_base: a fixture)

torch.set_num_threads(1)

# -----------------------------------------------------------------------------------------------
# Task vectors: the whole of TaskVector.end against a computation from the saved files


def subset_rows(cfg, n):
    """The fixed evaluation subset of a set of n pairs (train.Experiment.eval_fn): what the grid is scored on."""
    if n <= cfg.eval_subset:
        return np.arange(n)
    return np.array(sorted(np.random.default_rng([cfg.seed, 11]).choice(n, cfg.eval_subset, replace=False).tolist()))


def grid_by_hand(task0, task1, config):
    """Every point theta_e - alpha (theta_E - theta_0) of the search, scored as fake_evaluate scores it: theta_0
    from Task 0's final checkpoint, theta_e and theta_E from Task 1's saved checkpoints (the last of which is
    its end); e over the last tv_last, E over every tv_stride-th from the first."""
    cfg = train.preset_config("tiny")
    theta_0 = parameters(os.path.join(task0, "final"))
    names = [name for name in os.listdir(os.path.join(task1, "ckpt")) if name != "step-0000000"]
    saved = {int(name[5:]): parameters(os.path.join(task1, "ckpt", name)) for name in names}
    steps = sorted(saved)
    salts = {}
    for name, split in ((0, "task0_test"), (1, "task1")):
        tokens, _ = qa_tokens(split)
        salts[name] = set_salt(torch.as_tensor(tokens[subset_rows(cfg, len(tokens))]))
    points = {}
    for e in steps[-config.tv_last:]:
        for E in steps[::config.tv_stride]:
            for alpha in [float(a) for a in config.tv_alphas.split(",")]:
                theta = {n: saved[e][n] - alpha * (saved[E][n] - theta_0[n]) for n in theta_0}
                score = weight_score(theta.items())
                points[e, E, alpha] = {"task0_em": fake_em(score, salts[0]), "new_em": fake_em(score, salts[1]),
                                       "theta": theta}
    return points


def test_task_vector_search_and_choice_from_the_saved_checkpoints(tiny_base, tmp_path, monkeypatch):
    """Run the method twice: with no floor on the new task (the choice is the best Task-0 point), then with a
    floor just above that point's Task-1 score, which must move the choice. Each time the grid must be the
    hand computation, point for point, and the final model the chosen point's weights."""
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    flags = ("--stage", "task1", "--strategy", "taskvector", "--early-stop", "0")
    config = strategies.make_strategy("taskvector", train.preset_config("tiny").strategy_args).config
    task0 = stage(runs_dir, "task0-")
    floor = 0.0
    chosen = []
    for _ in range(2):
        task1 = tiny(runs_dir, *flags, "--tv-min-new", str(floor))
        points = grid_by_hand(task0, task1, config)
        grid = summary(task1)["strategy_state"]["grid"]
        assert [(p["e_step"], p["E_step"], p["alpha"]) for p in grid] == list(points)  # in the search's order
        assert len({p["e_step"] for p in grid}) == 3 and len({p["E_step"] for p in grid}) >= 2
        for p in grid:
            by_hand = points[p["e_step"], p["E_step"], p["alpha"]]
            assert p["task0_em"] == pytest.approx(by_hand["task0_em"], abs=1e-6)
            assert p["new_em"] == pytest.approx(by_hand["new_em"], abs=1e-6)
        eligible = [key for key, p in points.items() if p["new_em"] >= floor]
        best = max(eligible, key=lambda key: points[key]["task0_em"])
        state = summary(task1)["strategy_state"]["best"]
        assert (state["e_step"], state["E_step"], state["alpha"]) == best
        final = parameters(os.path.join(task1, "final"))
        assert all(torch.allclose(final[n], points[best]["theta"][n], atol=1e-6) for n in final)
        chosen.append(best)
        floor = points[best]["new_em"] + 1e-6  # the second run rules the first choice out
        assert len(chosen) == 2 or any(p["new_em"] >= floor for p in points.values()), "no second case to test"
    assert chosen[0] != chosen[1]


def test_task_vector_resumed_after_training_searches_the_same_grid(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    flags = ("--stage", "task1", "--strategy", "taskvector", "--early-stop", "0")
    whole = tiny(copy_runs(tiny_base, tmp_path / "whole"), *flags)
    killed_dir = copy_runs(tiny_base, tmp_path / "killed")
    with monkeypatch.context() as m:
        kill_at_end(m, strategies.TaskVector, task=1)
        with pytest.raises(Killed):
            tiny(killed_dir, *flags)
    resumed = tiny(killed_dir, *flags, "--resume")
    assert summary(resumed)["strategy_state"] == summary(whole)["strategy_state"]
    assert same_tensors(tensors(os.path.join(resumed, "final")), tensors(os.path.join(whole, "final")))

# -----------------------------------------------------------------------------------------------
# Strategy state: what Task 1 leaves is what Task 2 loads, and a run killed anywhere resumes to the same state


def fresh_attributes(name):
    return strategy_attributes(strategies.make_strategy(name, train.preset_config("tiny").strategy_args))


def differs(a, b):
    try:
        assert_same(a, b)
        return False
    except AssertionError:
        return True


@pytest.mark.parametrize("name,carried", [("ewc", {"fisher", "tasks_seen"}), ("replay", {"buffer"}),
                                          ("lamol", set()), ("gradproj", set())])
def test_strategy_state_across_tasks_and_kills(tiny_base, tmp_path, monkeypatch, name, carried):
    """An uninterrupted run to Task 2, recording each task's strategy instance in memory; then the same run
    killed at a random step of Task 1 and again of Task 2, resumed each time. The state Task 2 loads must be,
    tensor by tensor, the attributes Task 1's instance ended with (`carried`: what the method hands on); every
    attribute of each task's instance in the resumed run must equal the uninterrupted run's; and so must the
    weights and the saved strategy state."""
    cls = type(strategies.make_strategy(name))
    flags = ("--stage", "task2", "--strategy", name)
    with monkeypatch.context() as m:
        started, loaded = instances(m, cls)
        whole = tiny(copy_runs(tiny_base, tmp_path / "whole"), *flags)
    handed_on = {k for k, v in loaded.get(2, {}).items() if differs(v, fresh_attributes(name)[k])}
    assert handed_on == carried
    for k in carried:
        assert_same(loaded[2][k], strategy_attributes(started[1])[k], f"{name} {k}")

    task_steps = {k: summary(stage(tmp_path / "whole", f"task{k}-"))["steps"] for k in (1, 2)}
    rng = random.Random(f"kill {name}")
    kills = {k: rng.randint(1, task_steps[k] - 1) for k in (1, 2)}
    killed_dir = copy_runs(tiny_base, tmp_path / "killed")
    resume, seen = (), []
    for task, step in kills.items():
        with monkeypatch.context() as m:
            seen.append(instances(m, cls)[0])
            kill_during(m, cls, task=task, step=step)
            with pytest.raises(Killed):
                tiny(killed_dir, *flags, *resume)
        resume = ("--resume",)
    # the run that resumed Task 1 after its kill ended it holding what the uninterrupted run's Task 1 held
    assert_same(strategy_attributes(seen[1][1]), strategy_attributes(started[1]), f"{name}: Task 1's state")
    with monkeypatch.context() as m:
        started_again, loaded_again = instances(m, cls)
        resumed = tiny(killed_dir, *flags, "--resume")
    assert sorted(started_again) == [2], kills  # Task 1 was complete; Task 2 started over from its last state
    assert_same(loaded_again.get(2), loaded.get(2), f"{name}: loaded by Task 2")
    assert_same(strategy_attributes(started_again[2]), strategy_attributes(started[2]), f"{name}: Task 2's state")
    for k in (1, 2):
        a, b = (os.path.join(stage(d, f"task{k}-"), "final") for d in (tmp_path / "whole", killed_dir))
        assert same_tensors(tensors(a), tensors(b)), (k, kills)
        if os.path.exists(os.path.join(a, "strategy.safetensors")):
            assert same_tensors(tensors(a, "strategy.safetensors"), tensors(b, "strategy.safetensors"))
            assert read_json(os.path.join(a, "strategy.json")) == read_json(os.path.join(b, "strategy.json"))
    assert os.path.basename(resumed) == os.path.basename(whole)

# -----------------------------------------------------------------------------------------------
# LAMOL: each task's pseudo samples come from its own marker


@pytest.mark.parametrize("token", ["task", "shared"])
def test_lamol_generates_each_old_task_from_its_own_marker(tiny_base, tmp_path, monkeypatch, token):
    """Generation is replaced by a stand-in that answers the marker of task k with real pairs of task k (the
    marker says which). LAMOL_t must ask for task k's samples with EOS ' k+1', and then find every one of them
    real for task k; LAMOL_g asks with EOS alone, so its task-1 samples (answered from Task 0) are not real."""
    tokens = {k: qa_tokens(split)[0] for k, split in ((0, "task0_train"), (1, "task1"))}
    tok = qa_tokens("task1")[1]
    real = {k: [[t for t in row if t != tok.pad_id] for row in rows.tolist()] for k, rows in tokens.items()}
    marker = {k: [tok.eos_id] + tok.encode(f" {k + 1}") for k in (0, 1)}
    calls = []

    def generate(self, prompts, max_new_tokens, **kwargs):
        calls.append(prompts)
        task = next((k for k, m in marker.items() if prompts[0] == m), 0)  # EOS alone: answered from Task 0
        return [real[task][i % len(real[task])] for i in range(len(prompts))]

    monkeypatch.setattr(Transformer, "generate", generate)
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    out = tiny(runs_dir, "--stage", "task2", "--strategy", "lamol", "--lamol-token", token)
    n_task1, n_task2 = round(0.2 * len(real[1]) / 1), round(0.2 * len(real[1]) / 2)  # 20% of the new task's pairs
    expected = [marker[0]] * n_task1, [marker[0]] * n_task2, [marker[1]] * n_task2  # Task 1: of task 0; Task 2: 0, 1
    if token == "shared":
        expected = tuple([[tok.eos_id]] * len(prompts) for prompts in expected)
    assert calls == list(expected)
    quality = summary(out)["strategy_state"]["pseudo_sample_quality"]
    assert quality["0"]["question_and_answer_real"] == n_task2
    assert quality["1"]["question_and_answer_real"] == (n_task2 if token == "task" else 0)
