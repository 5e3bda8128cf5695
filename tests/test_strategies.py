"""strategies.py: each method's mechanics (not its outcome), on hand-checkable cases and the tiny preset. Whole
runs of each method (task vectors, state across tasks and kills, LAMOL's prompts): test_strategies_e2e.py."""
import os
import types

import numpy as np
import pytest
import torch

import runs
import strategies
import train

torch.set_num_threads(1)


# -----------------------------------------------------------------------------------------------
# EWC


class Linear(torch.nn.Module):
    """loss of a batch = mean over its rows of w . x_row: the gradient of one row is x_row, by hand."""

    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim))

    def forward(self, inputs, targets, loss_mask=None):
        return None, (inputs @ self.w).mean()


class Rows:
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        return self.x[torch.as_tensor(idx)], None, None


def test_fisher_is_the_mean_per_sample_squared_gradient_and_the_authors_estimator_is_not():
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0], [-1.0, 0.5], [2.0, 1.0]])
    model = Linear(2)
    fisher = strategies.diagonal_fisher(model, Rows(x), batch_size=2, estimator="per-sample")
    assert torch.allclose(fisher["w"], (x ** 2).mean(0))
    authors = strategies.diagonal_fisher(model, Rows(x), batch_size=2, estimator="authors")
    by_hand = (2 * x[:2].mean(0) ** 2 + 2 * x[2:].mean(0) ** 2) / 4  # B * (batch-mean gradient)^2, over N
    assert torch.allclose(authors["w"], by_hand)
    assert not torch.allclose(authors["w"], fisher["w"])


def test_ewc_penalty_and_its_gradient():
    torch.manual_seed(0)
    model = Linear(3)
    ewc = strategies.make_strategy("ewc", {"ewc_lambda": 7.0})
    ewc.fisher = {"w": torch.tensor([0.5, 2.0, 0.0])}
    ewc.anchor = strategies.snapshot(model)
    penalty = ewc.penalty(model)
    penalty.backward()
    assert penalty.item() == 0.0 and torch.equal(model.w.grad, torch.zeros(3))  # zero at theta*
    with torch.no_grad():
        model.w += torch.tensor([1.0, -0.5, 3.0])
    model.w.grad = None
    penalty = ewc.penalty(model)
    penalty.backward()
    delta = model.w.detach() - ewc.anchor["w"]
    assert penalty.item() == pytest.approx(0.5 * 7.0 * (ewc.fisher["w"] * delta ** 2).sum().item())
    assert torch.allclose(model.w.grad, 7.0 * ewc.fisher["w"] * delta)  # lambda F (theta - theta*)


def test_ewc_averages_the_fisher_over_tasks():
    model = Linear(2)
    ewc = strategies.make_strategy("ewc")
    x0, x1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])
    ctx = types.SimpleNamespace(model=model, task=1, train=[Rows(x0), Rows(x1)], batch_size=1)
    ewc.start(ctx)
    assert torch.allclose(ewc.fisher["w"], x0[0] ** 2) and ewc.tasks_seen == 1
    ctx.task = 2
    ewc.start(ctx)
    assert torch.allclose(ewc.fisher["w"], (x1[0] ** 2 + x0[0] ** 2) / 2) and ewc.tasks_seen == 2

# -----------------------------------------------------------------------------------------------
# Gradient projection and task vectors


def test_gradient_projection_rules():
    g = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    d = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    authors = strategies.GradientProjection.project(g, d, "authors")
    # by hand: row 0: cos = 3/5, g - d * 3/5 = (2.4, 4); row 1: cos = 2/(1 * sqrt 8), g - d * cos
    cos1 = 2 / 8 ** 0.5
    assert torch.allclose(authors, torch.tensor([[2.4, 4.0], [1 - 2 * cos1, -2 * cos1]]))
    exact = strategies.GradientProjection.project(g, d, "exact")
    assert torch.allclose((exact * d).sum(-1), torch.zeros(2), atol=1e-6)  # nothing left along d_row
    v, dv = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([0.0, 3.0, 4.0])  # a 1-D parameter is one row
    assert torch.allclose(strategies.GradientProjection.project(v, dv, "authors"), v - dv * (14 / 5))
    assert strategies.GradientProjection.project(v, dv, "exact") @ dv == pytest.approx(0.0, abs=1e-6)


def test_gradient_projection_direction_is_the_mean_window_update(tmp_path):
    """With one preliminary run, the direction is exactly that run's change between the window's steps."""
    cfg = train.parse_args(["--preset", "tiny", "--runs", str(tmp_path), "--strategy", "gradproj", "--gp-runs", "1",
                            "--gp-window", "1,3"])[0]
    exp = train.Experiment(cfg)
    model = runs.load_checkpoint(os.path.join(train.run_protocol(cfg, "task0"), "final"), "cpu")
    ctx = exp.context(model, task=1)
    start = strategies.snapshot(model)
    gp = strategies.make_strategy("gradproj", cfg.strategy_args)
    gp.start(ctx)
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # restored
    trial, seen = runs.load_checkpoint(os.path.join(train.run_protocol(cfg, "task0"), "final"), "cpu"), {}
    for step, _ in enumerate(ctx.fit(trial, ctx.train[1], [cfg.seed, 31, 1, 0]), start=1):
        seen[step] = strategies.snapshot(trial)
        if step == 3:
            break
    assert all(torch.allclose(gp.direction[n], seen[3][n] - seen[1][n]) for n in start)


# -----------------------------------------------------------------------------------------------
# Replay, multi-task and LAMOL on the tiny preset's data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    cfg = train.parse_args(["--preset", "tiny", "--runs", str(runs_dir)])[0]
    exp = train.Experiment(cfg)
    task0 = train.run_protocol(cfg, "task0")
    return cfg, exp, task0


def pair_keys(qa):
    return [tuple(p + a) for p, a in zip(qa.prompts, qa.answers)]


def batch_rows(batch, pad_id):
    inputs, targets, _ = batch
    rows = torch.cat([inputs, targets[:, -1:]], 1)
    return [tuple(r[r != pad_id].tolist()) for r in rows]


@pytest.mark.parametrize("fraction", [0.1, 0.2])
def test_replay_buffer_and_batches(tiny, fraction):
    cfg, exp, task0 = tiny
    model = runs.load_checkpoint(os.path.join(task0, "final"), "cpu")
    replay = strategies.make_strategy("replay", {"replay_fraction": fraction})
    ctx = exp.context(model, task=1)
    replay.start(ctx)
    assert len(replay.buffer) == round(fraction * len(ctx.train[0])) and set(replay.buffer[:, 0]) == {0}
    assert len(set(replay.buffer[:, 1])) == len(replay.buffer)  # no pair twice
    ctx2 = exp.context(model, task=2)
    replay.start(ctx2)  # Task 1 finished: its share joins the pool
    assert [(replay.buffer[:, 0] == t).sum() for t in (0, 1)] == [round(fraction * len(ctx2.train[t])) for t in (0, 1)]
    buffered = {key for t in (0, 1) for key in np.array(pair_keys(ctx2.train[t]), dtype=object)[replay.buffer[replay.buffer[:, 0] == t, 1]]}
    new = set(pair_keys(ctx2.train[2]))
    batches = replay.epoch(ctx2, np.random.default_rng(0))
    assert len(batches) == -(-len(ctx2.train[2]) // (cfg.ft_batch // 2))  # twice the steps of a plain epoch
    seen_new = []
    for batch in batches:
        rows = batch_rows(batch, exp.tok.pad_id)
        half = cfg.ft_batch // 2
        assert all(r in new for r in rows[:-half]) and all(r in buffered for r in rows[-half:])  # half replayed
        assert len(rows) - half == min(half, len(rows) - half)
        seen_new += rows[:-half]
    assert sorted(seen_new) == sorted(pair_keys(ctx2.train[2]))  # every new pair once an epoch


def test_multitask_epoch_is_every_pair_of_every_task_so_far(tiny):
    cfg, exp, task0 = tiny
    model = runs.load_checkpoint(os.path.join(task0, "final"), "cpu")
    ctx = exp.context(model, task=1)
    multi = strategies.make_strategy("multitask")
    multi.start(ctx)
    seen = [r for b in multi.epoch(ctx, np.random.default_rng(0)) for r in batch_rows(b, exp.tok.pad_id)]
    assert sorted(seen) == sorted(pair_keys(ctx.train[0]) + pair_keys(ctx.train[1]))


def test_lamol_keeps_only_well_formed_samples_and_scores_them(tiny, monkeypatch):
    cfg, exp, task0 = tiny
    model = runs.load_checkpoint(os.path.join(task0, "final"), "cpu")
    ctx = exp.context(model, task=1)
    real = ctx.train[0].prompts[0] + ctx.train[0].answers[0]
    wrong_answer = ctx.train[0].prompts[0] + ctx.train[0].answers[1]
    answer_mark = exp.tok.encode("\nAnswer:")
    samples = [real, real, wrong_answer, real[:-1],  # no EOS
               ctx.train[0].prompts[0] + answer_mark + ctx.train[0].answers[0],  # 'Answer:' twice
               exp.tok.encode("What is the birth date of") + answer_mark + [exp.tok.eos_id]]  # empty answer
    monkeypatch.setattr(model, "generate", lambda prompts, *a, **k: samples[:len(prompts)])
    lamol = strategies.make_strategy("lamol")
    prompts, answers, quality = lamol.pseudo_samples(ctx, 0, len(samples))
    assert quality == {"sampled": 6, "well_formed": 3, "distinct": 2, "question_real": 3, "question_and_answer_real": 2,
                       "rejected": {"no 'Answer:'": 0, "'Answer:' twice": 1, "no EOS": 1, "no answer": 1}}
    qa = ctx.from_pairs(prompts, answers)
    assert [p + a for p, a in zip(qa.prompts, qa.answers)] == [real, real, wrong_answer]
    assert all(a[-1] == exp.tok.eos_id and p[-len(answer_mark):] == answer_mark for p, a in zip(prompts, answers))
    inputs, targets, mask = qa.batch([0])
    assert (inputs[0, :len(prompts[0])].tolist() == prompts[0]) and mask[0].sum() == len(answers[0])


def test_lamol_loss_adds_the_generation_term(tiny):
    cfg, exp, task0 = tiny
    model = runs.load_checkpoint(os.path.join(task0, "final"), "cpu")
    ctx = exp.context(model, task=1)
    batch = ctx.train[1].batch([0, 1, 2])
    _, qa_loss = model(*batch[:2], loss_mask=batch[2])
    for token, prefix in (("shared", [exp.tok.eos_id]), ("task", [exp.tok.eos_id, exp.tok.encode(" 2")[0]])):
        lamol = strategies.make_strategy("lamol", {"lamol_token": token})
        assert lamol.gen_prefix(exp.tok, 1) == prefix
        total = lamol.loss(ctx, (*batch, torch.tensor([prefix] * 3)), qa_loss)  # each row behind Task 1's marker
        rows = [prefix + r.tolist() for r in torch.cat([batch[0][:, :1], batch[1]], 1)]
        pad = exp.tok.pad_id
        nll, count = 0.0, 0
        for row in rows:  # the generation loss by hand: every real token after the marker, EOS included
            row = [t for t in row if t != pad]
            logits, _ = model(torch.tensor([row[:-1]]))
            targets = torch.tensor(row[1:])[len(prefix) - 1:]
            nll += torch.nn.functional.cross_entropy(logits[0, len(prefix) - 1:], targets, reduction="sum").item()
            count += len(targets)
        assert total.item() == pytest.approx(qa_loss.item() + 0.25 * nll / count, rel=1e-4)
