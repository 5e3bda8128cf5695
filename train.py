"""Continual fine-tuning on the Biography dataset, and the recovery probe that shows forgetting is spurious.

    python train.py                                   # cpu preset: pretrain -> Task 0 -> Task 1 (SEQ) -> recovery
    python train.py --stage task1 --strategy freeze   # same, freezing the embedding + bottom layers in Task 1
    python train.py --stage headline                  # SEQ + recovery and freeze for seeds 0,1,2: mean +- std
    python train.py --stage freeze-sweep              # Task 1 with k = 0..4 bottom blocks frozen, and SEQ
    python train.py --stage table                     # every method of the paper's Table 1 (strategies.py)

Stages, in order: pretrain (biographies, from scratch) -> task0 (QA of half the people; tested on the other half:
knowledge *extraction*) -> task1..taskK (QA of new people) -> recover (the probe: the pretrained, Task-0 and saved
Task-1 checkpoints, each fine-tuned briefly on the Task-0 training QA and tested on the Task-0 test people). Every
fine-tuning stage uses one learning rate, as the paper does. Asking for a stage runs every missing earlier one.

This file is the experiment, in the order it runs. Its plumbing (files, the stage cache keyed by every setting,
several processes, the command line) is runs.py; the report and the commands over several runs are report.py.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts threads: busy-waiting stalls a 2-core box

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import data
import report
import runs
from data import QASet
from evaluation import evaluate
from model import ModelConfig, Transformer
from strategies import (STRATEGIES, Context, Seq, at_least, check_settings, check_strategy_args, config_fields,
                        make_strategy, numbers, one_of, share)


def arg(default, help, check=None, stage=None, keyed_when_changed=False):
    """A setting of TrainConfig: its default (the cpu preset), its --help, what a valid value is (strategies.hp),
    and the first stage it shapes: its value enters the cache key of that stage and of every later one (a setting
    added later only when changed from its default, so that the stages cached before it keep their keys)."""
    return field(default=default, metadata={"help": help, "check": check, "stage": stage,
                                            "keyed_when_changed": keyed_when_changed})


POSITIVE = (lambda v: v > 0), "a number > 0"


@dataclass
class TrainConfig:
    preset: str = arg("cpu", "named settings (PRESETS): tiny (CI), cpu (a laptop), deep (8-block freeze sweep), paper,"
                      " llama-1k (an hour a seed, nearest the paper)")
    seed: int = arg(0, "seed of the data, the initial weights and the batch order", at_least(0), "pretrain")
    # data (the cpu preset's sizes are data.DataConfig's defaults)
    people: int = arg(data.DataConfig.n_people, "pretraining people; Task 0 trains on the first half, tests on the"
                      " second", at_least(2), "pretrain")
    task_size: int = arg(data.DataConfig.task_size, "new people in each of Tasks 1..K", at_least(1), "pretrain")
    n_tasks: int = arg(data.DataConfig.n_tasks, "K: new-people tasks after Task 0", at_least(1), "pretrain")
    name_pools: str = arg(",".join(map(str, data.DataConfig.name_pools)), "first,middle,last names there are (~20+"
                          " people share each; the paper: 400,400,1000)", stage="pretrain")
    # model: GPT-NeoX (Pythia) shape, or Llama's at the same width and depth
    n_layer: int = arg(4, "transformer blocks", at_least(1), "pretrain")
    d_model: int = arg(128, "residual stream width", at_least(1), "pretrain")
    n_head: int = arg(4, "attention heads (a divisor of --d-model)", at_least(1), "pretrain")
    d_ff: int = arg(512, "MLP width", at_least(1), "pretrain")
    context: int = arg(128, "tokens per pretraining sequence (and the model's max length)", at_least(1), "pretrain")
    arch: str = arg("neox", "neox (LayerNorm, GELU, rotary on a quarter, parallel residual) or llama (RMSNorm,"
                    " SwiGLU, full rotary, sequential residual)", one_of("neox", "llama"), "pretrain", True)
    # pretraining
    pretrain_epochs: int = arg(16, "passes over the biographies", at_least(1), "pretrain")
    pretrain_batch: int = arg(16, "sequences per pretraining step", at_least(1), "pretrain")
    pretrain_lr: float = arg(5e-3, "peak pretraining learning rate (AdamW)", POSITIVE, "pretrain")
    pretrain_min_lr: float = arg(5e-4, "cosine floor of the pretraining learning rate", at_least(0), "pretrain")
    pretrain_warmup: int = arg(100, "linear warm-up steps", at_least(0), "pretrain")
    pretrain_wd: float = arg(0.1, "pretraining weight decay", at_least(0), "pretrain")
    eval_subset: int = arg(600, "QA pairs per set at frequent evaluations (a task's end, and the current task under"
                           " --early-stop, use all)", at_least(1), "pretrain")
    # fine-tuning on QA (loss on the answer and EOS only), with AdamW (betas 0.9 and --ft-beta2)
    ft_batch: int = arg(48, "QA pairs per fine-tuning step (replay: half of them old)", at_least(2), "task0")
    ft_lr: float = arg(1e-4, "learning rate of every fine-tuning stage: Task 0, Tasks 1..K and the recovery probe"
                       " (the paper: 5e-6 for all)", POSITIVE, "task0")
    ft_end_share: float = arg(1.0, "the fine-tuning lr falls (cosine) to this share of itself over each run (1 ="
                              " constant)", share(low_open=True), "task0", True)
    ft_wd: float = arg(0.01, "fine-tuning weight decay", at_least(0), "task0")
    ft_beta2: float = arg(0.98, "fine-tuning AdamW beta2", ((lambda v: 0 <= v < 1), "a number in [0, 1)"), "task0", True)
    ft_eps: float = arg(1e-6, "fine-tuning AdamW eps", POSITIVE, "task0", True)
    ft_clip: float = arg(1.0, "fine-tuning gradient-norm clipping (0 = none)", at_least(0), "task0", True)
    optimizer_scope: str = arg("task", "task: a fresh AdamW per task; sequence: one AdamW for the task sequence (its"
                               " moments carried on)", one_of("task", "sequence"), "task0", True)
    task0_epochs: int = arg(7, "passes over Task 0's QA (the paper: 10; ours peaks at 7)", at_least(1), "task0")
    # the new tasks, through a continual-learning strategy (strategies.py; its own settings are flags too)
    strategy: str = arg("seq", f"one of {', '.join(STRATEGIES)}", one_of(*STRATEGIES))
    strategy_args: dict = field(default_factory=dict, metadata={"help": "strategy hyper-parameters by field name"})
    task_epochs: int = arg(60, "passes over each new task's QA pairs (the paper: 25)", at_least(1), "task")
    early_stop: float = arg(0.99, "stop a task once its exact match reaches this (0 = never)", share(), "task")
    stopping: str = arg("every", "every: --early-stop ends every method's task; authors: only freeze stops, with"
                        " twice the epochs, as the authors ran it", one_of("every", "authors"), "task", True)
    checkpoint_steps: str = arg("10,20,50,100,150,200", "Task-1 steps to save and probe (and the end); the paper's:"
                                " $(seq -s, 5 5 200)", stage="task")
    dense_every: int = arg(5, "evaluate Task 0 every this many steps early in a new task ...", at_least(1), "task")
    dense_until: int = arg(200, "... up to this step ...", at_least(0), "task")
    sparse_every: int = arg(50, "... and every this many after; the new task (all its pairs) at these steps",
                            at_least(1), "task")
    recover_fraction: float = arg(0.1, "recovery-probe steps as a share of Task 1's (the paper: 6,250 of 62,500)",
                                  share(low_open=True), "recover")
    # how the run is kept (none of these changes a result)
    state_every: int = arg(50, "save a resumable training state every this many steps", at_least(1))
    runs: str = arg("runs", "directory where stages are cached", ((lambda v: v != ""), "a directory"))
    precision: str = arg("auto", "bf16 autocast of the matrix products, or fp32; auto: bf16 on a GPU, fp32 on a CPU"
                         " (runs.precision)", one_of("auto", "bf16", "fp32"))

    def __post_init__(self):
        """Check every setting (strategies.check_settings: types, finite numbers, ranges), then how they fit
        together, so that a config built in Python is refused like a bad flag, before any stage is written."""
        check_settings(self)
        steps = sorted(set(numbers(self.checkpoint_steps))) or [-1]
        if steps[0] < 0:
            raise ValueError(f"--checkpoint-steps {self.checkpoint_steps!r}: expected step numbers like 0,10,20")
        self.checkpoint_steps = ",".join(map(str, steps))  # one cache key however the steps were listed
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: expected one of {', '.join(PRESETS)}")
        with runs.flag_error(f"--name-pools {self.name_pools!r}"):
            data_config(self)
        with runs.flag_error(f"--d-model {self.d_model} --n-head {self.n_head}"):
            if self.d_model % self.n_head:
                raise ValueError("expected a number of heads that divides the width")
            model_config(self, vocab_size=data.token_limits(data_config(self).name_pools)["vocab_size"])
        with runs.flag_error(f"--context {self.context}"):
            data.check_context(self.context, data_config(self))
        check_strategy_args(self.strategy_args, n_layer=self.n_layer, n_tasks=self.n_tasks)


# The authors' two fine-tuning pipelines (docs/paper.md): the dense curves and the recovery probe come from an
# HF-Trainer one, the methods table from a continual-learning framework. --pipeline sets a group at once.
PIPELINES = {
    "trainer": dict(ft_beta2=0.999, ft_eps=1e-6, ft_clip=1.0, ft_wd=0.01, ft_end_share=0.9, optimizer_scope="task",
                    stopping="authors"),
    "framework": dict(ft_beta2=0.999, ft_eps=1e-8, ft_clip=0.0, ft_wd=5e-4, ft_end_share=1.0,
                      optimizer_scope="sequence", stopping="authors"),
}


# Every preset, in one table: what differs from the defaults above (the cpu preset), strategy settings included.
PRESETS = {
    "tiny": dict(people=50, task_size=25, n_tasks=2, name_pools="5,5,5",
                 n_layer=2, d_model=32, n_head=2, d_ff=64, context=64,
                 pretrain_epochs=2, pretrain_batch=8, pretrain_warmup=2, ft_batch=16, task0_epochs=1,
                 task_epochs=2, recover_fraction=0.5, checkpoint_steps="0,2,4", eval_subset=48, dense_every=2,
                 dense_until=6, sparse_every=4, state_every=3,
                 strategy_args=dict(gp_window="1,3", gp_runs=2, tv_every=1)),
    "cpu": dict(),
    # A thin model twice as deep as cpu's, for the freeze sweep over k = 0..8 (paper Fig. 7a) in <= 30 min: 3/5 of
    # the cpu population; fine-tuning lr 2e-4 (at 1e-4 it had not learnt Task 1 to 0.99 in 60 epochs).
    "deep": dict(people=300, task_size=120, name_pools="15,15,20",
                 n_layer=8, d_model=96, n_head=4, d_ff=384, pretrain_epochs=20, ft_lr=2e-4, dense_until=0),
    # The paper's scale and name pools (Pythia-160M shape, 100K + 5 x 20K people).
    "paper": dict(people=100_000, task_size=20_000, n_tasks=5, name_pools="400,400,1000",
                  n_layer=12, d_model=768, n_head=12, d_ff=3072,
                  context=512, pretrain_epochs=80, pretrain_batch=96, pretrain_lr=1e-3, pretrain_min_lr=1e-4,
                  pretrain_warmup=1000, ft_wd=0.01, ft_lr=5e-6, task0_epochs=10, task_epochs=25,
                  early_stop=0.0, eval_subset=3000, sparse_every=1000, state_every=1000,
                  strategy_args=dict(freeze_layers=7, gp_window="100,150")),
    # The scale study's point nearest the paper (docs/scale): cpu's model in the Llama shape, 1,000 + 400 people,
    # fine-tuning at 1/100 of the pretraining peak in the authors' Trainer pipeline, and the 15 Task-0 epochs that
    # scale.py's rule chose there. About an hour a seed for the headline on 2 cores.
    "llama-1k": dict(people=1000, task_size=400, name_pools="50,50,70", arch="llama", ft_lr=5e-5, task0_epochs=15,
                     **PIPELINES["trainer"]),
}


def preset_config(name, **settings):
    """The TrainConfig of preset `name`, with `settings` changed."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    return TrainConfig(**(PRESETS[name] | settings | {"preset": name}))


def data_config(cfg):
    pools = tuple(numbers(cfg.name_pools))
    if len(pools) != 3:
        raise ValueError("expected three numbers like 25,25,35")
    return data.DataConfig(n_people=cfg.people, task_size=cfg.task_size, n_tasks=cfg.n_tasks, seed=cfg.seed,
                           name_pools=pools)


def model_config(cfg, vocab_size):
    shape = dict(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, d_ff=cfg.d_ff,
                 max_seq_len=cfg.context)
    if cfg.arch == "llama":
        return ModelConfig(model_type="llama", norm="rmsnorm", rotary_pct=1.0, mlp="swiglu", parallel_residual=False,
                           attn_bias=False, mlp_bias=False, **shape)
    return ModelConfig(model_type="gpt_neox", **shape)


# -----------------------------------------------------------------------------------------------
# The data of one configuration on the device: QA sets as tensors (data.QASet, which draws their epochs)

class Experiment:
    """The dataset, tokenizer and QA sets of one configuration, on the device, for the stages built on them."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = f"cuda:{runs.DIST.local_rank}" if torch.cuda.is_available() else "cpu"
        self.tok = data.build_tokenizer()
        self.bio = data.build_dataset(data_config(cfg), self.tok)
        self.qa = {}

    def qa_set(self, split):
        if split not in self.qa:
            self.qa[split] = QASet.from_arrays(data.qa_arrays(self.bio, self.bio.splits[split], self.tok), self.device)
        return self.qa[split]

    def eval_fn(self, split, full=False):
        qa = self.qa_set(split)
        if not full and len(qa) > self.cfg.eval_subset:  # a fixed subset, the same at every evaluation
            if (split, "subset") not in self.qa:
                rng = np.random.default_rng([self.cfg.seed, 11])
                self.qa[split, "subset"] = qa.subset(sorted(rng.choice(len(qa), self.cfg.eval_subset, replace=False)))
            qa = self.qa[split, "subset"]
        return lambda model: evaluate(model, qa, self.tok)

    def exact_match(self, model, task):
        """Exact match of Task 0 (its test people) or of Task k (its own pairs), on the fixed subsets."""
        return self.eval_fn("task0_test" if task == 0 else f"task{task}")(model)["em"]

    def context(self, model, task):
        """What a strategy's hooks see while `model` trains on `task` (strategies.Context)."""
        return Context(model=model, task=task, tok=self.tok, seed=self.cfg.seed, batch_size=self.cfg.ft_batch,
                       train=[self.qa_set("task0_train")] + [self.qa_set(f"task{j}") for j in range(1, task + 1)],
                       fit=functools.partial(fine_tuning_steps, cfg=self.cfg),
                       evaluate=self.exact_match)

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
    beta2: float = 0.98      # AdamW's (beta1 is 0.9)
    eps: float = 1e-6
    clip: float = 1.0        # gradient-norm clipping; 0 = none
    moments: dict = None     # AdamW moments by parameter name to start from (runs.load_moments), or a fresh AdamW
    strategy: object = field(default_factory=Seq)  # its per-step hooks (strategies.py); start/end run outside
    ctx: Context = None                              # what the hooks see
    # name -> (model -> metrics, the steps to run it at); 'current' drives early stopping. All run at the end.
    evals: dict = field(default_factory=dict)
    early_stop: float = 0.0
    save_steps: set = field(default_factory=set)


def every_epoch(epochs, steps_per_epoch, every=1):
    """Step 0, every `every`-th epoch's end, and the last step."""
    return set(range(0, epochs * steps_per_epoch + 1, every * steps_per_epoch)) | {epochs * steps_per_epoch}


def lr_at(step, phase):
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    progress = (step - phase.warmup) / max(1, phase.total - phase.warmup)
    return phase.min_lr + (phase.lr - phase.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(model, phase: Phase, out, cfg, tok, resume, meter):
    """Train one stage into `out`; returns (steps taken, stopped early?, the optimizer). Frozen parameters
    (requires_grad False) stay out of the optimizer, and so bit-identical. `meter` adds up where the time goes."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=phase.lr, weight_decay=phase.weight_decay, beta2=phase.beta2, eps=phase.eps)
    if phase.moments:
        runs.set_moments(model, opt, phase.moments)
    strategy, ctx = phase.strategy, phase.ctx
    step, stopped = runs.resume_stage(model, opt, out, phase.name, meter) if resume else runs.start_stage(out)
    if ctx is not None:
        ctx.step = step  # a strategy's end() reads it, even when the resumed stage has no step left to take
    net = model if runs.DIST.world == 1 else torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    bf16 = runs.precision(cfg, params[0].device.type) == "bf16"

    def log(extra):
        """Evaluate (rank 0) and append one line to metrics.jsonl: a kill loses at most that line."""
        if not runs.DIST.main:
            return {}
        with meter.time("eval"):
            record = {"stage": phase.name, "step": step, **extra} | {
                name: fn(model) for name, (fn, points) in phase.evals.items() if step in points or step == phase.total}
        runs.append_metrics(out, record)
        return record

    def checkpoint():
        with meter.time("checkpoint"):
            runs.save_checkpoint(model, tok, path=os.path.join(out, "ckpt", f"step-{step:07d}"),
                            info={"step": step, "task": phase.task})

    eval_points = set().union(*(points for _, points in phase.evals.values()))
    if step == 0:
        if 0 in eval_points:
            log({})
        if 0 in phase.save_steps:
            checkpoint()
    bar = tqdm(total=phase.total, initial=step, desc=phase.name, leave=False, dynamic_ncols=True, disable=not runs.DIST.main)
    batches = None
    while step < phase.total and not stopped:
        with meter.time("train"):
            epoch, i = divmod(step, phase.steps_per_epoch)
            if i == 0 or batches is None:  # each epoch's order comes from its own seeded generator: resumable
                batches = list(phase.make_epoch(np.random.default_rng([cfg.seed, phase.task + 1, epoch])))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, phase)
            local_batch, weight = runs.shard(batches[i])
            loss = train_step(net, opt, params, local_batch, strategy, ctx, weight, bf16=bf16, clip=phase.clip)
            meter.count(model, batches[i][0], batches[i][2])  # the whole global batch
            step += 1
            logged = step in eval_points or step == phase.total
            if step % 10 == 0 or logged:  # reading the loss waits for the step to finish: not every step, on a GPU
                loss_value = runs.mean_over_ranks(loss, weight)
        if ctx is not None:
            ctx.step = step
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if logged:
            record = log({"loss": loss_value, "lr": opt.param_groups[0]["lr"]})
            stopped = runs.agree(phase.early_stop > 0 and record.get("current", {}).get("em", 0) >= phase.early_stop)
        if step in phase.save_steps:
            checkpoint()
        if step % cfg.state_every == 0 or step == phase.total or stopped:
            with meter.time("checkpoint"):
                runs.save_state(model, opt, out=out, step=step, stopped=stopped, meter=meter)
    bar.close()
    runs.barrier()  # the others may now read what rank 0 wrote
    return step, stopped, opt


def train_step(model, opt, params, batch, strategy, ctx, weight=None, bf16=False, clip=1.0):
    """One optimizer step on batch = (inputs, targets, loss_mask, [what a strategy adds]); returns the loss. bf16:
    matrix products under autocast (all else fp32: the loss is fp32 logits' cross-entropy). `weight` scales this
    rank's loss (runs.shard). clip: the gradient norm is clipped to this (0: not clipped)."""
    inputs, targets, mask = batch[:3]
    with runs.autocast(inputs.device.type, bf16):
        _, loss = model(inputs, targets, loss_mask=mask)
        loss = strategy.loss(ctx, batch, loss)
    (loss if weight is None else loss * weight).backward()
    strategy.after_backward(ctx)
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def make_optimizer(params, lr, weight_decay, beta2=0.98, eps=1e-6):
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay on norms, biases
    # Fused on a GPU (one kernel for every tensor); on a CPU the foreach form, which gives the same bits as the
    # plain loop (checked) in fewer calls. (CPU-fused AdamW is faster still but rounds differently.)
    cuda = params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=eps, fused=cuda or None, foreach=not cuda or None)


def fine_tuning(cfg):
    """What every fine-tuning phase shares: one learning rate (no warm-up; constant unless --ft-end-share) and the
    fine-tuning AdamW."""
    return dict(lr=cfg.ft_lr, min_lr=cfg.ft_lr * cfg.ft_end_share, warmup=0, weight_decay=cfg.ft_wd,
                beta2=cfg.ft_beta2, eps=cfg.ft_eps, clip=cfg.ft_clip)


def fine_tuning_steps(model, qa, seed, cfg):
    """Plain fine-tuning of `model` on `qa` at the constant fine-tuning lr, one step per item, forever: the
    preliminary runs some strategies make before a task (gradient projection)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=cfg.ft_lr, weight_decay=cfg.ft_wd, beta2=cfg.ft_beta2, eps=cfg.ft_eps)
    bf16 = runs.precision(cfg, params[0].device.type) == "bf16"
    for epoch in itertools.count():
        for batch in qa.epoch(cfg.ft_batch, np.random.default_rng([*seed, epoch])):
            train_step(model, opt, params, batch, strategy=Seq(), ctx=None, bf16=bf16, clip=cfg.ft_clip)
            yield


# -----------------------------------------------------------------------------------------------
# The stages: pretrain -> Task 0 -> Tasks 1..K -> the recovery probe, each cached in its own directory

def pretrain(exp, stage):
    """Pretraining from scratch on the biographies of every pretraining person: the knowledge."""
    c = exp.cfg
    model = exp.initial_model().to(exp.device)
    print(f"  model: {model.num_params() / 1e6:.2f}M parameters, vocabulary {exp.tok.vocab_size}")
    entries = exp.bio.bio_token_ids(exp.bio.splits["pretrain"])
    n_blocks = sum(len(e) + 1 for e in entries) // (c.context + 1)  # what pack_pretraining makes, any order
    steps_per_epoch = math.ceil(n_blocks / c.pretrain_batch)

    def epoch(rng):  # the biographies packed into rows of context + 1 tokens, in a new order each epoch
        blocks = torch.as_tensor(data.pack_pretraining(entries, c.context, exp.tok.eos_id, rng), device=exp.device)
        return [(rows[:, :-1], rows[:, 1:], None) for rows in blocks.split(c.pretrain_batch)]

    phase = Phase("pretrain", task=-1, total=c.pretrain_epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                  make_epoch=epoch, lr=c.pretrain_lr, min_lr=c.pretrain_min_lr, warmup=c.pretrain_warmup,
                  weight_decay=c.pretrain_wd,
                  evals={"bio": (exp.bio_probe(), every_epoch(c.pretrain_epochs, steps_per_epoch, every=4))},
                  save_steps={c.pretrain_epochs * steps_per_epoch // 2})  # halfway: for analysis.py's weight angles
    train_loop(model, phase, out=stage.out, cfg=c, tok=exp.tok, resume=stage.resume, meter=stage.meter)
    with stage.meter.time("checkpoint"):
        runs.save_checkpoint(model, exp.tok, os.path.join(stage.out, "final"),
                             {"stage": "pretrain", "step": phase.total})
    result = runs.read_metrics(stage.out)[-1]["bio"]  # the probe the loop ran at its last step
    print(f"  pretraining done: biography attribute first-token accuracy {result['first_token']:.3f}")
    return {"bio": result}


def task(exp, stage, k):
    """Task 0 (QA of half the pretraining people: the alignment) or a new task k (QA of new people), from the
    model the stage before ended with, through the strategy's hooks."""
    c = exp.cfg
    model = runs.load_checkpoint(os.path.join(stage.prev_dir, "final"), exp.device)
    strategy = make_strategy(c.strategy, c.strategy_args)
    if k == 0 and not strategy.changes_task0:
        strategy = Seq()  # so that every method starts from one shared Task-0 run
    runs.load_strategy_state(strategy, os.path.join(stage.prev_dir, "final"), exp.device)
    ctx = exp.context(model, task=k)
    with stage.meter.time("strategy"):
        strategy.start(ctx)
    steps_per_epoch = len(strategy.epoch(ctx, np.random.default_rng(0)))
    # --stopping authors: each method as the authors ran it (freeze: twice the epochs, stopped at --early-stop;
    # the others: the whole budget, where the report reads both the first step past --early-stop and the end)
    authors = c.stopping == "authors" and k > 0
    epochs = c.task0_epochs if k == 0 else c.task_epochs * (strategy.authors_epoch_factor if authors else 1)
    stops = k > 0 and (strategy.authors_early_stop or not authors)
    total = epochs * steps_per_epoch
    if k == 0:  # once an epoch
        evals = {"task0": (exp.eval_fn("task0_test"), every_epoch(epochs, steps_per_epoch))}
    else:  # Task 0 densely on a fixed subset, as the forgetting happens early; the new task, which is
        # learnt slowly, every `sparse_every` steps on all its pairs, since early stopping judges it whole
        sparse = set(range(0, total + 1, c.sparse_every))
        dense = set(range(0, min(total, c.dense_until) + 1, c.dense_every)) | sparse
        evals = {"task0": (exp.eval_fn("task0_test"), dense),
                 "current": (exp.eval_fn(stage.name, full=c.early_stop > 0), sparse)}
    save_steps = {int(s) for s in c.checkpoint_steps.split(",")} if k == 1 else set()
    # One learning rate for every fine-tuning stage, as in the paper: a larger one for the new tasks would
    # move the weights further than Task 0 did and mix real forgetting into the spurious kind.
    carried = c.optimizer_scope == "sequence" and k > 0  # one AdamW for the sequence: the last task's moments
    phase = Phase(stage.name, task=k, total=total, steps_per_epoch=steps_per_epoch,
                  make_epoch=lambda rng: strategy.epoch(ctx, rng), **fine_tuning(c), strategy=strategy, ctx=ctx,
                  moments=runs.load_moments(os.path.join(stage.prev_dir, "final")) if carried else None,
                  evals=evals, early_stop=c.early_stop if stops else 0.0,
                  save_steps=save_steps | strategy.checkpoint_steps(steps_per_epoch, total))
    steps, stopped, opt = train_loop(model, phase, out=stage.out, cfg=c, tok=exp.tok, resume=stage.resume,
                                     meter=stage.meter)
    ctx.checkpoints = runs.saved_checkpoints(stage.out)
    with stage.meter.time("strategy"):
        strategy.end(ctx)
    with stage.meter.time("checkpoint"):
        runs.save_checkpoint(model, exp.tok, os.path.join(stage.out, "final"), {"stage": stage.name, "step": steps},
                             strategy=strategy, optimizer=opt if c.optimizer_scope == "sequence" else None)
    if not runs.DIST.main:
        return {}  # rank 0 alone evaluates and reports
    with stage.meter.time("eval"):  # full evaluation on every task so far: row k of the accuracy matrix R
        row = {"task0": evaluate(model, exp.qa_set("task0_test"), exp.tok)}
        row |= {f"task{j}": evaluate(model, exp.qa_set(f"task{j}"), exp.tok) for j in range(1, k + 1)}
    print(f"  {stage.name} done after {steps} steps{' (early stop)' if stopped else ''}: "
          + ", ".join(f"{name} EM {r['em']:.3f}" for name, r in row.items()))
    return {"steps": steps, "stopped_early": stopped, "strategy": strategy.label(), "results": row,
            "accuracy_row": [r["em"] for r in row.values()], "strategy_state": strategy.state()[1]}


def recover(exp, stage):
    """The recovery probe (the paper's): a copy of a checkpoint is fine-tuned on the QA of *all* Task-0 training
    people, at the fine-tuning lr, for a tenth of Task 1's steps; then exact match on the Task-0 *test* people,
    whose QA no stage ever trained. If it comes back, the knowledge was still in the weights and only the task
    alignment was lost. The pretrained and Task-0 checkpoints, probed alike, give the ceiling (no forgetting yet)."""
    c = exp.cfg
    task1_dir, task1_steps, probes = runs.recovery_checkpoints(c)  # pretrained, Task 0, Task 1's saved steps and end
    train_qa, test = exp.qa_set("task0_train"), exp.eval_fn("task0_test", full=True)
    probe_steps = max(1, round(c.recover_fraction * task1_steps))
    print(f"  probing {len(probes)} checkpoints, {probe_steps} steps each ({c.recover_fraction:g} of Task 1's"
          f" {task1_steps})")
    rows = []
    for name, path, task1_step in tqdm(probes, desc="recover", leave=False, disable=not runs.DIST.main):
        probe_dir, result_path = os.path.join(stage.out, name), os.path.join(stage.out, name, "result.json")
        if os.path.exists(result_path):  # done before an interruption
            rows.append(runs.read_json(result_path))
            runs.resume_meter(stage.meter, probe_dir)
            continue
        model = runs.load_checkpoint(path, exp.device)
        with stage.meter.time("eval"):
            before = test(model) if runs.DIST.main else None  # rank 0 alone evaluates
        phase = Phase(f"recover {name}", task=0, total=probe_steps,
                      steps_per_epoch=math.ceil(len(train_qa) / c.ft_batch),
                      make_epoch=lambda rng: train_qa.epoch(c.ft_batch, rng), **fine_tuning(c))
        os.makedirs(probe_dir, exist_ok=True)
        train_loop(model, phase, out=probe_dir, cfg=c, tok=exp.tok, resume=stage.resume, meter=stage.meter)
        if runs.DIST.main:
            with stage.meter.time("eval"):
                after = test(model)
            rows.append({"checkpoint": name, "task1_step": task1_step, "task0_em_before": before["em"],
                         "task0_em_after": after["em"], "before": before, "after": after})
            runs.write_json(result_path, rows[-1])
        runs.barrier()
    if not runs.DIST.main:
        return {}
    ceiling = max(rows[0]["task0_em_after"], rows[1]["task0_em_after"])  # probed before anything was forgotten
    for row in rows:
        row["recovered_share"] = row["task0_em_after"] / ceiling if ceiling else float("nan")
    return {"task1_run": os.path.basename(task1_dir), "probe_steps": probe_steps, "ceiling": ceiling, "rows": rows}


def stage_names(cfg):
    return ["pretrain", "task0"] + [f"task{k}" for k in range(1, cfg.n_tasks + 1)] + ["recover"]


def run_protocol(cfg, until="recover", resume=False):
    """Every stage up to `until`, in order; returns the directory of `until`. A stage found complete in the cache
    (runs.build_stage) is read, not rebuilt, and the stages before it are not needed again."""
    exp = Experiment(cfg)
    chain = ([("pretrain", functools.partial(pretrain, exp))]
             + [(f"task{k}", functools.partial(task, exp, k=k)) for k in range(cfg.n_tasks + 1)]
             + [("recover", functools.partial(recover, exp))])
    chain = chain[:stage_names(cfg).index(until) + 1]
    complete = [i for i, (name, _) in enumerate(chain) if runs.is_complete(runs.stage_dir(cfg, name)[0])]
    out = None
    for name, build in chain[complete[-1] if complete else 0:]:
        out = runs.build_stage(cfg, name, build, resume, prev_dir=out)
    return out


# -----------------------------------------------------------------------------------------------
# The command line

def parse_args(argv):
    """The command line as (TrainConfig, stage, resume, seeds): a preset, an authors' pipeline, then the flags given."""
    return runs.parse_command_line(argv, __doc__, TrainConfig, PRESETS, PIPELINES, config_fields(), report.COMMANDS,
                                   stage_names)


def main(argv=None):
    """pretrain -> Task 0 -> Tasks 1..K -> the recovery probe -> the printed report; or a command of report.py,
    which runs the protocol for several configurations."""
    cfg, stage, resume, seeds = parse_args(argv)
    with runs.process_setup(os.path.join(cfg.runs, cfg.preset)):
        run = functools.partial(run_protocol, resume=resume)
        if stage in report.COMMANDS:
            return report.COMMANDS[stage](cfg, run=run, seeds=seeds)
        if resume:
            runs.check_resumable(cfg)
        out = run(cfg, until=stage)
        report.print_report(cfg)
        return out


if __name__ == "__main__":
    runs.cli(main)
