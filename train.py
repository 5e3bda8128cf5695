"""Continual fine-tuning on the Biography dataset, and the recovery probe that shows forgetting is spurious.

    python train.py                                   # cpu preset: pretrain -> Task 0 -> Task 1 (SEQ) -> recovery
    python train.py --stage task1 --strategy freeze   # same, freezing the embedding + bottom layers in Task 1
    python train.py --stage headline                  # SEQ + recovery and freeze for seeds 0,1,2: mean +- std
    python train.py --stage freeze-sweep              # Task 1 with k = 0..4 bottom blocks frozen, and SEQ
    python train.py --stage table                     # every method of the paper's Table 1 (strategies.py)

Stages, in order: pretrain (biographies, from scratch) -> task0 (QA of half the people; tested on the
other half: knowledge *extraction*) -> task1..taskK (QA of new people) -> recover (the probe: the
pretrained, Task-0 and saved Task-1 checkpoints, each fine-tuned briefly on the Task-0 training QA and
tested on the Task-0 test people). Every fine-tuning stage uses one learning rate, as the paper does.
Asking for a stage runs every missing earlier one. Each stage lives in runs/<preset>/<stage>-<hash>/,
where the hash covers every setting that shaped it, so a change of settings makes a new directory and
never reuses an old result. A stage is complete once its summary.json exists.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts threads: busy-waiting stalls a 2-core box

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import functools
import glob
import hashlib
import itertools
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import data
from model import ModelConfig, Transformer, atomic_write, read_safetensors, write_safetensors
from strategies import STRATEGIES, Context, Seq, config_fields, make_strategy


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str = arg("cpu", "named settings: tiny (CI, seconds), cpu (a laptop, minutes), paper (GPUs)")
    seed: int = arg(0, "seed of the data, the initial weights and the batch order")
    # data
    people: int = arg(500, "pretraining population P; Task 0 trains on the first half, tests on the second")
    task_size: int = arg(200, "new people in each of Tasks 1..K")
    n_tasks: int = arg(1, "K, the number of new-people tasks after Task 0")
    name_pools: str = arg("25,25,35", "how many first,middle,last names the population draws from (scaled so"
                                      " that every name is shared by ~20+ people; the paper: 400,400,1000)")
    # model: GPT-NeoX shape (rotary on a quarter of each head, parallel residual, untied embeddings)
    n_layer: int = arg(4, "transformer blocks")
    d_model: int = arg(128, "residual stream width")
    n_head: int = arg(4, "attention heads")
    d_ff: int = arg(512, "MLP width")
    context: int = arg(128, "tokens per pretraining sequence (and the model's max length)")
    # pretraining
    pretrain_epochs: int = arg(16, "passes over the biographies")
    pretrain_batch: int = arg(16, "sequences per pretraining step")
    pretrain_lr: float = arg(5e-3, "peak pretraining learning rate (AdamW)")
    pretrain_min_lr: float = arg(5e-4, "cosine floor of the pretraining learning rate")
    pretrain_warmup: int = arg(100, "linear warm-up steps")
    pretrain_wd: float = arg(0.1, "pretraining weight decay")
    # fine-tuning on QA (loss on the answer and EOS only)
    ft_batch: int = arg(48, "QA pairs per fine-tuning step")
    ft_wd: float = arg(0.01, "fine-tuning weight decay")
    ft_lr: float = arg(1e-4, "learning rate of every fine-tuning stage: Task 0, Tasks 1..K and the recovery"
                             " probe (constant; the paper uses one lr, 5e-6, for all of them)")
    task0_epochs: int = arg(7, "passes over the Task-0 QA pairs (the paper: 10; ours peaks at 7, then overfits)")
    task_epochs: int = arg(60, "passes over each new task's QA pairs, unless --early-stop ends it sooner"
                               " (the paper: 25, and 50 for its freeze runs)")
    # continual-learning strategy (strategies.py); its own hyper-parameters are flags too (see --help)
    strategy: str = arg("seq", f"one of {', '.join(STRATEGIES)}")
    strategy_args: dict = field(default_factory=dict, metadata={"help": "strategy hyper-parameters by field name"})
    early_stop: float = arg(0.99, "stop a task once its exact match reaches this (0 = never); the paper's table"
                                  " stops at 0.99, its dense curves train to the end")
    # recovery probe: fine-tune a copy on the QA of all Task-0 training people, test on the Task-0 test people
    recover_fraction: float = arg(0.1, "recovery-probe length as a share of the Task-1 run's steps (the paper:"
                                       " 1 epoch of Task-0 QA, 6,250 steps, against Task 1's 62,500)")
    checkpoint_steps: str = arg("10,20,50,100,150,200", "Task-1 steps to save and probe (the end is always saved;"
                                " step 0 is the Task-0 model, probed anyway); the paper probed every 5 steps to"
                                " 200: --checkpoint-steps $(seq -s, 5 5 200)")
    # evaluation
    eval_subset: int = arg(600, "QA pairs per set for the frequent evaluations (the end of a task, and the"
                                " current task under --early-stop, use all; the memorisation probe uses as"
                                " many biography sentences)")
    dense_every: int = arg(5, "evaluate Task 0 every this many steps early in a new task ...")
    dense_until: int = arg(200, "... up to this step ...")
    sparse_every: int = arg(50, "... and every this many steps after; the new task itself (all its pairs, for"
                                " early stopping) at these steps throughout")
    state_every: int = arg(50, "save a resumable training state every this many steps")
    runs: str = arg("runs", "directory where stages are cached")

    def __post_init__(self):
        """Normalise, so that equal settings give one cache key however they were given (flags or Python)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))  # 1 and 1.0 are one setting
        try:
            steps = sorted({int(s) for s in self.checkpoint_steps.split(",")})
            assert steps[0] >= 0
        except (ValueError, AssertionError):
            raise ValueError(f"--checkpoint-steps {self.checkpoint_steps!r}: expected step numbers like 0,10,20") from None
        self.checkpoint_steps = ",".join(map(str, steps))


# Per preset, what differs from the cpu defaults above. The data sizes come from data.PRESETS under
# the preset's own name, or under the name given as `data`.
PRESETS = {
    "tiny": dict(n_layer=2, d_model=32, n_head=2, d_ff=64, context=64,
                 pretrain_epochs=2, pretrain_batch=8, pretrain_warmup=2, ft_batch=16, task0_epochs=1,
                 task_epochs=2, recover_fraction=0.5, checkpoint_steps="0,2,4", eval_subset=48, dense_every=2,
                 dense_until=6, sparse_every=4, state_every=3,
                 strategy_args=dict(gp_window="1,3", gp_runs=2, tv_every=1)),
    "cpu": dict(),
    # A thin model twice as deep as cpu's, for the freeze sweep over k = 0..8 (paper Fig. 7a) in <= 30 min:
    # 3/5 of the cpu population, and one fine-tuning lr of 2e-4 for all its stages (at 1e-4 a thin deep
    # model had not learnt Task 1 to 0.99 in 60 epochs; README, "Depth").
    "deep": dict(n_layer=8, d_model=96, n_head=4, d_ff=384, pretrain_epochs=20, ft_lr=2e-4, dense_until=0),
    "paper": dict(n_layer=12, d_model=768, n_head=12, d_ff=3072,
                  context=512, pretrain_epochs=80, pretrain_batch=96, pretrain_lr=1e-3, pretrain_min_lr=1e-4,
                  pretrain_warmup=1000, ft_wd=0.01, ft_lr=5e-6, task0_epochs=10, task_epochs=25,
                  early_stop=0.0, eval_subset=3000, sparse_every=1000, state_every=1000,
                  strategy_args=dict(freeze_layers=7, gp_window="100,150")),
}
# Settings that must be at least 1.
POSITIVE = ("people", "task_size", "n_tasks", "n_layer", "d_model", "n_head", "d_ff", "context", "pretrain_epochs",
            "pretrain_batch", "ft_batch", "ft_lr", "task0_epochs", "task_epochs", "recover_fraction", "eval_subset",
            "dense_every", "sparse_every", "state_every")
# Which settings shape each stage: a stage's cache key hashes these plus the key of the stage before.
DATA_MODEL = ("seed", "people", "task_size", "n_tasks", "name_pools", "n_layer", "d_model", "n_head", "d_ff", "context")
STAGE_FIELDS = {
    "pretrain": DATA_MODEL + ("pretrain_epochs", "pretrain_batch", "pretrain_lr", "pretrain_min_lr",
                              "pretrain_warmup", "pretrain_wd", "eval_subset"),
    "task0": ("ft_batch", "ft_wd", "ft_lr", "task0_epochs"),
    "task": ("task_epochs", "early_stop", "checkpoint_steps", "dense_every", "dense_until", "sparse_every"),
    "recover": ("recover_fraction",),
}


class UserError(Exception):
    """A mistake in the command line or in files given to us: reported in one line, no traceback."""


# -----------------------------------------------------------------------------------------------
# Data on the device


@dataclass
class QASet:
    """One set of QA pairs as tensors, plus the pieces needed for greedy exact match."""
    tokens: torch.Tensor      # (N, T) prompt + answer + EOS, right-padded
    loss_mask: torch.Tensor   # (N, T) True on the answer and EOS tokens
    answer_first: torch.Tensor  # (N,) the answer's first token
    attribute: torch.Tensor   # (N,) index into data.ATTRIBUTES
    prompts: list             # N token-id lists, ending at "Answer:"
    answers: list             # N token-id lists: answer + EOS

    @classmethod
    def from_arrays(cls, qa: data.QAArrays, device):
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        prompts = [row[:p].tolist() for row, p in zip(qa.tokens, qa.prompt_len)]
        answers = [row[p:n].tolist() for row, p, n in zip(qa.tokens, qa.prompt_len, qa.length)]
        return cls(t(qa.tokens), t(qa.loss_mask), t(qa.answer_first_id), t(qa.attribute), prompts, answers)

    def __len__(self):
        return len(self.prompts)

    def subset(self, idx):
        idx_t = torch.as_tensor(idx, device=self.tokens.device)
        return QASet(self.tokens[idx_t], self.loss_mask[idx_t], self.answer_first[idx_t], self.attribute[idx_t],
                     [self.prompts[i] for i in idx], [self.answers[i] for i in idx])

    def batch(self, idx):
        """The rows idx as one training batch (inputs, targets, loss_mask), trimmed of padding columns."""
        idx = torch.as_tensor(idx, device=self.tokens.device)
        width = int(self.loss_mask[idx].any(0).nonzero().max()) + 1
        tokens, mask = self.tokens[idx, :width], self.loss_mask[idx, :width]
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]                  # (B, W-1) each

    @staticmethod
    def join(sets, pad_id):
        """Several sets as one, right-padded to the widest."""
        width = max(qa.tokens.shape[1] for qa in sets)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
        return QASet(torch.cat([pad(qa.tokens, pad_id) for qa in sets]), torch.cat([pad(qa.loss_mask, False) for qa in sets]),
                     torch.cat([qa.answer_first for qa in sets]), torch.cat([qa.attribute for qa in sets]),
                     [p for qa in sets for p in qa.prompts], [a for qa in sets for a in qa.answers])

    @classmethod
    def from_pairs(cls, prompts, answers, pad_id, device):
        """QA pairs given as token lists (prompt ending at 'Answer:', answer ending with EOS), e.g. generated
        ones; their attribute is unknown and set to 0."""
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            tokens[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, len(p):len(p) + len(a)] = True
        first = torch.tensor([a[0] for a in answers])
        return cls(tokens.to(device), mask.to(device), first.to(device), torch.zeros_like(first).to(device),
                   [list(p) for p in prompts], [list(a) for a in answers])


def qa_batches(qa: QASet, batch_size, rng):
    """One epoch of (inputs, targets, loss_mask) batches in a seeded random order."""
    order = rng.permutation(len(qa))
    return [qa.batch(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]


def pretrain_batches(entries, cfg, tok, rng, device):
    blocks = torch.as_tensor(data.pack_pretraining(entries, cfg.context, tok.eos_id, rng), device=device)
    for start in range(0, len(blocks), cfg.pretrain_batch):
        rows = blocks[start:start + cfg.pretrain_batch]
        yield rows[:, :-1], rows[:, 1:], None

# -----------------------------------------------------------------------------------------------
# Evaluation and continual-learning metrics


@torch.no_grad()
def evaluate(model, qa: QASet, tok, exact_match=True, batch_size=1024):
    """First-token accuracy at the answer position, hard (argmax) and soft (probability), and exact match
    (greedy decoding must give the answer, then EOS); each per attribute, then averaged over attributes.

    Exact match needs no decoding loop: greedy decoding writes the answer exactly when, fed the answer's
    own prefix, the model's argmax is the next answer token at every answer position, EOS included. So one
    causal pass over the set's token rows (prompt + answer + EOS, qa.tokens), read at those positions,
    decides it; right padding after a row cannot change what its earlier positions see. Without
    exact_match the pass covers qa.prompts, which a caller may have shortened (the memorisation probe),
    and reads the first answer position only.
    """
    was_training = model.training
    model.eval()
    per_sample = {"first_token": [], "first_token_prob": []} | ({"em": []} if exact_match else {})
    for s in range(0, len(qa), batch_size):
        rows = slice(s, s + batch_size)
        if exact_match:  # the set's own rows: prompt + answer + EOS, right-padded
            inputs, targets, read = qa.batch(range(s, min(s + batch_size, len(qa))))      # (B, W-1) each
        else:  # the prompts as given (a caller may have shortened them) and the answer's first token
            pairs = QASet.from_pairs(qa.prompts[rows], [a[:1] for a in qa.answers[rows]], tok.pad_id, qa.tokens.device)
            inputs, targets, read = pairs.tokens[:, :-1], pairs.tokens[:, 1:], pairs.loss_mask[:, 1:]
        logits, _ = model(inputs, loss_mask=read)                  # (N, V): the answer positions, row by row
        greedy = logits.argmax(-1)                                  # (N,) what greedy decoding would write
        n = read.sum(1)                                             # (B,) answer tokens of each row
        starts = n.cumsum(0) - n                                    # (B,) each row's first answer position
        first = qa.answer_first[rows]
        per_sample["first_token"].append((greedy[starts] == first).float().cpu())
        per_sample["first_token_prob"].append(logits[starts].float().softmax(-1).gather(1, first[:, None])[:, 0].cpu())
        if exact_match:
            wrong = (greedy != targets[read]).float()              # (N,)
            row_of = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
            per_sample["em"].append((torch.zeros(len(n), device=n.device).index_add_(0, row_of, wrong) == 0).float().cpu())
    model.train(was_training)
    attribute = qa.attribute.cpu()
    out = {}
    for metric, values in per_sample.items():
        values = torch.cat(values)
        by_attr = {a: values[attribute == i].mean().item() for i, a in enumerate(data.ATTRIBUTES) if (attribute == i).any()}
        out[metric] = sum(by_attr.values()) / len(by_attr)
        out[f"{metric}_by_attribute"] = by_attr
    return out


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


# -----------------------------------------------------------------------------------------------
# Files: every write is atomic (model.atomic_write: temporary file, then rename), so an interrupted run
# loses nothing.


def write_text(path, text):
    if not DIST.main:  # under torchrun, rank 0 alone writes files
        return
    with atomic_write(path) as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_checkpoint(model, tok, path, info, strategy=None):
    """An HF checkpoint directory plus tokenizer.json and training_state.json, appearing all at once; with
    a strategy, also what it carries to the next task (strategy.safetensors + strategy.json)."""
    if not DIST.main:
        return
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    write_json(os.path.join(tmp, "training_state.json"), info)
    if strategy is not None:
        tensors, meta = strategy.state()
        write_safetensors(os.path.join(tmp, "strategy.safetensors"), {k: v.cpu().contiguous() for k, v in tensors.items()})
        write_json(os.path.join(tmp, "strategy.json"), {"strategy": strategy.name, "label": strategy.label(),
                                                       "meta": meta})
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def read_jsonl(path):
    """The records of a JSON-lines file; a last line torn by a kill mid-write is dropped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def load_checkpoint(path, device):
    try:
        return Transformer.from_pretrained(path).to(device)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot load checkpoint: {e}") from None


def load_strategy_state(strategy, checkpoint, device):
    """Hand `strategy` what its run of the previous task left beside `checkpoint` (nothing if another
    strategy, e.g. the shared SEQ Task 0, made it)."""
    path = os.path.join(checkpoint, "strategy.json")
    if not os.path.exists(path):
        return
    try:
        saved = read_json(path)
        if saved["strategy"] == strategy.name:
            tensors = read_safetensors(os.path.join(checkpoint, "strategy.safetensors"))
            strategy.load_state({k: v.to(device) for k, v in tensors.items()}, saved["meta"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the strategy state in {checkpoint}: {e}") from None


def save_state(model, opt, out, step, stopped):
    """Everything needed to continue a stage exactly: weights, AdamW moments, step, torch RNG.
    (Batch order needs no state: each epoch's order is drawn from its own seeded generator.)"""
    if not DIST.main:
        return
    state_dir = os.path.join(out, "state")
    name = f"step-{step:07d}"
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | {"torch_rng": torch.get_rng_state()}
    opt_state = opt.state_dict()
    for i, moments in opt_state["state"].items():
        tensors |= {f"opt.{i}.{k}": v.reshape(1) if v.dim() == 0 else v for k, v in moments.items()}
    os.makedirs(os.path.join(state_dir, name), exist_ok=True)
    write_safetensors(os.path.join(state_dir, name, "state.safetensors"), {k: v.cpu().contiguous() for k, v in tensors.items()})
    write_json(os.path.join(state_dir, name, "state.json"),
               {"step": step, "stopped_early": stopped, "param_groups": opt_state["param_groups"]})
    write_json(os.path.join(state_dir, "latest.json"), {"dir": name})  # the switch-over is this one rename
    for old in os.listdir(state_dir):
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(state_dir, old), ignore_errors=True)


def load_state(model, opt, out):
    path = os.path.join(out, "state")
    try:
        path = os.path.join(path, read_json(os.path.join(path, "latest.json"))["dir"])
        meta = read_json(os.path.join(path, "state.json"))
        tensors = read_safetensors(os.path.join(path, "state.safetensors"))
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        moments = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                moments.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
        opt.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["torch_rng"])
        return meta["step"], meta["stopped_early"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot resume from {path}: {e}") from None

# -----------------------------------------------------------------------------------------------
# Several processes: torchrun and DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0


DIST = Dist()  # one process, unless init_distributed() joined a torchrun group


def init_distributed():
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs) and take this
    rank's GPU. Every rank builds the same data and draws the same batches from the seed; in each step it
    trains on its slice of the global batch and DDP averages the gradients, so the step equals one process's
    step on the whole batch (LAMOL's extra generation loss aside: it is a mean over each rank's rows). The
    loop's evaluations and every file are rank 0's; the others wait at the next collective. A strategy's
    own preparation (preliminary runs, Fisher, pseudo samples, the task-vector grid) runs on every rank
    alike, from the same seeds."""
    global DIST
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    DIST = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", DIST.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device else "gloo", device_id=device,
                                         timeout=datetime.timedelta(minutes=60))  # rank 0 may evaluate a while
    if not DIST.main:
        sys.stdout = open(os.devnull, "w")  # one copy of the progress report


def barrier():
    """Wait until every rank is here (so files rank 0 wrote can be read)."""
    if DIST.world > 1:
        torch.distributed.barrier()


def shard(batch):
    """This rank's rows of a global batch, and the weight that makes DDP's mean of the ranks' mean losses the
    whole batch's mean loss: (this rank's loss tokens / the batch's) x ranks. Always a loss mask under DDP,
    so that a rank left with no rows (a batch smaller than the world) still gives a loss of 0."""
    inputs, targets, mask = batch
    if DIST.world == 1:
        return batch, None
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    rows = slice(DIST.rank, None, DIST.world)
    share = mask[rows].sum() / mask.sum()
    return (inputs[rows], targets[rows], mask[rows]), share * DIST.world


def mean_over_ranks(loss, weight):
    """The global batch's mean loss from every rank's weighted one (every rank must call it)."""
    if DIST.world == 1:
        return loss.item()
    total = (loss.detach() * weight / DIST.world).reshape(1)
    torch.distributed.all_reduce(total)
    return total.item()


def agree(flag):
    """Rank 0's answer, on every rank."""
    if DIST.world == 1:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())

# -----------------------------------------------------------------------------------------------
# The training loop, shared by every stage


@dataclass
class Phase:
    """How one stage trains: its data, schedule, strategy hooks, evaluations and checkpoints."""
    name: str
    task: int                # passed to the strategy hooks (-1 = pretraining)
    total: int               # training steps
    steps_per_epoch: int
    make_epoch: object       # rng -> iterator of (inputs, targets, loss_mask) batches
    lr: float
    min_lr: float            # cosine floor; equal to lr for a constant schedule
    warmup: int
    weight_decay: float
    strategy: object = field(default_factory=Seq)  # its per-step hooks (strategies.py); start/end run outside
    ctx: Context = None                              # what the hooks see
    # name -> (model -> metrics, the steps to run it at); 'current' drives early stopping. All run at the end.
    evals: dict = field(default_factory=dict)
    early_stop: float = 0.0
    save_steps: set = field(default_factory=set)


class Meter:
    """Where a stage's wall-clock time goes (training steps, evaluations, checkpoints, a strategy's own work)
    and the useful training FLOPs done (Transformer.flops_per_token; the loop's own forward and backward, not
    a strategy's extra passes), for its summary.json. Both cover this session's part of a resumed stage."""

    def __init__(self):
        self.seconds = dict.fromkeys(("train", "eval", "checkpoint", "strategy"), 0.0)
        self.train_flops = 0.0
        self.train_tokens = 0
        self.queued = None  # the kind whose GPU work may still be running

    @contextlib.contextmanager
    def time(self, kind):
        """Add the block's wall-clock seconds to `kind`. A GPU runs behind the Python that queues its work,
        and waiting for it after every training step would drain its queue; so blocks of one kind in a row
        run without a wait, and the wait, once another kind starts (or the stage ends), goes to the kind
        that queued the work. On a CPU nothing is queued: each block's own time."""
        if kind != self.queued:
            self.settle()
        start = time.perf_counter()
        yield
        self.seconds[kind] += time.perf_counter() - start
        self.queued = kind

    def settle(self):
        if self.queued is not None:
            start = time.perf_counter()
            sync()
            self.seconds[self.queued] += time.perf_counter() - start
            self.queued = None

    def count(self, model, inputs, loss_mask):
        """Add one step's useful FLOPs: each row up to its last loss position (the padding after it is
        waste), and the head at the loss positions only when there is a loss mask."""
        fixed, head = model.flops_per_token(seq_len=0)
        per_position = model.flops_per_token(seq_len=1)[0] - fixed  # attention: linear in the row's length
        if loss_mask is None:
            lengths = torch.full(inputs.shape[:1], inputs.shape[1], device=inputs.device)
            head_tokens = inputs.numel()
        else:
            lengths = loss_mask.shape[1] - loss_mask.flip(1).int().argmax(1)  # (B,) tokens up to the last loss position
            head_tokens = loss_mask.sum()
        # kept as device tensors: reading them every step would stall a GPU
        lengths = lengths.double()
        self.train_flops += fixed * lengths.sum() + per_position * (lengths ** 2).sum() + head * head_tokens
        self.train_tokens += lengths.sum()

    def summary(self, total_seconds):
        self.settle()
        return {"time_s": {k: round(v, 1) for k, v in self.seconds.items()}
                | {"other": round(total_seconds - sum(self.seconds.values()), 1)},
                "train_flops": float(self.train_flops), "train_tokens": int(self.train_tokens)}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def every_epoch(epochs, steps_per_epoch, every=1):
    """Step 0, every `every`-th epoch's end, and the last step."""
    return set(range(0, epochs * steps_per_epoch + 1, every * steps_per_epoch)) | {epochs * steps_per_epoch}


def lr_at(step, phase):
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    progress = (step - phase.warmup) / max(1, phase.total - phase.warmup)
    return phase.min_lr + (phase.lr - phase.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(model, phase: Phase, out, cfg, tok, resume, meter):
    """Train one stage into `out`; returns (steps taken, stopped early?). Parameters with requires_grad
    False (a frozen strategy's) stay out of the optimizer, and so bit-identical. `meter` adds up where the
    time goes and the FLOPs done."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=phase.lr, weight_decay=phase.weight_decay)
    strategy, ctx = phase.strategy, phase.ctx
    if ctx is not None:
        ctx.optimizer = opt
    # A state directory without latest.json (a kill before the first state was complete) is no state.
    has_state = os.path.exists(os.path.join(out, "state", "latest.json"))
    step, stopped = load_state(model, opt, out) if resume and has_state else (0, False)
    if step:
        print(f"  {phase.name}: resuming at step {step}")
    metrics_path = os.path.join(out, "metrics.jsonl")
    kept = [line for line in read_jsonl(metrics_path) if line["step"] <= step] if step else []
    write_text(metrics_path, "".join(json.dumps(line) + "\n" for line in kept))  # drop records after the state
    net = model if DIST.world == 1 else torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

    def log(extra):
        """Evaluate (rank 0) and append one line to metrics.jsonl: a kill loses at most that line."""
        if not DIST.main:
            return {}
        with meter.time("eval"):
            record = {"stage": phase.name, "step": step, **extra} | {
                name: fn(model) for name, (fn, points) in phase.evals.items() if step in points or step == phase.total}
        with open(metrics_path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")
        return record

    def checkpoint():
        with meter.time("checkpoint"):
            save_checkpoint(model, tok, path=os.path.join(out, "ckpt", f"step-{step:07d}"),
                            info={"step": step, "task": phase.task})

    eval_points = set().union(*(points for _, points in phase.evals.values()))
    if step == 0:
        if 0 in eval_points:
            log({})
        if 0 in phase.save_steps:
            checkpoint()
    bar = tqdm(total=phase.total, initial=step, desc=phase.name, leave=False, dynamic_ncols=True, disable=not DIST.main)
    batches = None
    while step < phase.total and not stopped:
        with meter.time("train"):
            epoch, i = divmod(step, phase.steps_per_epoch)
            if i == 0 or batches is None:  # each epoch's order comes from its own seeded generator: resumable
                batches = list(phase.make_epoch(np.random.default_rng([cfg.seed, phase.task + 1, epoch])))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, phase)
            local_batch, weight = shard(batches[i])
            loss = train_step(net, opt, params, local_batch, strategy, ctx, weight)
            meter.count(model, batches[i][0], batches[i][2])  # the whole global batch
            step += 1
            logged = step in eval_points or step == phase.total
            if step % 10 == 0 or logged:  # reading the loss waits for the step to finish: not every step, on a GPU
                loss_value = mean_over_ranks(loss, weight)
        if ctx is not None:
            ctx.step = step
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if logged:
            record = log({"loss": loss_value, "lr": opt.param_groups[0]["lr"]})
            stopped = agree(phase.early_stop > 0 and record.get("current", {}).get("em", 0) >= phase.early_stop)
        if step in phase.save_steps:
            checkpoint()
        if step % cfg.state_every == 0 or step == phase.total or stopped:
            with meter.time("checkpoint"):
                save_state(model, opt, out=out, step=step, stopped=stopped)
    bar.close()
    barrier()  # the others may now read what rank 0 wrote
    return step, stopped


def train_step(model, opt, params, batch, strategy, ctx, weight=None):
    """One optimizer step on batch = (inputs, targets, loss_mask); returns the loss. On a GPU the matrix
    products run in bf16 under autocast (weights, gradients and AdamW state stay fp32); a CPU computes in fp32.
    `weight` scales this rank's loss under DDP (see shard)."""
    inputs, targets, mask = batch
    with autocast(inputs.device.type):
        _, loss = model(inputs, targets, loss_mask=mask)
        loss = strategy.loss(ctx, batch, loss)
    (loss if weight is None else loss * weight).backward()
    strategy.after_backward(ctx)
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def autocast(device_type):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else contextlib.nullcontext()


def make_optimizer(params, lr, weight_decay):
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms, biases
    # Fused on a GPU (one kernel for every tensor); on a CPU the foreach form, which gives the same bits as the
    # plain loop (checked) in fewer calls. (CPU-fused AdamW is faster still but rounds differently.)
    cuda = params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=cuda or None, foreach=not cuda or None)


def fine_tuning_steps(model, qa, seed, cfg):
    """Plain fine-tuning of `model` on `qa` with the stage's settings, one step per item, forever: the
    preliminary runs some strategies make before a task (gradient projection)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=cfg.ft_lr, weight_decay=cfg.ft_wd)
    for epoch in itertools.count():
        for batch in qa_batches(qa, cfg.ft_batch, np.random.default_rng([*seed, epoch])):
            train_step(model, opt, params, batch, strategy=Seq(), ctx=None)
            yield

# -----------------------------------------------------------------------------------------------
# Stages: pretrain -> task0 -> task1 .. taskK, and recover (which probes Task 1's checkpoints)


def stage_names(cfg):
    return ["pretrain", "task0"] + [f"task{k}" for k in range(1, cfg.n_tasks + 1)] + ["recover"]


def previous_stage(cfg, stage):
    fixed = {"pretrain": None, "task0": "pretrain", "recover": f"task{cfg.n_tasks}"}
    return fixed[stage] if stage in fixed else f"task{int(stage[4:]) - 1}"


def stage_dir(cfg, stage):
    """runs/<preset>/<stage>[-<strategy>]-<hash of every setting that shaped this stage and those before it>."""
    chain, s = [], stage
    while s:
        chain.append(s)
        s = previous_stage(cfg, s)
    fields = [f for s in reversed(chain) for f in STAGE_FIELDS[s if s in ("pretrain", "task0", "recover") else "task"]]
    settings = {f: getattr(cfg, f) for f in dict.fromkeys(fields)} | {"vocabulary": vocabulary_digest()}
    if torch.cuda.is_available():  # a GPU trains in bf16 autocast: other numbers, so never a CPU run's stages
        settings |= {"precision": "bf16 autocast"}
    strategy = make_strategy(cfg.strategy, cfg.strategy_args)
    uses_strategy = stage != "pretrain" and (stage != "task0" or strategy.changes_task0)
    if uses_strategy:  # the method and every one of its hyper-parameters, defaults included
        settings |= {"strategy": strategy.name, "strategy_config": dataclasses.asdict(strategy.config)}
    label = f"{stage}-{strategy.label()}" if uses_strategy else stage
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cfg.runs, cfg.preset, f"{label}-{digest}"), settings


@functools.cache
def vocabulary_digest():
    """Edited pools give another vocabulary, and so other token ids: part of every cache key."""
    return hashlib.sha256("\n".join(data.build_tokenizer().vocab).encode()).hexdigest()[:10]


def keep_freed_memory():
    """Let glibc's malloc keep freed memory mapped for reuse (Linux with glibc; elsewhere nothing changes).

    Every step frees and reallocates the same few-megabyte activation buffers. By default glibc serves the
    largest with fresh pages from the kernel and hands freed memory back, so the next step faults every 4 KB
    page in again: two pretraining epochs of the cpu preset took 2.3-3.2 million page faults, 0.4-0.5 million
    with these settings (README, "Speed"). The arithmetic and its bits stay the same; only the faults go.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL(None).mallopt
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # from <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MB (glibc's largest setting) come from the heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)   # free memory at the heap's top is returned only past 1 GB
    mallopt(M_TOP_PAD, 64 << 20)         # and the heap grows in 64 MB steps, not page by page


def environment():
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads",
            "processes": DIST.world}


def data_config(cfg):
    try:
        pools = tuple(int(n) for n in cfg.name_pools.split(","))
        assert len(pools) == 3
    except (ValueError, AssertionError):
        raise ValueError(f"--name-pools {cfg.name_pools!r}: expected three numbers like 25,25,35") from None
    return data.DataConfig(n_people=cfg.people, task_size=cfg.task_size, n_tasks=cfg.n_tasks, seed=cfg.seed,
                           name_pools=pools)


def model_config(cfg, vocab_size):
    return ModelConfig(model_type="gpt_neox", vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       d_model=cfg.d_model, d_ff=cfg.d_ff, max_seq_len=cfg.context)


class Experiment:
    """The dataset, tokenizer and evaluation sets of one configuration, and the stages built on them."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = f"cuda:{DIST.local_rank}" if torch.cuda.is_available() else "cpu"
        self.tok = data.build_tokenizer()
        self.bio = data.build_dataset(data_config(cfg), self.tok)
        self.qa = {}
        self.meter = Meter()  # a new one for each stage run() builds

    def qa_set(self, split):
        if split not in self.qa:
            self.qa[split] = QASet.from_arrays(data.qa_arrays(self.bio, self.bio.splits[split], self.tok), self.device)
        return self.qa[split]

    def eval_fn(self, split, full=False):
        qa = self.qa_set(split)
        if not full and len(qa) > self.cfg.eval_subset:  # a fixed subset, the same at every evaluation
            rng = np.random.default_rng([self.cfg.seed, 11])
            qa = qa.subset(sorted(rng.choice(len(qa), self.cfg.eval_subset, replace=False).tolist()))
        return lambda model: evaluate(model, qa, self.tok)


    def run(self, stage, resume):
        """Build `stage`, and first whatever it needs, unless cached; return its directory."""
        out, settings = stage_dir(self.cfg, stage)
        if os.path.exists(os.path.join(out, "summary.json")):
            print(f"{stage}: cached in {out}")
            return out
        previous = previous_stage(self.cfg, stage)
        prev_dir = self.run(previous, resume) if previous else None
        if os.path.exists(out) and not resume and DIST.main:
            print(f"{stage}: {out} holds an interrupted run; starting it over (--resume continues it)")
            shutil.rmtree(out)
        barrier()
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "settings.json"), {"stage": stage, "settings": settings, **environment()})
        print(f"{stage}: training into {out}")
        start, self.meter = time.time(), Meter()
        build = {"pretrain": self.pretrain, "recover": self.recover}.get(stage, self.task)
        summary = build(stage, out, prev_dir, resume)
        seconds = time.time() - start  # of this session, if resumed
        summary |= {"stage": stage, "seconds": round(seconds, 1), **self.meter.summary(seconds),
                    "settings": settings, **environment()}
        write_json(os.path.join(out, "summary.json"), summary)
        if DIST.main:
            for state in glob.glob(os.path.join(out, "**", "state"), recursive=True):  # complete: no resume needed
                shutil.rmtree(state)
        barrier()
        return out

    def pretrain(self, stage, out, prev_dir, resume):
        c = self.cfg
        model = self.initial_model().to(self.device)
        print(f"  model: {model.num_params() / 1e6:.2f}M parameters, vocabulary {self.tok.vocab_size}")
        entries = self.bio.bio_token_ids(self.bio.splits["pretrain"])
        n_blocks = sum(len(e) + 1 for e in entries) // (c.context + 1)  # what pack_pretraining makes, any order
        steps_per_epoch = math.ceil(n_blocks / c.pretrain_batch)
        phase = Phase("pretrain", task=-1, total=c.pretrain_epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                      make_epoch=lambda rng: pretrain_batches(entries, c, self.tok, rng, self.device),
                      lr=c.pretrain_lr, min_lr=c.pretrain_min_lr, warmup=c.pretrain_warmup,
                      weight_decay=c.pretrain_wd,
                      evals={"bio": (self.bio_probe(), every_epoch(c.pretrain_epochs, steps_per_epoch, every=4))},
                      save_steps={c.pretrain_epochs * steps_per_epoch // 2})  # halfway: for analysis.py's weight angles
        train_loop(model, phase, out=out, cfg=c, tok=self.tok, resume=resume, meter=self.meter)
        with self.meter.time("checkpoint"):
            save_checkpoint(model, self.tok, os.path.join(out, "final"), {"stage": "pretrain", "step": phase.total})
        result = read_metrics(out)[-1]["bio"]  # the probe the loop ran at its last step
        print(f"  pretraining done: biography attribute first-token accuracy {result['first_token']:.3f}")
        return {"bio": result}

    def initial_model(self):
        """The random weights pretraining starts from (the seed fixes them, so analysis.py can rebuild them)."""
        torch.manual_seed(self.cfg.seed)
        return Transformer(model_config(self.cfg, self.tok.vocab_size))

    def bio_probe(self):
        """Memorisation: first-token accuracy of each attribute value where it stands in a biography."""
        c = self.cfg
        people = self.bio.splits["pretrain"]
        people = people[np.random.default_rng([c.seed, 12]).permutation(len(people))[:max(1, c.eval_subset // 6)]]
        qa = QASet.from_arrays(data.bio_probe_arrays(self.bio, people, self.tok), self.device)
        qa.prompts = [p[-c.context:] for p in qa.prompts]  # a long biography keeps its last `context` tokens
        return lambda model: evaluate(model, qa, self.tok, exact_match=False)

    def task(self, stage, out, prev_dir, resume):
        """Task 0 (QA of half the pretraining people) or a new task k, through the strategy's hooks."""
        c, k = self.cfg, int(stage[4:])
        model = load_checkpoint(os.path.join(prev_dir, "final"), self.device)
        strategy = make_strategy(c.strategy, c.strategy_args)
        if k == 0 and not strategy.changes_task0:
            strategy = Seq()  # so that every method starts from one shared Task-0 run
        load_strategy_state(strategy, os.path.join(prev_dir, "final"), self.device)
        ctx = self.context(model, task=k, out=out)
        with self.meter.time("strategy"):
            strategy.start(ctx)
        steps_per_epoch = len(strategy.epoch(ctx, np.random.default_rng(0)))
        epochs = c.task0_epochs if k == 0 else c.task_epochs
        total = epochs * steps_per_epoch
        if k == 0:  # once an epoch
            evals = {"task0": (self.eval_fn("task0_test"), every_epoch(epochs, steps_per_epoch))}
        else:  # Task 0 densely on a fixed subset, as the forgetting happens early; the new task, which is
            # learnt slowly, every `sparse_every` steps on all its pairs, since early stopping judges it whole
            sparse = set(range(0, total + 1, c.sparse_every))
            dense = set(range(0, min(total, c.dense_until) + 1, c.dense_every)) | sparse
            evals = {"task0": (self.eval_fn("task0_test"), dense),
                     "current": (self.eval_fn(stage, full=c.early_stop > 0), sparse)}
        save_steps = {int(s) for s in c.checkpoint_steps.split(",")} if k == 1 else set()
        # One constant learning rate for every fine-tuning stage, as in the paper: a larger one for the new
        # tasks would move the weights further than Task 0 did and mix real forgetting into the spurious kind.
        phase = Phase(stage, task=k, total=total, steps_per_epoch=steps_per_epoch,
                      make_epoch=lambda rng: strategy.epoch(ctx, rng), lr=c.ft_lr, min_lr=c.ft_lr, warmup=0,
                      weight_decay=c.ft_wd, strategy=strategy, ctx=ctx, evals=evals,
                      early_stop=c.early_stop if k else 0.0,
                      save_steps=save_steps | strategy.checkpoint_steps(steps_per_epoch, total))
        steps, stopped = train_loop(model, phase, out=out, cfg=c, tok=self.tok, resume=resume, meter=self.meter)
        ckpt_dir = os.path.join(out, "ckpt")
        ctx.checkpoints = {int(name[5:]): os.path.join(ckpt_dir, name) for name in sorted(os.listdir(ckpt_dir))
                           if not name.endswith(".tmp")} if os.path.isdir(ckpt_dir) else {}
        with self.meter.time("strategy"):
            strategy.end(ctx)
        with self.meter.time("checkpoint"):
            save_checkpoint(model, self.tok, os.path.join(out, "final"), {"stage": stage, "step": steps},
                            strategy=strategy)
        if not DIST.main:
            return {}  # rank 0 alone evaluates and reports
        with self.meter.time("eval"):  # full evaluation on every task so far: row k of the accuracy matrix R
            row = {"task0": evaluate(model, self.qa_set("task0_test"), self.tok)}
            row |= {f"task{j}": evaluate(model, self.qa_set(f"task{j}"), self.tok) for j in range(1, k + 1)}
        print(f"  {stage} done after {steps} steps{' (early stop)' if stopped else ''}: "
              + ", ".join(f"{name} EM {r['em']:.3f}" for name, r in row.items()))
        return {"steps": steps, "stopped_early": stopped, "strategy": strategy.label(), "results": row,
                "accuracy_row": [r["em"] for r in row.values()], "strategy_state": strategy.state()[1]}

    def context(self, model, task, out):
        """What the strategy's hooks see of this experiment (strategies.Context)."""
        c, tok = self.cfg, self.tok
        return Context(model=model, task=task, tok=tok, out=out, seed=c.seed, batch_size=c.ft_batch,
                       train=[self.qa_set("task0_train")] + [self.qa_set(f"task{j}") for j in range(1, task + 1)],
                       batches=qa_batches, join=lambda sets: QASet.join(sets, tok.pad_id),
                       from_pairs=lambda prompts, answers: QASet.from_pairs(prompts, answers, tok.pad_id, self.device),
                       fit=lambda m, qa, seed: fine_tuning_steps(m, qa, seed, c),
                       evaluate=lambda m, j: self.eval_fn("task0_test" if j == 0 else f"task{j}")(m)["em"])

    def recover(self, stage, out, last_task_dir, resume):
        """The recovery probe (the paper's): a copy of a checkpoint is fine-tuned on the QA of *all* Task-0
        training people, at the fine-tuning lr, for a tenth of the Task-1 run's steps; then exact match on
        the Task-0 *test* people, whose QA no stage ever trained. If their accuracy comes back, the
        knowledge was still in the weights and only the task alignment was lost. The pretrained and
        Task-0 checkpoints, probed the same way, give the ceiling: what the probe finds before any
        forgetting."""
        c = self.cfg
        task1_dir = stage_dir(c, "task1")[0]
        train_qa, test = self.qa_set("task0_train"), self.eval_fn("task0_test", full=True)
        task1_steps = read_json(os.path.join(task1_dir, "final", "training_state.json"))["step"]
        probe_steps = max(1, round(c.recover_fraction * task1_steps))
        saved = sorted(p for p in os.listdir(os.path.join(task1_dir, "ckpt")) if not p.endswith(".tmp"))
        probes = [("pretrained", os.path.join(stage_dir(c, "pretrain")[0], "final"), None),
                  ("task0", os.path.join(stage_dir(c, "task0")[0], "final"), None)]
        probes += [(name, os.path.join(task1_dir, "ckpt", name), int(name[5:])) for name in saved if name != "step-0000000"]
        if f"step-{task1_steps:07d}" not in saved:  # Task 1 may have ended on a saved step
            probes.append(("final", os.path.join(task1_dir, "final"), task1_steps))
        print(f"  probing {len(probes)} checkpoints, {probe_steps} steps each ({c.recover_fraction:g} of Task 1's"
              f" {task1_steps})")
        rows = []
        for name, path, task1_step in tqdm(probes, desc="recover", leave=False, disable=not DIST.main):
            probe_dir, result_path = os.path.join(out, name), os.path.join(out, name, "result.json")
            if os.path.exists(result_path):  # done before an interruption
                rows.append(read_json(result_path))
                continue
            model = load_checkpoint(path, self.device)
            with self.meter.time("eval"):
                before = test(model) if DIST.main else None  # rank 0 alone evaluates
            phase = Phase(f"recover {name}", task=0, total=probe_steps,
                          steps_per_epoch=math.ceil(len(train_qa) / c.ft_batch),
                          make_epoch=lambda rng: qa_batches(train_qa, c.ft_batch, rng), lr=c.ft_lr, min_lr=c.ft_lr,
                          warmup=0, weight_decay=c.ft_wd)
            os.makedirs(probe_dir, exist_ok=True)
            train_loop(model, phase, out=probe_dir, cfg=c, tok=self.tok, resume=resume, meter=self.meter)
            if DIST.main:
                with self.meter.time("eval"):
                    after = test(model)
                rows.append({"checkpoint": name, "task1_step": task1_step, "task0_em_before": before["em"],
                             "task0_em_after": after["em"], "before": before, "after": after})
                write_json(result_path, rows[-1])
            barrier()
        if not DIST.main:
            return {}
        ceiling = max(rows[0]["task0_em_after"], rows[1]["task0_em_after"])  # probed before anything was forgotten
        for row in rows:
            row["recovered_share"] = row["task0_em_after"] / ceiling if ceiling else float("nan")
        return {"task1_run": os.path.basename(task1_dir), "probe_steps": probe_steps, "ceiling": ceiling,
                "rows": rows}

# -----------------------------------------------------------------------------------------------
# Report: a printed table and a plot


def related_runs(cfg, stage):
    """Completed runs of `stage` (any strategy) that share this configuration's pretraining and Task 0."""
    shared, _ = stage_dir(cfg, "task0")
    task0_settings = read_json(os.path.join(shared, "summary.json"))["settings"]
    root = os.path.join(cfg.runs, cfg.preset)
    runs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "summary.json")
        if name.startswith(stage + "-") and os.path.exists(path):
            summary = read_json(path)
            if all(summary["settings"].get(k) == v for k, v in task0_settings.items()):
                runs.append((os.path.join(root, name), summary))
    return runs


def read_metrics(run_dir):
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def report(cfg):
    """Print what the completed stages found, and plot Task 1's dense curves with the recovery probe."""
    pre = read_json(os.path.join(stage_dir(cfg, "pretrain")[0], "summary.json"))
    print(f"\npretraining: biography attribute first-token accuracy {pre['bio']['first_token']:.3f}")
    task0 = os.path.join(stage_dir(cfg, "task0")[0], "summary.json")
    if not os.path.exists(task0):
        return
    print(f"task 0: held-out (extraction) exact match {read_json(task0)['results']['task0']['em']:.3f}")
    summaries = [os.path.join(stage_dir(cfg, f"task{k}")[0], "summary.json") for k in range(cfg.n_tasks + 1)]
    rows = [read_json(path)["accuracy_row"] for path in summaries if os.path.exists(path)]
    if len(rows) > 1:
        print(f"accuracy matrix (exact match; row i = after task i, {cfg.strategy}): {rows}")
        print("  " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in cl_metrics(rows).items()))
    recovered = {s["task1_run"]: s for _, s in related_runs(cfg, "recover")}
    print(f"\n{'task 1 run':<28}{'steps':>6}{'T0 start':>10}{'T0 min@150':>11}{'T0 end':>8}{'T1 end':>8}"
          f"{'T0 recovered':>14}")
    for run_dir, s in related_runs(cfg, "task1"):
        curve = read_metrics(run_dir)
        early = [r["task0"]["em"] for r in curve if r["step"] <= 150]
        rec = recovered.get(os.path.basename(run_dir))
        rec_end = f"{rec['rows'][-1]['task0_em_after']:.3f}" if rec else "-"
        print(f"{s['strategy'] + (' (early stop)' if s['stopped_early'] else ''):<28}{s['steps']:>6}"
              f"{curve[0]['task0']['em']:>10.3f}{min(early):>11.3f}{s['results']['task0']['em']:>8.3f}"
              f"{s['results']['task1']['em']:>8.3f}{rec_end:>14}")
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
    curve = read_metrics(task1_dir)
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
    fig.tight_layout()
    if DIST.main:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        print(f"plot: {path}")
    pyplot().close(fig)

# -----------------------------------------------------------------------------------------------
# Over seeds and over frozen depths: the README's headline table and the freeze sweep (paper Fig. 7a)

# The paper's numbers (Pythia-160M shape, 100K + 20K people), beside which the headline table sets ours.
PAPER = {"task0_extraction": "~100", "seq_task0_at_150": "~10", "seq_task0_end": "11.18",
         "recovered_share_early": "~100%", "recovered_share_end": "96%", "freeze_task0_end": "44.22"}


def headline_numbers(seq_cfg, freeze_cfg):
    """One seed's row of the headline table, read from its finished SEQ, recovery and freeze runs."""
    task0 = read_json(os.path.join(stage_dir(seq_cfg, "task0")[0], "summary.json"))
    seq_dir = stage_dir(seq_cfg, "task1")[0]
    seq, curve = read_json(os.path.join(seq_dir, "summary.json")), read_metrics(seq_dir)
    rec = read_json(os.path.join(stage_dir(seq_cfg, "recover")[0], "summary.json"))
    freeze = read_json(os.path.join(stage_dir(freeze_cfg, "task1")[0], "summary.json"))
    probed = [r for r in rec["rows"] if r["task1_step"] is not None]
    early = [r for r in probed if 0 < r["task1_step"] <= 150]
    return {
        "task0_extraction": task0["results"]["task0"]["em"],
        "seq_task0_at_150": min(r["task0"]["em"] for r in curve if r["step"] <= 150),
        "seq_task0_end": seq["results"]["task0"]["em"], "seq_task1_end": seq["results"]["task1"]["em"],
        "seq_steps": seq["steps"], "probe_ceiling": rec["ceiling"],
        "recovered_share_early": float(np.mean([r["recovered_share"] for r in early])),
        "recovered_share_end": probed[-1]["recovered_share"],
        "freeze_task0_end": freeze["results"]["task0"]["em"], "freeze_task1_end": freeze["results"]["task1"]["em"],
        "freeze_steps": freeze["steps"],
    }


def headline(cfg, seeds, resume):
    """SEQ with its recovery probe, and freeze, for each seed; then the mean +- std over the seeds."""
    per_seed = []
    for seed in seeds:
        seq_cfg = dataclasses.replace(cfg, seed=seed, strategy="seq")
        freeze_cfg = dataclasses.replace(seq_cfg, strategy="freeze")
        print(f"\n=== seed {seed}")
        Experiment(seq_cfg).run("recover", resume)
        Experiment(freeze_cfg).run("task1", resume)
        per_seed.append(headline_numbers(seq_cfg, freeze_cfg))
    freeze = make_strategy("freeze", cfg.strategy_args).config
    stats = {k: {"mean": float(np.mean([r[k] for r in per_seed])),
                 "std": float(np.std([r[k] for r in per_seed], ddof=1)) if len(seeds) > 1 else 0.0}
             for k in per_seed[0]}
    labels = {"task0_extraction": "Task-0 test EM after Task 0 (extraction)",
              "seq_task0_at_150": "SEQ: lowest Task-0 EM in the first 150 Task-1 steps",
              "seq_task0_end": "SEQ: Task-0 EM when Task 1 is learnt",
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
    root = os.path.join(cfg.runs, cfg.preset)
    write_json(os.path.join(root, "headline.json"), {"seeds": seeds, "per_seed": per_seed, "stats": stats,
                                                     "settings": dataclasses.asdict(cfg), **environment()})
    write_text(os.path.join(root, "headline.md"), table + "\n")
    print(f"\n{table}\n\nwritten to {root}/headline.md and headline.json")
    return root


def freeze_sweep(cfg, resume):
    """Task 1 with the embedding and k = 0..L bottom blocks frozen, and SEQ: final Task-0 and Task-1
    exact match against k, one plot (paper Fig. 7a)."""
    runs = [("seq", dataclasses.replace(cfg, strategy="seq"))]
    runs += [(k, dataclasses.replace(cfg, strategy="freeze", strategy_args=cfg.strategy_args | {"freeze_layers": k}))
             for k in range(cfg.n_layer + 1)]
    rows = []
    for k, run_cfg in runs:
        summary = read_json(os.path.join(Experiment(run_cfg).run("task1", resume), "summary.json"))
        rows.append({"frozen_blocks": k, "task0_em": summary["results"]["task0"]["em"],
                     "task1_em": summary["results"]["task1"]["em"], "steps": summary["steps"],
                     "stopped_early": summary["stopped_early"]})
    root = os.path.join(cfg.runs, cfg.preset)
    write_json(os.path.join(root, "freeze-sweep.json"), {"rows": rows, "settings": dataclasses.asdict(cfg),
                                                         **environment()})
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

# (row, strategy, its hyper-parameters, the paper's Task-0 EM after Task 1 in %). The paper reports EWC,
# LAMOL, task vectors and gradient projection together: "from 11% to at most 22%".
TABLE = [
    ("SEQ", "seq", {}, "11.18"),
    ("SEQ with the authors' hidden freeze ('layers.1')", "seq-authors", {}, "-"),
    ("EWC, per-sample Fisher, lambda 1", "ewc", {"ewc_lambda": 1.0}, "<= 22"),
    ("EWC, per-sample Fisher, lambda 10", "ewc", {"ewc_lambda": 10.0}, "<= 22"),
    ("EWC, per-sample Fisher, lambda 100", "ewc", {"ewc_lambda": 100.0}, "<= 22"),
    ("EWC, the authors' Fisher, lambda 5000", "ewc", {"ewc_lambda": 5000.0, "ewc_fisher": "authors"}, "<= 22"),
    ("LAMOL_g (shared generation token)", "lamol", {"lamol_token": "shared"}, "<= 22"),
    ("LAMOL_t (a token per task)", "lamol", {"lamol_token": "task"}, "<= 22"),
    ("Task vector (best point with Task 1 >= 0.95)", "taskvector", {}, "<= 22; 30.75 (T1 95.76)"),
    ("Gradient projection (the authors' rule)", "gradproj", {}, "<= 22"),
    ("Replay 10%", "replay", {"replay_fraction": 0.1}, "-"),
    ("Replay 20%", "replay", {"replay_fraction": 0.2}, "76.93"),
    ("Freeze the embedding + bottom blocks", "freeze", {}, "44.22 (7 of 12)"),
    ("Multi-task: Task 0 + Task 1 jointly (upper bound)", "multitask", {}, "-"),
]


def table(cfg, resume):
    """Run every method of TABLE on Task 1 (each cached and resumable), then write table.md/.json and a bar plot."""
    rows = []
    for label, name, settings, paper in TABLE:
        run_cfg = dataclasses.replace(cfg, strategy=name, strategy_args=cfg.strategy_args | settings)
        print(f"\n=== {label}")
        run_dir = Experiment(run_cfg).run("task1", resume)
        summary = read_json(os.path.join(run_dir, "summary.json"))
        seconds = summary["seconds"]
        if make_strategy(name, run_cfg.strategy_args).changes_task0:  # its own Task 0 counts too
            seconds += read_json(os.path.join(stage_dir(run_cfg, "task0")[0], "summary.json"))["seconds"]
        rows.append({"method": label, "strategy": summary["strategy"], "paper_task0": paper,
                     "task0_em": summary["results"]["task0"]["em"], "task1_em": summary["results"]["task1"]["em"],
                     "steps": summary["steps"], "stopped_early": summary["stopped_early"], "seconds": seconds,
                     "run": os.path.basename(run_dir), "strategy_state": summary["strategy_state"]})
    lines = ["| method | paper: Task 0 (%) | Task 0 EM | Task 1 EM | steps | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['paper_task0']} | {r['task0_em']:.3f} | {r['task1_em']:.3f} | {r['steps']}"
              f"{'' if r['stopped_early'] else ' (no early stop)'} | {r['seconds']:.0f} |" for r in rows]
    text = "\n".join(lines)
    root = os.path.join(cfg.runs, cfg.preset)
    write_json(os.path.join(root, "table.json"), {"rows": rows, "settings": dataclasses.asdict(cfg), **environment()})
    write_text(os.path.join(root, "table.md"), text + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["task0_em"] for r in rows], height=0.4, label="Task 0 (test people)")
    ax.barh(y + 0.2, [r["task1_em"] for r in rows], height=0.4, label="Task 1")
    ax.set_yticks(y, [r["method"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="exact match after Task 1", xlim=(0, 1), title=f"{cfg.preset}: continual-learning methods")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize=8)
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


COMMANDS = ("headline", "freeze-sweep", "table")  # runs over several configurations, beside the single stages


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="recover",
                        help="stage to reach: pretrain, task0, task1..taskK, or recover (default: recover); or"
                             " headline (SEQ + recovery probe and freeze, for each of --seeds, then mean +- std),"
                             " freeze-sweep (Task 1 with k = 0..n_layer blocks frozen, and SEQ) or table (every"
                             " method of the paper's Table 1 on Task 1)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of --stage headline (default: 0,1,2)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted stages from their last saved state")
    config_flags = [f for f in dataclasses.fields(TrainConfig) if f.name != "strategy_args"]
    for f in config_flags:
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                            help=f"{f.metadata['help']} (cpu preset: {f.default})")
    strategy_flags = config_fields()
    group = parser.add_argument_group("strategy hyper-parameters (each applies to its own strategy)")
    for name, (_, f) in strategy_flags.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=None,
                           help=f"{f.metadata['help']} (default: {f.default})")
    args = parser.parse_args(argv)
    preset = args.preset or "cpu"
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    overrides = {f.name: getattr(args, f.name) for f in config_flags if getattr(args, f.name) is not None}
    given = {name: getattr(args, name) for name in strategy_flags if getattr(args, name) is not None}
    preset_settings = dict(PRESETS[preset])
    sizes = data.PRESETS[preset_settings.pop("data", preset)]
    base = dict(people=sizes.n_people, task_size=sizes.task_size, n_tasks=sizes.n_tasks,
                name_pools=",".join(map(str, sizes.name_pools))) | preset_settings
    try:
        cfg = TrainConfig(**(base | overrides | {"preset": preset}))
    except ValueError as e:
        parser.error(str(e))
    cfg.strategy_args = dict(cfg.strategy_args) | given
    if cfg.strategy not in STRATEGIES:
        parser.error(f"--strategy {cfg.strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if args.stage not in COMMANDS:  # a single run: its flags must be its strategy's
        for name in given:
            owner = strategy_flags[name][0]
            if owner != cfg.strategy:
                parser.error(f"--{name.replace('_', '-')} is a setting of --strategy {owner}, not {cfg.strategy}")
    try:
        for name in STRATEGIES:  # every strategy's settings checked, as the table and sweeps use them all
            make_strategy(name, cfg.strategy_args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if not 0 <= cfg.strategy_args.get("freeze_layers", 0) <= cfg.n_layer:
        parser.error(f"--freeze-layers {cfg.strategy_args['freeze_layers']}: expected 0..{cfg.n_layer} (the model has"
                     f" {cfg.n_layer} blocks)")
    if cfg.n_tasks > 27 and cfg.strategy_args.get("lamol_token") == "task":
        parser.error(f"--lamol-token task: markers ' 1' .. ' 28' cover 28 tasks, not {cfg.n_tasks + 1}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a positive number")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        assert seeds and min(seeds) >= 0
    except (ValueError, AssertionError):
        parser.error(f"--seeds {args.seeds!r}: expected seeds like 0,1,2")
    try:
        data_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    if args.stage not in stage_names(cfg) + list(COMMANDS):
        parser.error(f"--stage {args.stage!r}: expected one of {', '.join(stage_names(cfg) + list(COMMANDS))}")
    return cfg, args.stage, args.resume, seeds


class RunLock:
    """One train.py at a time per runs/<preset> directory: two would build the same stages at once. The lock
    file holds the owner's pid; a lock whose process is gone (killed) is stale and taken over."""

    def __init__(self, root):
        self.root, self.path = root, os.path.join(root, "train.lock")

    def holder(self):
        try:
            with open(self.path) as f:
                return int(f.read() or -1)  # -1: being written by a process that just took it
        except (OSError, ValueError):
            return None

    def __enter__(self):
        os.makedirs(self.root, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.holder()
                if pid == -1 or (pid is not None and process_alive(pid)):
                    raise UserError(f"{self.root} is in use by another train.py (pid {pid}, lock file {self.path})"
                                    f"; wait for it, or stop it") from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise UserError(f"{self.root}: could not take the lock file {self.path}")

    def __exit__(self, *exc):
        if self.holder() == os.getpid():
            os.remove(self.path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def main(argv=None):
    cfg, stage, resume, seeds = parse_args(argv)
    keep_freed_memory()
    init_distributed()
    try:
        with RunLock(os.path.join(cfg.runs, cfg.preset)) if DIST.main else contextlib.nullcontext():
            if stage == "headline":
                return headline(cfg, seeds, resume)
            if stage == "freeze-sweep":
                return freeze_sweep(cfg, resume)
            if stage == "table":
                return table(cfg, resume)
            if resume and not os.path.exists(stage_dir(cfg, "pretrain")[0]):
                raise UserError(f"--resume: nothing to resume under {os.path.join(cfg.runs, cfg.preset)} for these settings")
            out = Experiment(cfg).run(stage, resume)
            report(cfg)
            return out
    finally:
        if DIST.world > 1:
            torch.distributed.destroy_process_group()  # (a rank that fails ends them all: torchrun stops the rest)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def cli(argv=None):
    """main() for the command line: a user's mistake or a disk problem is one line, not a traceback."""
    try:
        return main(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        sys.exit(f"error: {e.filename or 'writing'}: {e.strerror}; the last complete state is kept (--resume continues)")


if __name__ == "__main__":
    cli()
