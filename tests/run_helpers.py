"""Helpers of the end-to-end tests (test_protocol.py, test_strategies_e2e.py): tiny-preset runs driven through
train.main, a stand-in evaluator that is a cheap function of the weights, and a kill at a chosen training step.

The stand-in evaluator exists because the tiny model learns nothing in its few steps (every exact match is 0):
numbers that are 0 in every run cannot tell one run from another. Its "exact match" is a smooth function of
the weights, so every run, checkpoint and task-vector point gets its own value, computable by hand from the
saved tensors."""
import copy
import glob
import json
import math
import os
import shutil
import zlib

import numpy as np
import pytest
import torch

import train
from model import Transformer, read_safetensors

TIMINGS = ("seconds", "time_s")  # wall-clock: a resumed stage's differ (its FLOPs and tokens must not)
FAST = ("--pretrain-epochs", "1")  # every run of these tests shares one cached pretraining


def tiny(runs_dir, *flags):
    """train.py's command line on the tiny preset (one pretraining epoch), in `runs_dir`."""
    return train.main(["--preset", "tiny", "--runs", str(runs_dir), *FAST, *flags])


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Pretraining and the shared Task 0 of the tiny preset, scored by the real evaluator; tests copy it."""
    runs_dir = tmp_path_factory.mktemp("base")
    tiny(runs_dir, "--stage", "task0")
    return runs_dir


def stage(runs_dir, prefix):
    """The one completed or interrupted stage directory whose name starts with `prefix` (e.g. 'task1-seq-')."""
    (path,) = [p for p in glob.glob(os.path.join(str(runs_dir), "tiny", prefix + "*")) if os.path.isdir(p)]
    return path


def tiny_data(seed=0):
    """The tiny preset's dataset and tokenizer, with the population the tiny preset's runs build."""
    tok = train.data.build_tokenizer()
    return train.data.build_dataset(train.data_config(train.preset_config("tiny", seed=seed)), tok), tok


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_metrics(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(stage_dir, timings=False):
    """summary.json, without the timings unless asked."""
    s = read_json(os.path.join(stage_dir, "summary.json"))
    return s if timings else {k: v for k, v in s.items() if k not in TIMINGS}


def tensors(checkpoint_dir, name="model.safetensors"):
    return read_safetensors(os.path.join(checkpoint_dir, name))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def parameters(checkpoint_dir):
    """A checkpoint's weights by the model's own parameter names, read through Transformer.from_pretrained."""
    return {n: p.detach() for n, p in Transformer.from_pretrained(checkpoint_dir).named_parameters()}


def copy_runs(source, dest, leave_out=()):
    """A copy of a runs directory (its cached stages), without its lock file and the stages named
    leave_out* (e.g. 'task0-')."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("train.lock", *(f"{prefix}*" for prefix in leave_out)))
    return dest

# -----------------------------------------------------------------------------------------------
# A stand-in for train.evaluate


_directions = {}


def direction(name, shape):
    """A fixed random direction for the parameter `name` (seeded by the name)."""
    if (name, shape) not in _directions:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        _directions[name, shape] = torch.randn(shape, generator=generator, dtype=torch.float64)
    return _directions[name, shape]


def weight_score(named_parameters):
    """sum over parameters of <theta, a fixed random direction>: moves by O(0.1) when Task 1 trains."""
    return sum(float((p.detach().double() * direction(n, tuple(p.shape))).sum()) for n, p in named_parameters)


def set_salt(tokens):
    """A number of its own for each QA set (Task 0's test people, Task 1's pairs, ...), from its token rows."""
    return float(tokens.sum()) % 1000 / 1000 * 2 * math.pi


def fake_em(score, salt):
    return 0.5 * (1 + math.sin(score + salt))


def fake_evaluate(model, qa, tok, exact_match=True, batch_size=1024):
    """train.evaluate's result shape, its numbers fake_em(weight_score, set_salt): in [0, 1], different for
    every set and every weight change, and the same for the same weights and set."""
    value = fake_em(weight_score(model.named_parameters()), set_salt(qa.tokens))
    by_attribute = {a: value for a in train.data.ATTRIBUTES}
    out = {}
    for metric in ("first_token", "first_token_prob") + (("em",) if exact_match else ()):
        out[metric], out[f"{metric}_by_attribute"] = value, dict(by_attribute)
    return out


def qa_tokens(split, seed=0):
    """The token rows (prompt + answer + EOS, right-padded) of a split of the tiny dataset, from data.py."""
    bio, tok = tiny_data(seed)
    return train.data.qa_arrays(bio, bio.splits[split], tok).tokens, tok


def fake_em_of(checkpoint, split, seed=0, rows=None):
    """What fake_evaluate gives a checkpoint on a split (or on its `rows`), from the saved tensors and data.py."""
    tokens, _ = qa_tokens(split, seed)
    tokens = tokens if rows is None else tokens[rows]
    return fake_em(weight_score(parameters(checkpoint).items()), set_salt(torch.as_tensor(tokens)))

# -----------------------------------------------------------------------------------------------
# Kills


class Killed(BaseException):
    """Raised to stop a run as a kill would (not an Exception, so that no handler of the code catches it)."""


def kill_during(monkeypatch, cls, task, step):
    """Make runs of strategy class `cls` die inside training step `step` (1-based) of task `task`, after the
    backward pass and before the optimizer step: the state of step `step` is never saved."""
    original = cls.after_backward

    def after_backward(self, ctx):
        if ctx is not None and ctx.task == task and ctx.step == step - 1:  # ctx.step: steps completed so far
            raise Killed(f"task {task}, step {step}")
        return original(self, ctx)

    monkeypatch.setattr(cls, "after_backward", after_backward)


def kill_at_end(monkeypatch, cls, task):
    """Make runs of `cls` die after task `task`'s training loop has saved its last state, before the task's
    final checkpoint and summary."""
    original = cls.end

    def end(self, ctx):
        if ctx.task == task:
            raise Killed(f"task {task}, end")
        return original(self, ctx)

    monkeypatch.setattr(cls, "end", end)


def instances(monkeypatch, cls):
    """Record, for runs of `cls` and its subclasses, the strategy instance that runs each task ({task:
    instance}, its attributes as the task left them) and, where the task found a saved state, a copy of the
    attributes load_state gave it ({task: attributes})."""
    started, loaded, pending = {}, {}, {}
    original_start, original_load = cls.start, cls.load_state

    def load_state(self, tensors, meta):
        original_load(self, tensors, meta)
        pending[id(self)] = copy.deepcopy(strategy_attributes(self))

    def start(self, ctx):
        started[ctx.task] = self
        if id(self) in pending:
            loaded[ctx.task] = pending.pop(id(self))
        return original_start(self, ctx)

    monkeypatch.setattr(cls, "start", start)
    monkeypatch.setattr(cls, "load_state", load_state)
    return started, loaded


def strategy_attributes(instance):
    """What a strategy instance holds, less its settings."""
    return {k: v for k, v in vars(instance).items() if k != "config"}


def assert_same(a, b, where="state"):
    """Deep equality of strategy attributes: tensors and arrays element for element, dataclasses field by field."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where
