"""The training protocol on hand cases and tiny runs: continual-learning metrics, the QA loss mask, early
stopping, resuming inside Task 1, the recovery probe's length and the multi-run reports, each checked against
a value computed here (by hand, or from the files and weights the runs left)."""
import dataclasses
import math
import os
import shutil

import numpy as np
import pytest
import torch

import data
import report
import runs
import strategies
import train
from model import Transformer
from run_helpers import (FAST, Killed, copy_runs, fake_em_of, fake_evaluate, kill_at_end, kill_during, parameters,
                         read_json, read_metrics, same_tensors, stage, summary, tensors, tiny, tiny_base,  # noqa: F401
                         tiny_data, qa_tokens)

torch.set_num_threads(1)


# -----------------------------------------------------------------------------------------------
# Metrics and batches, by hand


def test_cl_metrics_where_forgetting_and_backward_transfer_differ():
    """Forgetting starts from each task's best earlier accuracy, -BWT from its accuracy right after it was
    learnt: here Task 0 improves after Task 1 and Task 1 after Task 2, so the two differ."""
    R = [[0.6, 0.99, 0.99, 0.99],   # right of the diagonal: tasks not trained yet, ignored
         [0.9, 0.5, 0.99, 0.99],
         [0.7, 0.8, 0.4, 0.99],
         [0.2, 0.3, 0.9, 0.7]]
    m = report.cl_metrics(R)
    assert m["average_accuracy"] == pytest.approx((0.2 + 0.3 + 0.9 + 0.7) / 4)
    # best earlier - final: task 0: 0.9 (after Task 1) - 0.2; task 1: 0.8 (after Task 2) - 0.3; task 2: 0.4 - 0.9
    assert m["forgetting"] == pytest.approx((0.7 + 0.5 - 0.5) / 3)
    # final - right after learning: 0.2 - 0.6, 0.3 - 0.5, 0.9 - 0.4
    assert m["backward_transfer"] == pytest.approx((-0.4 - 0.2 + 0.5) / 3)
    assert m["forgetting"] != pytest.approx(-m["backward_transfer"])
    assert report.cl_metrics([row[:i + 1] for i, row in enumerate(R)]) == m  # the lower triangle is enough
    assert report.cl_metrics([[0.5]]) == {"average_accuracy": 0.5, "forgetting": 0.0, "backward_transfer": 0.0}


def test_qa_epochs_mask_the_answer_and_eos_shifted_by_one():
    """Two hand-made pairs (PAD 0, EOS 1): the targets are the tokens shifted left by one, and the mask is
    True exactly where the target is an answer token or the EOS."""
    prompts, answers = [[5, 6, 7], [5, 6]], [[8, 9, 1], [10, 1]]
    by_hand = (torch.tensor([[5, 6, 7, 8, 9], [5, 6, 10, 1, 0]]),                  # inputs
               torch.tensor([[6, 7, 8, 9, 1], [6, 10, 1, 0, 0]]),                  # targets
               torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool))  # loss on 8 9 EOS | 10 EOS
    arrays = data.QAArrays(tokens=np.array([[5, 6, 7, 8, 9, 1, 0], [5, 6, 10, 1, 0, 0, 0]]),  # a pad column too
                           loss_mask=np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=bool),
                           prompt_len=np.array([3, 2]), length=np.array([6, 4]), answer_first_id=np.array([8, 10]),
                           attribute=np.array([0, 1]), person_id=np.array([0, 1]))
    for qa in (data.QASet.from_pairs(prompts, answers, pad_id=0, device="cpu"),
               data.QASet.from_arrays(arrays, "cpu")):
        (inputs, targets, mask), = qa.epoch(batch_size=2, rng=np.random.default_rng(0))
        order = np.random.default_rng(0).permutation(2)  # the batch's rows, in the epoch's seeded order
        assert torch.equal(inputs, by_hand[0][order]) and torch.equal(targets, by_hand[1][order])
        assert torch.equal(mask, by_hand[2][order])


def test_real_qa_pairs_mask_the_answer_and_eos():
    """On the tiny preset's Task-1 pairs: the loss covers the targets from the one after "Answer:" to the EOS."""
    bio, tok = tiny_data()
    qa = data.QASet.from_arrays(data.qa_arrays(bio, bio.splits["task1"], tok), "cpu")
    mark = tok.encode("\nAnswer:")
    rows = 0
    for _, targets, mask in qa.epoch(batch_size=16, rng=np.random.default_rng(1)):
        for row, row_mask in zip(targets.tolist(), mask.tolist()):
            answer = next(i for i in range(len(row)) if row[i:i + len(mark)] == mark) + len(mark)
            eos = row.index(tok.eos_id)
            assert row_mask == [answer <= i <= eos for i in range(len(row))]
            rows += 1
    assert rows == len(qa)


# -----------------------------------------------------------------------------------------------
# Early stopping, and resuming inside Task 1


class DistanceEval:
    """A stand-in for train.evaluate whose exact match is min(1, |theta - theta_Task0| / scale): it grows as
    Task 1 trains, so the step at which it first reaches a threshold can be found beforehand."""

    def __init__(self, reference, scale):
        self.reference, self.scale = reference, scale

    def distance(self, named_parameters):
        squares = (float(((p.detach() - self.reference[n]).double() ** 2).sum()) for n, p in named_parameters)
        return math.sqrt(sum(squares))

    def __call__(self, model, qa, tok, exact_match=True, batch_size=1024):
        value = min(1.0, self.distance(model.named_parameters()) / self.scale)
        return {m: value for m in ("first_token", "first_token_prob", "em")} | {
            f"{m}_by_attribute": {a: value for a in data.ATTRIBUTES} for m in ("first_token", "first_token_prob", "em")}


STOP_STEP = 8  # Task 1 evaluates itself every 4 steps (sparse_every); 8 is no multiple of state_every = 3


@pytest.fixture(scope="module")
def early_stop(tiny_base, tmp_path_factory):
    """Calibrate DistanceEval on a Task-1 run without early stopping, so that exact match first reaches 0.99 at
    STOP_STEP; then the reference run with --early-stop 0.99. Returns (its Task-1 directory, the evaluator)."""
    task0 = stage(tiny_base, "task0-")
    reference = parameters(os.path.join(task0, "final"))
    calibration = copy_runs(tiny_base, tmp_path_factory.mktemp("calibrate") / "runs")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "evaluate", DistanceEval(reference, scale=1e6))
        tiny(calibration, "--stage", "task1", "--early-stop", "0")
    records = read_metrics(stage(calibration, "task1-"))
    distance = {r["step"]: r["current"]["em"] * 1e6 for r in records if "current" in r}
    assert [s for s in distance if s < STOP_STEP] == [0, 4] and distance[4] < 0.98 * distance[STOP_STEP]
    evaluator = DistanceEval(reference, scale=distance[STOP_STEP] / 0.995)  # 0.995 at step 8; < 0.98 at step 4
    runs_dir = copy_runs(tiny_base, tmp_path_factory.mktemp("stopped") / "runs")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "evaluate", evaluator)
        tiny(runs_dir, "--stage", "task1", "--early-stop", "0.99")
    return stage(runs_dir, "task1-"), evaluator


def test_early_stop_ends_task1_at_the_step_that_crosses_the_threshold(early_stop):
    task1, evaluator = early_stop
    s = summary(task1)
    assert s["steps"] == STOP_STEP and s["stopped_early"] is True
    records = read_metrics(task1)
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]  # nothing after the stop
    assert [r["current"]["em"] >= 0.99 for r in records if "current" in r] == [False, False, True]
    assert read_json(os.path.join(task1, "final", "training_state.json"))["step"] == STOP_STEP
    final = parameters(os.path.join(task1, "final"))  # the model of step 8, not one trained on
    assert evaluator.distance(final.items()) / evaluator.scale == pytest.approx(records[-1]["current"]["em"], rel=1e-12)


def whole_record(task1):
    """Everything a Task-1 run leaves that must not depend on interruptions."""
    checkpoints = sorted(os.listdir(os.path.join(task1, "ckpt")))
    models = [os.path.join(task1, "ckpt", c) for c in checkpoints] + [os.path.join(task1, "final")]
    return {"metrics": read_metrics(task1), "summary": summary(task1), "checkpoints": checkpoints,
            "states": [read_json(os.path.join(task1, "ckpt", c, "training_state.json")) for c in checkpoints],
            "tensors": [tensors(d) for d in models]}


def assert_same_record(a, b):
    assert a["metrics"] == b["metrics"] and a["summary"] == b["summary"]
    assert a["checkpoints"] == b["checkpoints"] and a["states"] == b["states"]
    assert len(a["tensors"]) == len(b["tensors"])
    assert all(same_tensors(x, y) for x, y in zip(a["tensors"], b["tensors"]))


@pytest.mark.parametrize("kill_step,state_step", [(5, 3), (7, 6), (None, STOP_STEP)])
def test_task1_killed_and_resumed_equals_the_uninterrupted_run(early_stop, tiny_base, tmp_path, monkeypatch, kill_step,
                                                              state_step):
    """Kills inside Task 1 after its step-4 checkpoint (state of step 3), just before the early stop (state of
    step 6), and after it (None: the loop has stopped and saved its last state; the task's end has not run).
    --resume must end with the very records of the uninterrupted run: metrics, summary, checkpoints, weights."""
    task1, evaluator = early_stop
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", evaluator)
    with monkeypatch.context() as m:
        if kill_step is None:
            kill_at_end(m, strategies.Seq, task=1)
        else:
            kill_during(m, strategies.Seq, task=1, step=kill_step)
        with pytest.raises(Killed):
            tiny(runs_dir, "--stage", "task1", "--early-stop", "0.99")
    killed = stage(runs_dir, "task1-")
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    state = os.path.join(killed, "state", read_json(os.path.join(killed, "state", "latest.json"))["dir"], "state.json")
    assert read_json(state)["step"] == state_step and read_json(state)["stopped_early"] == (kill_step is None)
    counted = read_json(state)["meter"]
    tiny(runs_dir, "--stage", "task1", "--early-stop", "0.99", "--resume")
    assert os.path.basename(killed) == os.path.basename(task1)
    assert_same_record(whole_record(killed), whole_record(task1))  # train_flops and train_tokens included
    resumed = summary(killed, timings=True)
    # the killed leg's time, up to its state, is counted (summary.json rounds to 0.1 s)
    assert resumed["seconds"] >= round(counted["seconds"], 1)
    assert all(resumed["time_s"][kind] >= round(seconds, 1) for kind, seconds in counted["time_s"].items())

# -----------------------------------------------------------------------------------------------
# The recovery probe


def test_recovery_probe_is_a_tenth_of_task1_on_every_task0_training_pair(tiny_base, tmp_path, monkeypatch):
    """Counted from the training forward passes themselves: Task 1 takes T steps; then each probed checkpoint
    (pretrained, Task 0, Task-1 steps 2 and 4, the final model) trains 0.1 T steps, here one epoch, which
    must be every QA pair of the Task-0 training people exactly once."""
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", fake_evaluate)  # the probe's length does not depend on the scores
    flags = ("--task-epochs", "10", "--early-stop", "0", "--recover-fraction", "0.1")
    seen = []
    real_forward = Transformer.forward

    def forward(self, idx, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            seen.append(idx.clone())
        return real_forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", forward)
    tiny(runs_dir, "--stage", "task1", *flags)
    task1_steps = len(seen)
    assert task1_steps == 10 * 10  # 10 epochs of 150 pairs at 16 a step
    tiny(runs_dir, "--stage", "task2", *flags)  # the probe follows the last task
    seen.clear()
    tiny(runs_dir, "--stage", "recover", *flags)
    probe_steps = round(0.1 * task1_steps)
    assert len(seen) == 5 * probe_steps
    tokens, tok = qa_tokens("task0_train")
    pair_keys = sorted(tuple(t for t in row if t != tok.pad_id)[:-1] for row in tokens.tolist())  # without EOS
    for probe in range(5):
        rows = [r for idx in seen[probe * probe_steps:(probe + 1) * probe_steps] for r in idx.tolist()]
        keys = [tuple(t for t in r if t != tok.pad_id) for r in rows]
        keys = sorted(k[:-1] if k[-1] == tok.eos_id else k for k in keys)
        assert keys == pair_keys
    rec = summary(stage(runs_dir, "recover-"))
    assert rec["probe_steps"] == probe_steps and [r["checkpoint"] for r in rec["rows"]] == [
        "pretrained", "task0", "step-0000002", "step-0000004", "final"]



def test_recovery_probe_killed_between_probes_counts_every_leg(tiny_base, tmp_path, monkeypatch):
    """A kill just before the third probe starts: --resume skips the two probes done and trains the rest, and
    the stage's summary still counts the skipped probes' work (the meter of their last saved state), so its
    FLOPs and tokens equal the uninterrupted run's."""
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    flags = ("--task-epochs", "2", "--early-stop", "0")
    reference, runs_dir = copy_runs(tiny_base, tmp_path / "reference"), copy_runs(tiny_base, tmp_path / "runs")
    tiny(reference, "--stage", "recover", *flags)
    tiny(runs_dir, "--stage", "task2", *flags)  # so that the recovery probe alone loads checkpoints below
    loaded, real_load = [], runs.load_checkpoint

    def load_checkpoint(path, device):
        loaded.append(path)
        if len(loaded) == 3:
            raise Killed("before the third probe")
        return real_load(path, device)

    with monkeypatch.context() as m:
        m.setattr(runs, "load_checkpoint", load_checkpoint)
        with pytest.raises(Killed):
            tiny(runs_dir, "--stage", "recover", *flags)
    tiny(runs_dir, "--stage", "recover", *flags, "--resume")
    resumed, whole = (summary(stage(d, "recover-"), timings=True) for d in (runs_dir, reference))
    assert resumed["rows"] == whole["rows"]
    assert (resumed["train_tokens"], resumed["train_flops"]) == (whole["train_tokens"], whole["train_flops"])
    assert resumed["train_tokens"] > 0

# -----------------------------------------------------------------------------------------------
# The reports over several runs: values recomputed from the runs' own weights and files

ONE_EPOCH = ("--task-epochs", "1")  # 10 steps a task: past the saved Task-1 steps 2 and 4


def run_of(runs_dir, prefix, seed):
    """The one completed stage directory named prefix* whose settings have this seed."""
    root = os.path.join(runs_dir, "tiny")
    (path,) = [os.path.join(root, n) for n in os.listdir(root)
               if n.startswith(prefix) and os.path.isdir(os.path.join(root, n))
               and read_json(os.path.join(root, n, "summary.json"))["settings"]["seed"] == seed]
    return path


def headline_numbers(runs_dir, seed):
    """A seed's row of the headline table, from its runs' weights (through fake_evaluate), metrics and probes."""
    task0, seq = run_of(runs_dir, "task0-", seed), run_of(runs_dir, "task1-seq-", seed)
    freeze, rec = run_of(runs_dir, "task1-freeze1-", seed), run_of(runs_dir, "recover-seq-", seed)
    probes = {name: read_json(os.path.join(rec, name, "result.json")) for name in os.listdir(rec)
              if os.path.isdir(os.path.join(rec, name))}
    steps = lambda run: read_json(os.path.join(run, "final", "training_state.json"))["step"]  # noqa: E731
    saved = sorted(name for name in os.listdir(os.path.join(seq, "ckpt")) if name != "step-0000000")
    # the final model is probed as itself unless Task 1 ended (early stop) on a saved step
    expected_probes = ["pretrained", "task0"] + saved + ([] if f"step-{steps(seq):07d}" in saved else ["final"])
    assert sorted(probes) == sorted(expected_probes)
    where = {"pretrained": os.path.join(run_of(runs_dir, "pretrain-", seed), "final"),
             "task0": os.path.join(task0, "final"), "final": os.path.join(seq, "final")}
    for name in probes:  # each probe started from the checkpoint it names
        path = where.get(name, os.path.join(seq, "ckpt", name))
        assert probes[name]["task0_em_before"] == pytest.approx(fake_em_of(path, "task0_test", seed), abs=1e-9)
    ceiling = max(probes["pretrained"]["task0_em_after"], probes["task0"]["task0_em_after"])
    task1_probes = sorted((p for p in probes.values() if p["task1_step"] is not None), key=lambda p: p["task1_step"])
    early = [p["task0_em_after"] / ceiling for p in task1_probes if p["task1_step"] <= 150]
    return {"task0_extraction": fake_em_of(os.path.join(task0, "final"), "task0_test", seed),
            "seq_task0_at_150": min(r["task0"]["em"] for r in read_metrics(seq) if r["step"] <= 150),
            "seq_task0_end": fake_em_of(os.path.join(seq, "final"), "task0_test", seed),
            "seq_task1_end": fake_em_of(os.path.join(seq, "final"), "task1", seed), "seq_steps": steps(seq),
            "probe_ceiling": ceiling, "recovered_share_early": sum(early) / len(early),
            "recovered_share_end": task1_probes[-1]["task0_em_after"] / ceiling,
            "freeze_task0_end": fake_em_of(os.path.join(freeze, "final"), "task0_test", seed),
            "freeze_task1_end": fake_em_of(os.path.join(freeze, "final"), "task1", seed), "freeze_steps": steps(freeze)}


def test_headline_table_from_its_runs(tiny_base, tmp_path, monkeypatch):
    runs_dir = copy_runs(tiny_base, tmp_path / "runs", leave_out=["task0-"])  # Task 0 scored by fake_evaluate too
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    root = tiny(runs_dir, "--stage", "headline", "--seeds", "0,1", *ONE_EPOCH)
    expected = [headline_numbers(runs_dir, seed) for seed in (0, 1)]
    result = read_json(os.path.join(root, "headline.json"))
    assert result["seeds"] == [0, 1] and result["per_seed"][0].keys() == expected[0].keys()
    for got, want in zip(result["per_seed"], expected):
        assert got == pytest.approx(want, abs=1e-9)
    for key in ("task0_extraction", "seq_task0_end", "freeze_task0_end", "probe_ceiling"):
        a, b = expected[0][key], expected[1][key]
        assert abs(a - b) > 1e-3, key  # the seeds' runs differ, so a row read from the wrong run shows
        assert result["stats"][key]["mean"] == pytest.approx((a + b) / 2)
        assert result["stats"][key]["std"] == pytest.approx(abs(a - b) / math.sqrt(2))  # sample std of two
    table = open(os.path.join(root, "headline.md")).read().splitlines()
    for key, paper in (("seq_task0_end", "11.18"), ("freeze_task0_end", "44.22")):  # percent, as the paper
        (row,) = [line for line in table if f"| {paper} |" in line]
        a, b = (100 * e[key] for e in expected)
        assert row.endswith(f"| {(a + b) / 2:.1f} +- {abs(a - b) / math.sqrt(2):.1f} | {a:.1f}, {b:.1f} |")


def test_headline_reads_a_seeds_row_file_instead_of_its_runs(tiny_base, tmp_path, monkeypatch):
    """A seed's row file stands in for its runs (copied from another machine): the table is the same, nothing is
    trained; a row file of other settings is not read."""
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    root = tiny(runs_dir, "--stage", "headline", "--seeds", "0,1", *ONE_EPOCH)
    first = read_json(os.path.join(root, "headline.json"))
    rows = os.listdir(os.path.join(root, "rows"))
    assert len(rows) == 2 and all(name.startswith("headline-seed") for name in rows)
    runs_only = [name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)) and name != "rows"]
    for name in runs_only:  # every run gone: the row files are what is left of them
        shutil.rmtree(os.path.join(root, name))
    tiny(runs_dir, "--stage", "headline", "--seeds", "1,0", *ONE_EPOCH)
    again = read_json(os.path.join(root, "headline.json"))
    assert again["per_seed"] == first["per_seed"][::-1]
    for key, stat in first["stats"].items():
        assert again["stats"][key] == pytest.approx(stat), key
    assert not any(os.path.exists(os.path.join(root, name)) for name in runs_only)  # nothing trained again
    seq = train.parse_args(["--preset", "tiny", "--runs", str(runs_dir), *FAST, *ONE_EPOCH])[0]
    freeze = dataclasses.replace(seq, strategy="freeze")
    mine = [runs.stage_dir(seq, "recover")[0], runs.stage_dir(freeze, "task1")[0]]
    assert os.path.basename(report.row_file(root, "headline-seed0", mine)) in rows
    other = [runs.stage_dir(dataclasses.replace(c, ft_lr=2e-3), s)[0] for c, s in ((seq, "recover"), (freeze, "task1"))]
    assert os.path.basename(report.row_file(root, "headline-seed0", other)) not in rows


def test_freeze_sweep_from_its_runs(tiny_base, tmp_path, monkeypatch):
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    root = tiny(runs_dir, "--stage", "freeze-sweep", *ONE_EPOCH)
    rows = read_json(os.path.join(root, "freeze-sweep.json"))["rows"]
    assert [r["frozen_blocks"] for r in rows] == ["seq", 0, 1, 2]
    for r in rows:
        run = stage(runs_dir, "task1-seq-" if r["frozen_blocks"] == "seq" else f"task1-freeze{r['frozen_blocks']}-")
        assert r["task0_em"] == pytest.approx(fake_em_of(os.path.join(run, "final"), "task0_test"), abs=1e-9)
        assert r["task1_em"] == pytest.approx(fake_em_of(os.path.join(run, "final"), "task1"), abs=1e-9)
        assert r["steps"] == read_json(os.path.join(run, "final", "training_state.json"))["step"]
    assert len({round(r["task0_em"], 4) for r in rows}) == len(rows)  # four runs, four different results
    assert os.path.exists(os.path.join(root, "freeze-sweep.png"))


def test_methods_table_from_its_runs(tiny_base, tmp_path, monkeypatch):
    """Every method of the table runs (each its own Task-1 run; LAMOL_g and LAMOL_t their own Task 0 too), and
    each row holds its own run's results."""
    runs_dir = copy_runs(tiny_base, tmp_path / "runs")
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    root = tiny(runs_dir, "--stage", "table", "--early-stop", "0", *ONE_EPOCH)  # every method its whole run
    rows = read_json(os.path.join(root, "table.json"))["rows"]
    assert [r["method"] for r in rows] == [label for label, *_ in report.TABLE]
    assert len({r["run"] for r in rows}) == len(rows)
    lines = open(os.path.join(root, "table.md")).read().splitlines()[2:]
    for r, line, (label, _, _, paper) in zip(rows, lines, report.TABLE):
        run = os.path.join(runs_dir, "tiny", r["run"])
        task0_em = fake_em_of(os.path.join(run, "final"), "task0_test")
        task1_em = fake_em_of(os.path.join(run, "final"), "task1")
        steps = read_json(os.path.join(run, "final", "training_state.json"))["step"]
        assert (r["task0_em"], r["task1_em"], r["steps"]) == (pytest.approx(task0_em, abs=1e-9),
                                                              pytest.approx(task1_em, abs=1e-9), steps)
        seconds = summary(run, timings=True)["seconds"]
        if r["strategy"].startswith("lamol"):  # its own Task 0 is part of its cost
            seconds += summary(stage(runs_dir, f"task0-{r['strategy']}-"), timings=True)["seconds"]
        assert r["seconds"] == pytest.approx(seconds)
        paper = report.PAPER.get(paper, "-")
        assert line.startswith(f"| {label} | {paper} | {task0_em:.3f}") and f"| {task1_em:.3f} | {steps}" in line
        if r["strategy"].startswith("lamol"):  # its own Task 0's extraction, beside its Task-0 result
            own = fake_em_of(os.path.join(stage(runs_dir, f"task0-{r['strategy']}-"), "final"), "task0_test")
            assert r["own_task0_em"] == pytest.approx(own, abs=1e-9) and f"(own Task 0: {own:.3f})" in line
        reached = report.first_reach(read_metrics(run), 0.99)
        assert r["reached_step"] == (reached and reached["step"])
    # as many different results as different models (EWC at lambda 1 ends bit-identical to SEQ on the tiny preset)
    models = {open(os.path.join(runs_dir, "tiny", r["run"], "final", "model.safetensors"), "rb").read() for r in rows}
    assert len({round(r["task0_em"], 9) for r in rows}) == len(models) >= len(rows) - 2
    task0_runs = sorted(name.rsplit("-", 1)[0] for name in os.listdir(os.path.join(runs_dir, "tiny"))
                        if name.startswith("task0-") and os.path.isdir(os.path.join(runs_dir, "tiny", name)))
    assert task0_runs == ["task0", "task0-lamol-g", "task0-lamol-t"]  # the shared one, and LAMOL's own two
    assert os.path.exists(os.path.join(root, "table.png"))
    multitask, control = (next(r for r in rows if r["strategy"] == name) for name in ("multitask", "multitask-control"))
    control_curve = read_metrics(os.path.join(runs_dir, "tiny", control["run"]))
    assert control["task0_em_at_multitask_end"] == report.task0_at(control_curve, multitask["steps"])
    lamol = next(r for r in rows if r["strategy"] == "lamol-g")
    assert lamol["strategy_state"]["pseudo_sample_quality"]["0"]["sampled"] > 0
    table = open(os.path.join(root, "table.md")).read()
    for name in os.listdir(os.path.join(runs_dir, "tiny")):  # every run gone: each row is read from its file
        if os.path.isdir(os.path.join(runs_dir, "tiny", name)) and name != "rows":
            shutil.rmtree(os.path.join(runs_dir, "tiny", name))
    tiny(runs_dir, "--stage", "table", "--early-stop", "0", *ONE_EPOCH)
    assert read_json(os.path.join(root, "table.json"))["rows"] == rows
    assert open(os.path.join(root, "table.md")).read() == table
    tiny_root = os.path.join(runs_dir, "tiny")
    assert [n for n in os.listdir(tiny_root) if os.path.isdir(os.path.join(tiny_root, n))] == ["rows"]  # no run again
