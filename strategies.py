"""Continual-learning strategies: the paper's Table 1, each method a small class.

train.py runs every fine-tuning task through a strategy's hooks, each given a Context (below):

    strategy.load_state(tensors, meta)          # what the previous task's run of this strategy left
    strategy.start(ctx)                         # once, before the optimizer is built: freeze, measure, generate
    for each epoch:  strategy.epoch(ctx, rng)   # the epoch's batches: replay and LAMOL mix old data in
        loss = strategy.loss(ctx, batch, loss)  # every step: EWC's penalty, LAMOL's generation term
        strategy.after_backward(ctx)            # every step, gradients ready: gradient projection edits them
    strategy.end(ctx)                           # once, after the last step (task vectors act here)
    strategy.checkpoint_steps(...)              # extra steps to save the model at (task vectors)
    tensors, meta = strategy.state()            # saved beside the task's checkpoint, read by the next task

What a method remembers of a finished task (EWC's Fisher, replay's buffer) is computed in start() of the
next task, from the model it starts from: that model *is* the end of the finished task, so the result is
the same as computing it at that task's end, and every method can share one cached Task-0 run. start()
depends only on that model and seeded generators, so a resumed run repeats it bit for bit.

Each strategy declares its hyper-parameters as a small dataclass (its `Config`): each field with its help
and what a valid value is (hp), checked when the Config is built (check_settings, which TrainConfig uses
too). train.py turns the fields into flags and puts their values into the run's cache key. Field names carry
the method's name, since all methods share one command line.
"""
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from data import QASet
from model import Transformer


def hp(default, help, check=None, **metadata):
    """A setting: its default, its --help text, and `check` = (valid(value) -> bool, what is expected)."""
    return field(default=default, metadata={"help": help, "check": check, **metadata})


def at_least(low):
    return (lambda v: v >= low), f"{low} or more"


def share(low_open=False):
    return ((lambda v: 0 < v <= 1), "a share in (0, 1]") if low_open else ((lambda v: 0 <= v <= 1), "a share in [0, 1]")


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def numbers(text, kind=int):
    """'1,2,3' as [1, 2, 3] (each a `kind`), or [] if it is not such a list."""
    try:
        return [kind(s) for s in text.split(",")]
    except ValueError:
        return []


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def check_settings(config):
    """Check every field of a settings dataclass (TrainConfig, a strategy's Config) against its declared type
    and its `check`, so that a config built in Python is refused like a bad flag: one line naming the flag.
    An int given for a float is made a float first: 1 and 1.0 are one setting, and so one cache key."""
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if f.type is float and type(value) is int:
            value = float(value)
            setattr(config, f.name, value)
        if f.type in TYPE_NAMES and type(value) is not f.type:
            raise ValueError(f"{flag} {value!r}: expected {TYPE_NAMES[f.type]}")
        if f.type is float and not math.isfinite(value):
            raise ValueError(f"{flag} {value!r}: expected a finite number")
        valid, expected = f.metadata.get("check") or (None, None)
        if valid and not valid(value):
            raise ValueError(f"{flag} {value!r}: expected {expected}")


@dataclass
class Settings:
    """Base of every strategy's Config: checked when built."""

    def __post_init__(self):
        check_settings(self)


@dataclass
class Context:
    """What a strategy's hooks see of the task being trained (train.py builds one per task): the model, the
    training QA of every task so far (each QASet draws its own epochs), the run's seed and batch size, and the two
    things of train.py's a method may ask for: a plain fine-tuning run and an exact-match score."""
    model: torch.nn.Module
    task: int                 # 0 = Task 0, k = Task k
    tok: object               # data.Tokenizer
    seed: int
    batch_size: int
    train: list               # training QA sets of tasks 0..task (index = task): data.QASet
    fit: Callable             # train.fine_tuning_steps(model, qa, seed): endless, one fine-tuning step per item
    evaluate: Callable        # (model, task) -> exact match: Task 0 on its test people, Task k on its pairs
    step: int = 0             # steps trained so far, kept current by train.py's loop
    checkpoints: dict = field(default_factory=dict)  # step -> directory of the models saved, filled before end()

    def join(self, sets):
        """Several QA sets as one, padded to a common width."""
        return QASet.join(sets, self.tok.pad_id)

    def from_pairs(self, prompts, answers):
        """A QA set from token-id lists (prompts ending at 'Answer:', answers ending with EOS)."""
        return QASet.from_pairs(prompts, answers, self.tok.pad_id, next(self.model.parameters()).device)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# -----------------------------------------------------------------------------------------------
# SEQ, and freezing the bottom layers


class Seq:
    """Plain sequential fine-tuning (the paper's SEQ): every parameter learns every task."""
    name = "seq"
    changes_task0 = False  # True if the method trains Task 0 differently (then Task 0 is its own run)
    # How the authors ran the method (train.py --stopping authors): its Task-1 epochs as a multiple of the budget,
    # and whether it stops once the new task's exact match reaches --early-stop (only their freeze runs did).
    authors_epoch_factor = 1
    authors_early_stop = False

    @dataclass
    class Config(Settings):
        pass

    def __init__(self, config=None):
        self.config = config or self.Config()

    def label(self):
        return self.name

    def load_state(self, tensors, meta):
        pass

    def start(self, ctx):
        for p in ctx.model.parameters():
            p.requires_grad_(True)

    def epoch(self, ctx, rng):
        return ctx.train[ctx.task].epoch(ctx.batch_size, rng)

    def loss(self, ctx, batch, loss):
        return loss

    def after_backward(self, ctx):
        pass

    def checkpoint_steps(self, steps_per_epoch, total):
        """Steps at which to save the model, beyond the run's own (task vectors need some)."""
        return set()

    def end(self, ctx):
        pass

    def state(self):
        return {}, {}


def hf_block_name(j):
    return f"layers.{j}."  # how HF GPT-NeoX / Llama checkpoints name block j's parameters


class Freeze(Seq):
    """From Task 1 on, freeze the input embedding and the bottom `freeze_layers` blocks.

    The paper finds the bottom layers carry most of the feature shift that undoes the old task's
    alignment, so holding them fixed keeps more of Task 0. By default blocks are picked by exact index.
    `freeze_by="substring"` reproduces the set the authors' code actually froze: it matched parameter
    names against 'layers.0' .. 'layers.{k-1}' by substring, and 'layers.1' also matches 'layers.10' ..
    'layers.19', so with 12 blocks their "bottom 7" froze blocks 0-6, 10 and 11.
    Frozen parameters are left out of the optimizer, so they stay bit-identical.
    """
    name = "freeze"
    authors_epoch_factor = 2
    authors_early_stop = True

    @dataclass
    class Config(Settings):
        freeze_layers: int = hp(1, "freeze: the embedding plus this many bottom blocks are frozen from Task 1 on",
                                at_least(0))
        freeze_by: str = hp("index", "freeze: 'index' freezes blocks 0..k-1; 'substring' the authors' effective"
                                     " set (block j frozen if 'layers.j.' contains 'layers.i' for an i < k); 'top'"
                                     " the top k blocks and not the embedding (a control for analysis.py)",
                            one_of("index", "substring", "top"))

    freeze_embedding = True

    def frozen_blocks(self, n_blocks):
        k = self.config.freeze_layers
        if self.config.freeze_by == "index":
            return list(range(min(k, n_blocks)))
        if self.config.freeze_by == "top":
            return list(range(max(0, n_blocks - k), n_blocks))
        return [j for j in range(n_blocks) if any(f"layers.{i}" in hf_block_name(j) for i in range(k))]

    def start(self, ctx):
        super().start(ctx)
        if ctx.task == 0:
            return
        model = ctx.model
        frozen = [model.blocks[j] for j in self.frozen_blocks(len(model.blocks))]
        if self.freeze_embedding and self.config.freeze_by != "top":
            frozen.append(model.embed)
            if hasattr(model, "pos_embed"):  # learned positions are part of the input embedding
                frozen.append(model.pos_embed)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def label(self):
        c = self.config
        return f"freeze{c.freeze_layers}" + ("" if c.freeze_by == "index" else f"-{c.freeze_by}")


class AuthorsSeq(Freeze):
    """SEQ as the authors' code ran it: their SEQ method kept a default freeze list ['layers.1'] that no
    Biography config overrides, and from Task 1 on set that group's learning rate to 0. By substring this
    freezes block 1 and blocks 10-19 (with 12 blocks: 1, 10 and 11), and not the embedding. Whether the
    paper's SEQ and replay numbers carry this is unknown; this option measures what it changes."""
    name = "seq-authors"
    freeze_embedding = False
    authors_epoch_factor = 1
    authors_early_stop = False

    @dataclass
    class Config(Settings):
        pass

    @staticmethod
    def frozen_blocks(n_blocks):
        return [j for j in range(n_blocks) if "layers.1" in hf_block_name(j)]

    def label(self):
        return self.name


# -----------------------------------------------------------------------------------------------
# Regularisation: EWC


def answer_nll_grads(model, qa, batch_size, per_sample):
    """Yield (gradients, n) over a QA set: per pair (n = 1) or per batch of the mean answer loss."""
    rows = np.arange(len(qa))
    size = 1 if per_sample else batch_size
    for s in range(0, len(rows), size):
        inputs, targets, mask = qa.batch(rows[s:s + size])
        model.zero_grad(set_to_none=True)
        _, loss = model(inputs, targets, loss_mask=mask)
        loss.backward()
        yield {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, len(inputs)
    model.zero_grad(set_to_none=True)


def diagonal_fisher(model, qa, batch_size=48, estimator="per-sample"):
    """The diagonal of the empirical Fisher information of the answer log-likelihood on `qa`.

    per-sample (correct): F = mean_i (d log p(answer_i) / d theta)^2, one gradient per QA pair.
    authors: F = sum_batches B * (mean-over-batch gradient)^2 / N. Squaring a batch mean drops the
    cross terms' cancellation, so this is (roughly) the per-sample Fisher shrunk by the batch size plus
    the squared mean gradient; the paper's EWC numbers come from it.
    (Per-pair loss = the mean over its answer tokens, the same loss the training step uses.)
    """
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    total = 0
    for grads, n in answer_nll_grads(model, qa, batch_size, per_sample=estimator == "per-sample"):
        for name, g in grads.items():
            fisher[name] += n * g ** 2
        total += n
    return {name: f / total for name, f in fisher.items()}


class EWC(Seq):
    """Elastic weight consolidation (Kirkpatrick et al. 2017, PNAS): a quadratic pull towards the weights
    that solved earlier tasks, each weight held as firmly as the Fisher information says it matters:

        loss + (lambda / 2) sum_i F_i (theta_i - theta*_i)^2

    theta* = the model at the end of the latest task. F = the diagonal Fisher of each finished task's
    training QA at its end, averaged over tasks as the authors do: F <- (F_new + t F_old) / (t + 1).
    The authors' lambda is 5000 with their estimator (`ewc_fisher=authors`), which comes out near the
    per-sample Fisher / batch size (see diagonal_fisher): our default, 100 with the per-sample Fisher, is
    about the same pull at batch 48.
    """
    name = "ewc"

    @dataclass
    class Config(Settings):
        ewc_lambda: float = hp(100.0, "ewc: strength lambda of the penalty (the authors: 5000, with their Fisher)",
                               at_least(0))
        ewc_fisher: str = hp("per-sample", "ewc: Fisher estimator, per-sample (correct) or authors (squared"
                                           " batch-mean gradients, as in the paper's code)",
                             one_of("per-sample", "authors"))

    def __init__(self, config=None):
        super().__init__(config)
        self.fisher, self.anchor, self.tasks_seen = {}, {}, 0

    def label(self):
        c = self.config
        return f"ewc{c.ewc_lambda:g}" + ("" if c.ewc_fisher == "per-sample" else "-authors")

    def load_state(self, tensors, meta):
        self.fisher = {k[len("fisher."):]: v for k, v in tensors.items() if k.startswith("fisher.")}
        self.tasks_seen = meta["tasks_seen"]

    def start(self, ctx):
        super().start(ctx)
        if ctx.task == 0:
            return
        finished = ctx.train[ctx.task - 1]  # the model we start from is that task's end
        new = diagonal_fisher(ctx.model, finished, ctx.batch_size, self.config.ewc_fisher)
        t = self.tasks_seen
        self.fisher = {n: (f + t * self.fisher[n]) / (t + 1) if t else f for n, f in new.items()}
        self.tasks_seen = t + 1
        self.anchor = snapshot(ctx.model)

    def penalty(self, model):
        total = 0.0
        for name, p in model.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
        return 0.5 * self.config.ewc_lambda * total

    def loss(self, ctx, batch, loss):
        return loss + self.penalty(ctx.model) if self.anchor else loss

    def state(self):
        return {f"fisher.{n}": f for n, f in self.fisher.items()}, {"tasks_seen": self.tasks_seen}


# -----------------------------------------------------------------------------------------------
# Rehearsal: replay, LAMOL's generated replay, and the multi-task upper bound


class Replay(Seq):
    """Experience replay: after each task, a random `replay_fraction` of its training pairs joins a pooled
    buffer; every batch of a later task is half new pairs, half pairs drawn from the buffer (24 + 24 at
    batch 48, as in the authors' code), so an epoch of the new task takes twice the steps.
    Ours draws each task's share without replacement (the authors drew with replacement)."""
    name = "replay"

    @dataclass
    class Config(Settings):
        replay_fraction: float = hp(0.2, "replay: share of each finished task's training pairs kept (the paper:"
                                         " 0.1 and 0.2)", share(low_open=True))
        replay_hidden_freeze: str = hp("no", "replay: 'yes' also freezes what the authors' SEQ froze ('layers.1':"
                                             " seq-authors), as their replay runs were their SEQ runs with replay on",
                                       one_of("no", "yes"), keyed_when_changed=True)

    def __init__(self, config=None):
        super().__init__(config)
        self.buffer = np.zeros((0, 2), dtype=np.int64)  # rows of (task, pair index)
        self.pool = None  # the new task's pairs and the buffer's, as one QA set (start)

    def label(self):
        return f"replay{self.config.replay_fraction:g}" + ("-hidden-freeze" if self.config.replay_hidden_freeze == "yes"
                                                           else "")

    def load_state(self, tensors, meta):
        self.buffer = tensors["buffer"].cpu().numpy()  # handed over on the training device

    def start(self, ctx):
        super().start(ctx)
        if ctx.task == 0:
            return
        if self.config.replay_hidden_freeze == "yes":
            for j in AuthorsSeq.frozen_blocks(len(ctx.model.blocks)):
                ctx.model.blocks[j].requires_grad_(False)
        finished = ctx.task - 1
        n = len(ctx.train[finished])
        rng = np.random.default_rng([ctx.seed, 21, finished])
        kept = np.sort(rng.choice(n, round(self.config.replay_fraction * n), replace=False))
        self.buffer = np.concatenate([self.buffer, np.stack([np.full_like(kept, finished), kept], 1)])
        # Old and new pairs as one set, so a mixed batch is a plain index list into it.
        self.pool = ctx.join([ctx.train[ctx.task]] + [ctx.train[t].subset(self.buffer[self.buffer[:, 0] == t, 1])
                                                      for t in range(ctx.task)])

    def epoch(self, ctx, rng):
        if ctx.task == 0:
            return super().epoch(ctx, rng)
        n_new, n_old, half = len(ctx.train[ctx.task]), len(self.buffer), ctx.batch_size // 2
        order, batches = rng.permutation(n_new), []
        for s in range(0, n_new, half):
            new = order[s:s + half]
            old = n_new + rng.choice(n_old, half, replace=n_old < half)
            batches.append(self.pool.batch(np.concatenate([new, old])))
        return batches

    def state(self):
        return {"buffer": torch.as_tensor(self.buffer)}, {}


class MultiTask(Seq):
    """Our upper bound (the authors have none): each new task trains on its own pairs and those of every
    earlier task at once, shuffled together, starting from the shared Task-0 model."""
    name = "multitask"

    def __init__(self, config=None):
        super().__init__(config)
        self.pool = None  # every pair of every task so far, as one QA set (start)

    def start(self, ctx):
        super().start(ctx)
        self.pool = ctx.join(ctx.train[:ctx.task + 1])

    def epoch(self, ctx, rng):
        return self.pool.epoch(ctx.batch_size, rng)


class MultiTaskControl(Seq):
    """The control of multi-task: Task 0's training pairs alone, in epochs as long as multi-task's (every task so
    far), so that it trains Task 0 for as many steps as multi-task does. Extra Task-0 epochs alone move held-out
    Task-0 exact match too; the two side by side tell what joint training itself keeps."""
    name = "multitask-control"

    def epoch(self, ctx, rng):
        n_old, n_all = len(ctx.train[0]), sum(len(qa) for qa in ctx.train[:ctx.task + 1])
        order = np.concatenate([rng.permutation(n_old) for _ in range(math.ceil(n_all / n_old))])[:n_all]
        return [ctx.train[0].batch(order[s:s + ctx.batch_size]) for s in range(0, n_all, ctx.batch_size)]


class Lamol(Seq):
    """LAMOL (Sun et al. 2020, ICLR): the model also learns to *generate* its training data, then replays
    what it generates. Every batch of every task, Task 0 included, adds 0.25 x the language-model loss of
    [gen] question answer [EOS]. Before each new task, the current model samples pseudo pairs of the old
    tasks from the gen token alone (top-k 20), 20% of the new task's size split over the old tasks, keeps
    those with 'Answer:' exactly once and an EOS, and they join the new task's training set.

    lamol_token=shared (LAMOL_g): one generation token for every task; the authors used EOS, and so do we.
    lamol_token=task (LAMOL_t): a marker per task, as in the original LAMOL_t (the authors' two configs both
    used EOS and differed only in epochs). The original adds a new token per task; our word-level
    vocabulary has none spare, and new tokens would change every token id and so every cached result, so
    task k's marker is two tokens that never start a training sequence: EOS, then the number k + 1
    (the vocabulary has ' 1' .. ' 28' from the birth days, and no ' 0').
    """
    name = "lamol"
    changes_task0 = True

    @dataclass
    class Config(Settings):
        lamol_token: str = hp("shared", "lamol: generation marker, shared (LAMOL_g: EOS for every task) or task"
                                        " (LAMOL_t: EOS then ' k+1' for task k)", one_of("shared", "task"))
        lamol_gen_weight: float = hp(0.25, "lamol: weight of the generation loss", at_least(0))
        lamol_sample_share: float = hp(0.2, "lamol: pseudo samples per new task, as a share of its size",
                                       ((lambda v: 0 <= v <= 10), "a number in [0, 10]"))
        lamol_top_k: int = hp(20, "lamol: top-k of the sampling", at_least(1))

    def __init__(self, config=None):
        super().__init__(config)
        self.pool, self.quality = None, {}  # the task's pairs and the pseudo ones; how good those were, by task
        self.markers = None  # (N, P): the generation marker of each pool row's own task

    def label(self):
        c = self.config
        return f"lamol-{'g' if c.lamol_token == 'shared' else 't'}"

    def gen_prefix(self, tok, task):
        """The tokens that ask the model to write a sample of `task`."""
        return [tok.eos_id] + (tok.encode(f" {task + 1}") if self.config.lamol_token == "task" else [])

    def start(self, ctx):
        super().start(ctx)
        self.quality, sets, tasks = {}, [ctx.train[ctx.task]], [ctx.task]
        n_per_task = round(self.config.lamol_sample_share * len(ctx.train[ctx.task]) / max(1, ctx.task))
        for old in range(ctx.task):
            prompts, answers, self.quality[old] = self.pseudo_samples(ctx, old, n_per_task)
            print(f"  lamol: pseudo samples of task {old}: {self.quality[old]}")
            if prompts:
                sets.append(ctx.from_pairs(prompts, answers))
                tasks.append(old)
        self.pool = ctx.join(sets) if len(sets) > 1 else sets[0]
        # A pseudo sample of task j is learnt behind task j's marker, not the current task's (LAMOL_t)
        self.markers = torch.cat([torch.tensor([self.gen_prefix(ctx.tok, t)] * len(qa), device=qa.tokens.device)
                                  for t, qa in zip(tasks, sets)])

    @torch.no_grad()
    def pseudo_samples(self, ctx, task, n):
        """n sampled [gen] question answer [EOS] sequences, parsed into QA pairs, and their quality."""
        tok = ctx.tok
        generator = torch.Generator(device=next(ctx.model.parameters()).device).manual_seed(ctx.seed * 1000 + task)
        was_training = ctx.model.training
        ctx.model.eval()
        max_len = ctx.train[task].tokens.shape[1]
        samples = []
        for s in range(0, n, 512):
            samples += ctx.model.generate([self.gen_prefix(tok, task)] * min(512, n - s), max_len, eos_id=tok.eos_id,
                                          pad_id=tok.pad_id, top_k=self.config.lamol_top_k, generator=generator)
        ctx.model.train(was_training)
        answer = tok.encode("\nAnswer:")  # where every QA prompt ends
        real = set(zip(map(tuple, ctx.train[task].prompts), map(tuple, ctx.train[task].answers)))
        real_prompts = {p for p, _ in real}
        prompts, answers, rejected = [], [], {"no 'Answer:'": 0, "'Answer:' twice": 0, "no EOS": 0, "no answer": 0}
        for s in samples:
            cuts = [i for i in range(len(s) - 1) if s[i:i + len(answer)] == answer]
            reason = ("no 'Answer:'" if not cuts else "'Answer:' twice" if len(cuts) > 1 else
                      "no EOS" if s[-1] != tok.eos_id else "no answer" if cuts[0] + len(answer) >= len(s) - 1 else None)
            if reason:
                rejected[reason] += 1
                continue
            prompts.append(s[:cuts[0] + len(answer)])
            answers.append(s[cuts[0] + len(answer):])
        pairs = list(zip(map(tuple, prompts), map(tuple, answers)))
        quality = {"sampled": len(samples), "rejected": rejected, "well_formed": len(pairs), "distinct": len(set(pairs)),
                   "question_real": sum(p in real_prompts for p, _ in pairs),
                   "question_and_answer_real": sum(pair in real for pair in pairs)}
        return prompts, answers, quality

    def epoch(self, ctx, rng):
        """The pool's batches in a seeded order (as QASet.epoch draws it), each with its rows' markers."""
        order = torch.as_tensor(rng.permutation(len(self.pool)), device=self.markers.device)
        return [(*self.pool.batch(rows), self.markers[rows]) for rows in order.split(ctx.batch_size)]

    def loss(self, ctx, batch, loss):
        """Add the generation loss: the same pairs, as [gen] prompt answer EOS, every real token a target."""
        inputs, targets, _, prefix = batch                                      # prefix (B, P): each row's marker
        rows = torch.cat([inputs[:, :1], targets], dim=1)                        # (B, T) prompt answer EOS pad
        seq = torch.cat([prefix, rows], dim=1)                                   # (B, P + T)
        targets = seq[:, 1:]
        is_sample = (targets != ctx.tok.pad_id) & (torch.arange(targets.shape[1], device=seq.device) >= len(prefix[0]) - 1)
        _, gen_loss = ctx.model(seq[:, :-1], targets, loss_mask=is_sample)  # the marker itself is given, not learnt
        return loss + self.config.lamol_gen_weight * gen_loss

    def state(self):
        return {}, {"pseudo_sample_quality": self.quality}


# -----------------------------------------------------------------------------------------------
# Editing the update: gradient projection, and task-vector arithmetic


class GradientProjection(Seq):
    """The authors' gradient projection: before each new task, estimate the direction that undoes the old
    task's alignment, then keep every gradient from moving along it.

    Direction: `gp_runs` preliminary runs of the new task from the start model (different shuffles);
    d = the mean weight change between steps `gp_window` (the authors: 100-150 of 10 runs, the start of
    the collapse); the model is restored. Each step, for each weight matrix, row by row:
      authors (their 'Method 1 (best)'):  g_row -= d_row * cos(g_row, d_row)
      exact:                               g_row -= d_row (g_row . d_row) / |d_row|^2
    The authors' rule removes the component along d_row only when |d_row| = |g_row|. For 1-D parameters
    (norms, biases) the whole vector is one row: authors g -= d (g . d) / |d|, exact as above.
    """
    name = "gradproj"

    @dataclass
    class Config(Settings):
        gp_runs: int = hp(10, "gradproj: preliminary runs averaged into the direction", at_least(1))
        gp_window: str = hp("10,50", "gradproj: first,last step of the update window (the authors: 100,150 of"
                                     " 62,500 steps; ours: where the cpu preset's collapse happens)")
        gp_rule: str = hp("authors", "gradproj: authors (g -= d cos(g, d)) or exact (remove g's component on d)",
                          one_of("authors", "exact"))

        def __post_init__(self):
            super().__post_init__()
            window = numbers(self.gp_window)
            if len(window) != 2 or not 0 <= window[0] < window[1]:
                raise ValueError(f"--gp-window {self.gp_window!r}: expected two steps like 10,50")

    def __init__(self, config=None):
        super().__init__(config)
        self.direction = {}

    def label(self):
        return "gradproj" + ("" if self.config.gp_rule == "authors" else "-exact")

    def start(self, ctx):
        super().start(ctx)
        if ctx.task == 0:
            return
        lo, hi = (int(s) for s in self.config.gp_window.split(","))
        total = {n: torch.zeros_like(p) for n, p in ctx.model.named_parameters()}
        for run in range(self.config.gp_runs):
            trial = copy.deepcopy(ctx.model)  # the model itself stays where the task starts
            before = snapshot(trial) if lo == 0 else None
            for step, _ in enumerate(ctx.fit(trial, ctx.train[ctx.task], [ctx.seed, 31, ctx.task, run]), start=1):
                if step == lo:
                    before = snapshot(trial)
                if step == hi:
                    break
            for n, p in trial.named_parameters():
                total[n] += (p.detach() - before[n]) / self.config.gp_runs
        if torch.distributed.is_initialized():
            # Under torchrun every rank ran the trials alike, but a GPU's kernels need not round alike run to
            # run, and the projection edits gradients after DDP has averaged them: take rank 0's direction,
            # or the ranks' weights would drift apart.
            for d in total.values():
                torch.distributed.broadcast(d, src=0)
        self.direction = total

    @staticmethod
    def project(g, d, rule):
        """g with its rows' components along d's rows taken out (a 1-D tensor is one row)."""
        g2, d2 = g.reshape(-1, g.shape[-1]), d.reshape(-1, d.shape[-1])        # (rows, cols); 1-D: one row
        dot = (g2 * d2).sum(-1, keepdim=True)                                    # (rows, 1)
        d_norm = d2.norm(dim=-1, keepdim=True)
        if rule == "exact":
            coef = dot / d_norm.pow(2).clamp_min(1e-30)
        elif g.dim() > 1:
            coef = dot / (g2.norm(dim=-1, keepdim=True) * d_norm).clamp_min(1e-30)  # cos(g_row, d_row)
        else:
            coef = dot / d_norm.clamp_min(1e-30)
        return (g2 - coef * d2).reshape(g.shape)

    def after_backward(self, ctx):
        if not self.direction:
            return
        for name, p in ctx.model.named_parameters():
            if p.grad is not None:
                p.grad.copy_(self.project(p.grad, self.direction[name], self.config.gp_rule))


def task_vector_point(theta_e, theta_E, theta_0, alpha):
    """theta_T1[e] - alpha (theta_T1[E] - theta_T0): take a scaled Task-1 vector back out of a Task-1 model."""
    return {n: theta_e[n] - alpha * (theta_E[n] - theta_0[n]) for n in theta_e}


class TaskVector(Seq):
    """Task-vector arithmetic, the authors' construction (after Ilharco et al. 2023, ICLR, 'Editing models
    with task arithmetic'): train the new task as SEQ, saving the model every `tv_every` epochs, then
    search theta = theta_T1[e] - alpha (theta_T1[E] - theta_T0) over saved epochs e, E and alpha, with
    theta_T0 the model the task started from. The chosen point, kept as the task's result, is the best
    Task-0 exact match among points whose new-task exact match is >= `tv_min_new`; the whole grid goes to
    task-vector.json. (The authors swept e in 0..24, E in 12..18, alpha 0.16..1.0; best e=24, E=18,
    alpha=0.22: Task 1 95.77, Task 0 30.75.)"""
    name = "taskvector"

    @dataclass
    class Config(Settings):
        tv_every: int = hp(5, "taskvector: save the model every this many epochs", at_least(1))
        tv_alphas: str = hp("0.1,0.2,0.3,0.5,0.7,1", "taskvector: the alphas to try")
        tv_min_new: float = hp(0.95, "taskvector: the chosen point must keep the new task's exact match >= this",
                               share())
        # The grid's saved models: in the cache key only when changed from these defaults (runs.stage_dir).
        tv_last: int = hp(3, "taskvector: models e to move back: the last this many saved (which know the new task)",
                          at_least(1), keyed_when_changed=True)
        tv_stride: int = hp(2, "taskvector: models E whose vector is taken out: every this many saved, from the first",
                            at_least(1), keyed_when_changed=True)

        def __post_init__(self):
            super().__post_init__()
            alphas = numbers(self.tv_alphas, float)
            if not alphas or not all(math.isfinite(a) and a >= 0 for a in alphas):
                raise ValueError(f"--tv-alphas {self.tv_alphas!r}: expected numbers >= 0 like 0.1,0.5,1")

    def __init__(self, config=None):
        super().__init__(config)
        self.grid, self.best = [], None
        self.theta_0 = {}  # the model the task started from (start)

    def label(self):
        return self.name

    def start(self, ctx):
        super().start(ctx)
        self.theta_0 = snapshot(ctx.model)

    def checkpoint_steps(self, steps_per_epoch, total):
        return set(range(steps_per_epoch * self.config.tv_every, total + 1, steps_per_epoch * self.config.tv_every))

    def end(self, ctx):
        if ctx.task == 0:
            return
        device = next(ctx.model.parameters()).device
        weights = {step: snapshot(Transformer.from_pretrained(path).to(device))
                   for step, path in ctx.checkpoints.items() if step > 0}
        weights[ctx.step] = snapshot(ctx.model)  # the end of training, which may fall between saves
        steps = sorted(weights)
        probe = copy.deepcopy(ctx.model)

        def move(model, e, E, alpha):
            point = task_vector_point(weights[e], weights[E], self.theta_0, alpha)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(point[n])

        self.grid = []
        for e in steps[-self.config.tv_last:]:  # late models, which know the new task; vectors from the whole run
            for E in steps[::self.config.tv_stride]:
                for alpha in [float(a) for a in self.config.tv_alphas.split(",")]:
                    move(probe, e, E, alpha)
                    self.grid.append({"e_step": e, "E_step": E, "alpha": alpha, "task0_em": ctx.evaluate(probe, 0),
                                      "new_em": ctx.evaluate(probe, ctx.task)})
        if torch.distributed.is_initialized():
            # Every rank scored the grid, but evaluations need not round alike on every device: take rank 0's
            # scores (as gradient projection takes rank 0's direction), so that every rank makes one choice.
            scores = torch.tensor([[p["task0_em"], p["new_em"]] for p in self.grid], dtype=torch.float64, device=device)
            torch.distributed.broadcast(scores, src=0)
            for point, (task0_em, new_em) in zip(self.grid, scores.tolist()):
                point["task0_em"], point["new_em"] = task0_em, new_em
        self.best = None
        for point in self.grid:
            if point["new_em"] >= self.config.tv_min_new and (self.best is None or point["task0_em"] > self.best["task0_em"]):
                self.best = point
        if self.best is not None:
            move(ctx.model, self.best["e_step"], self.best["E_step"], self.best["alpha"])

    def state(self):
        return {}, {"grid": self.grid, "best": self.best}


STRATEGIES = {s.name: s for s in (Seq, AuthorsSeq, Freeze, EWC, Replay, MultiTask, MultiTaskControl, Lamol,
                                   GradientProjection, TaskVector)}


def config_fields():
    """Every strategy's hyper-parameters, by name: (strategy name, dataclass field)."""
    return {f.name: (name, f) for name, cls in STRATEGIES.items() for f in cls.Config.__dataclass_fields__.values()}


def check_strategy_args(settings, n_layer, n_tasks):
    """Every strategy's settings in `settings`, as the table and the sweeps use them all, for a model of n_layer
    blocks and n_tasks new tasks; a ValueError naming the flag if one is wrong."""
    if unknown := sorted(set(settings) - set(config_fields())):
        raise ValueError(f"strategy settings {unknown}: expected some of {', '.join(config_fields())}")
    for name in STRATEGIES:
        make_strategy(name, settings)
    if not 0 <= settings.get("freeze_layers", 0) <= n_layer:
        raise ValueError(f"--freeze-layers {settings['freeze_layers']}: expected 0..{n_layer} (the model has {n_layer}"
                         f" blocks)")
    if n_tasks > 27 and settings.get("lamol_token") == "task":
        raise ValueError(f"--lamol-token task: markers ' 1' .. ' 28' cover 28 tasks, not {n_tasks + 1}")


def make_strategy(name, settings=None):
    """The strategy `name`, configured from `settings` (a dict that may hold other strategies' fields too)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    fields = cls.Config.__dataclass_fields__
    return cls(cls.Config(**{k: v for k, v in (settings or {}).items() if k in fields}))
