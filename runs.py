"""The plumbing under train.py: files, the stage cache, several processes, the device, time, one run at a time.
Nothing here is the experiment; train.py calls these by name.

    files        write_json, read_json, read_jsonl: every write atomic; checkpoints and resumable training states
    stage cache  stage_dir: runs/<preset>/<stage>[-<strategy>]-<hash of every setting that shaped the stage>
    processes    init_distributed, shard, mean_over_ranks, agree, barrier: torchrun and DDP (DIST: this rank)
    device       precision and autocast: bf16 where the hardware has it; sync
    time         Meter: where a stage's time goes, and its useful FLOPs
    one run      process_setup(): malloc settings, the process group and the run lock; cli(): one-line errors
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import functools
import glob
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
from model import Transformer, atomic_write, read_safetensors, write_safetensors
from model import write_json as atomic_write_json
from strategies import make_strategy


class UserError(Exception):
    """A mistake in the command line or in files given to us: reported in one line, no traceback."""

# -----------------------------------------------------------------------------------------------
# Files: every write is atomic (model.atomic_write: temporary file, then rename), so an interrupted run
# loses nothing.


def write_text(path, text):
    if not DIST.main:  # under torchrun, rank 0 alone writes files
        return
    with atomic_write(path) as f:
        f.write(text)


def write_json(path, obj):
    if DIST.main:  # under torchrun, rank 0 alone writes files
        atomic_write_json(path, obj)


def read_json(path):
    with open(path) as f:
        return json.load(f)


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


def read_metrics(run_dir):
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def save_checkpoint(model, tok, path, info, strategy=None, optimizer=None):
    """An HF checkpoint directory plus tokenizer.json and training_state.json, appearing all at once; with
    a strategy, also what it carries to the next task (strategy.safetensors + strategy.json); with an optimizer,
    its AdamW moments by parameter name (optimizer.safetensors), for a next task that carries them on."""
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
    if optimizer is not None:
        names = {p: name for name, p in model.named_parameters()}
        write_safetensors(os.path.join(tmp, "optimizer.safetensors"),
                          {f"{names[p]}.{k}": v.reshape(1).cpu() if v.dim() == 0 else v.cpu().contiguous()
                           for p, moments in optimizer.state.items() for k, v in moments.items()})
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


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


def load_moments(checkpoint):
    """The AdamW moments a task left beside its checkpoint (save_checkpoint): {parameter name: {exp_avg, ...}}."""
    path = os.path.join(checkpoint, "optimizer.safetensors")
    try:
        tensors = read_safetensors(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the optimizer moments {path} (--optimizer-scope sequence): {e}") from None
    moments = {}
    for key, v in tensors.items():
        name, kind = key.rsplit(".", 1)
        moments.setdefault(name, {})[kind] = v.reshape(()) if kind == "step" else v
    return moments


def set_moments(model, opt, moments):
    """Start `opt` from saved moments (load_moments), for the parameters it trains."""
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if id(p) in trained and name in moments:
            # AdamW keeps its step count on the CPU, except the fused kind, which keeps it beside the parameter
            opt.state[p] = {k: v.to(p.device) if k != "step" or opt.defaults.get("fused") else v.clone()
                            for k, v in moments[name].items()}


def save_state(model, opt, out, step, stopped, meter):
    """Everything needed to continue a stage exactly: weights, AdamW moments, step, torch RNG, and the stage's
    time and FLOPs so far. (Batch order needs no state: each epoch's order is drawn from its own seeded generator.)"""
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
               {"step": step, "stopped_early": stopped, "param_groups": opt_state["param_groups"],
                "meter": meter.state()})
    write_json(os.path.join(state_dir, "latest.json"), {"dir": name})  # the switch-over is this one rename
    for old in os.listdir(state_dir):
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(state_dir, old), ignore_errors=True)


def start_stage(out):
    """A stage's training from step 0, with an empty metrics.jsonl. Returns (step, stopped early?)."""
    write_text(os.path.join(out, "metrics.jsonl"), "")
    return 0, False


def resume_stage(model, opt, out, name, meter):
    """Continue a stage's training from its last saved state, dropping the metrics recorded after it and
    carrying on the meter's counts; with no complete state (no state/latest.json: a kill before the first one
    was written), start it over. Returns (step, stopped early?)."""
    if not os.path.exists(os.path.join(out, "state", "latest.json")):
        return start_stage(out)
    step, stopped = load_state(model, opt, out, meter)
    print(f"  {name}: resuming at step {step}")
    path = os.path.join(out, "metrics.jsonl")
    write_text(path, "".join(json.dumps(record) + "\n" for record in read_jsonl(path) if record["step"] <= step))
    return step, stopped


def append_metrics(out, record):
    """One more line of out/metrics.jsonl: a kill loses at most that line."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def resume_meter(meter, out):
    """Carry on the time and FLOPs counted up to out's last saved state, if it has one: a training loop that
    finished before an interruption keeps its last state until the stage completes (train.recover's probes)."""
    latest = os.path.join(out, "state", "latest.json")
    if not os.path.exists(latest):
        return
    try:
        meter.restore(read_json(os.path.join(out, "state", read_json(latest)["dir"], "state.json"))["meter"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot resume the time and FLOPs counted in {out}/state: {e!r}") from None


def load_state(model, opt, out, meter):
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
        meter.restore(meta["meter"])
        return meta["step"], meta["stopped_early"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot resume from {path}: {e}") from None

# -----------------------------------------------------------------------------------------------
# The stage cache


@dataclass
class Stage:
    """A stage being built (build_stage): its name, its directory, whether to continue an interrupted run there,
    where its time goes, and the directory of the stage before it."""
    name: str
    out: str
    resume: bool
    meter: "Meter"
    prev_dir: str = None


def build_stage(cfg, name, build, resume, prev_dir=None):
    """Stage `name` of cfg in its cache directory (stage_dir): read if complete (its summary.json exists), else
    built there by build(Stage) -> summary, with a record of the settings and the machine, and the time it
    took. An interrupted build is started over, or continued with `resume`. Returns the directory."""
    out, settings = stage_dir(cfg, name)
    if is_complete(out):
        print(f"{name}: cached in {out}")
        return out
    if os.path.exists(out) and not resume and DIST.main:
        print(f"{name}: {out} holds an interrupted run; starting it over (--resume continues it)")
        shutil.rmtree(out)
    barrier()
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "settings.json"), {"stage": name, "settings": settings, **environment()})
    print(f"{name}: training into {out}")
    stage = Stage(name, out, resume, Meter(), prev_dir)
    summary = build(stage)
    seconds = stage.meter.elapsed()  # every leg of a resumed stage, up to its last saved state, and this one
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    summary |= {"stage": name, "seconds": round(seconds, 1), **stage.meter.summary(seconds), "settings": settings,
                "precision": precision(cfg, device_type), **environment()}
    write_json(os.path.join(out, "summary.json"), summary)
    if DIST.main:
        for state in glob.glob(os.path.join(out, "**", "state"), recursive=True):  # complete: no resume needed
            shutil.rmtree(state)
    barrier()
    return out


def check_resumable(cfg):
    """--resume needs something to resume: at least the first stage's directory for these settings."""
    if not os.path.exists(stage_dir(cfg, "pretrain")[0]):
        raise UserError(f"--resume: nothing to resume under {os.path.join(cfg.runs, cfg.preset)} for these settings")


def is_complete(out):
    return os.path.exists(os.path.join(out, "summary.json"))


def saved_checkpoints(run_dir):
    """{step: directory} of the checkpoints a stage saved along the way (its ckpt/step-NNNNNNN)."""
    ckpt_dir = os.path.join(run_dir, "ckpt")
    if not os.path.isdir(ckpt_dir):
        return {}
    return {int(name[5:]): os.path.join(ckpt_dir, name) for name in sorted(os.listdir(ckpt_dir))
            if not name.endswith(".tmp")}


def recovery_checkpoints(cfg):
    """What the recovery probe fine-tunes, as (Task 1's directory, its steps, [(name, checkpoint, Task-1 step or
    None)]): the pretrained and Task-0 models (in that order: they give the ceiling), Task 1's saved steps but step
    0 (the Task-0 model again) and Task 1's end."""
    task1_dir = stage_dir(cfg, "task1")[0]
    task1_steps = read_json(os.path.join(task1_dir, "final", "training_state.json"))["step"]
    saved = saved_checkpoints(task1_dir)
    probes = [("pretrained", os.path.join(stage_dir(cfg, "pretrain")[0], "final"), None),
              ("task0", os.path.join(stage_dir(cfg, "task0")[0], "final"), None)]
    probes += [(os.path.basename(path), path, step) for step, path in saved.items() if step != 0]
    if task1_steps not in saved:  # Task 1 may have ended on a saved step
        probes.append(("final", os.path.join(task1_dir, "final"), task1_steps))
    return task1_dir, task1_steps, probes


STAGE_KINDS = ("pretrain", "task0", "task", "recover")  # in the order they run; task = any of Tasks 1..K


def stage_dir(cfg, stage):
    """runs/<preset>/<stage>[-<strategy>]-<hash of every setting that shaped this stage and those before it>:
    the TrainConfig fields whose metadata names this stage's kind or an earlier one (those marked keyed_when_changed
    only when not at their default), the vocabulary, the precision where it is not a CPU's fp32, and the strategy
    with every one of its settings. Returns the directory and those settings."""
    kind = stage if stage in STAGE_KINDS else "task"
    earlier = STAGE_KINDS[:STAGE_KINDS.index(kind) + 1]
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("stage") in earlier
                and not (f.metadata.get("keyed_when_changed") and getattr(cfg, f.name) == f.default)}
    settings |= {"vocabulary": vocabulary_digest()}
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if PRECISION_KEYS[device_type, precision(cfg, device_type)]:  # other numbers: never another precision's stages
        settings |= {"precision": PRECISION_KEYS[device_type, precision(cfg, device_type)]}
    strategy = make_strategy(cfg.strategy, cfg.strategy_args)
    uses_strategy = stage != "pretrain" and (stage != "task0" or strategy.changes_task0)
    if uses_strategy:  # the method and every one of its hyper-parameters, defaults included
        settings |= {"strategy": strategy.name, "strategy_config": strategy_key(strategy.config)}
    label = f"{stage}-{strategy.label()}" if uses_strategy else stage
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cfg.runs, cfg.preset, f"{label}-{digest}"), settings


def strategy_key(config):
    """A strategy's settings for the cache key: all of them, except those marked keyed_when_changed, which count
    only when they differ from their defaults (so that a key stays the same when such a setting is added)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if not (f.metadata.get("keyed_when_changed") and getattr(config, f.name) == f.default)}


@functools.cache
def vocabulary_digest():
    """Edited pools give another vocabulary, and so other token ids: part of every cache key."""
    return hashlib.sha256("\n".join(data.build_tokenizer().vocab).encode()).hexdigest()[:10]


def environment():
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads",
            "processes": DIST.world}

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
    inputs, targets, mask, *extra = batch  # extra: what a strategy adds per row (LAMOL's markers)
    if DIST.world == 1:
        return batch, None
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    rows = slice(DIST.rank, None, DIST.world)
    share = mask[rows].sum() / mask.sum()
    return (inputs[rows], targets[rows], mask[rows], *(e[rows] for e in extra)), share * DIST.world


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
# The device: bf16 where the hardware has it


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(device_type, bf16):
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def native_bf16(device_type):
    """Whether bf16 matrix products run in hardware here: on CUDA GPUs, and on CPUs with AVX512-BF16 or AMX.
    Elsewhere torch emulates them, far slower than fp32 (on an AVX2-only CPU: 1.4 against 105 GFLOP/s)."""
    if device_type == "cuda":
        return True
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def precision(cfg, device_type):
    """'bf16' or 'fp32': what --precision asks for, auto resolved for this device: bf16 on a GPU, fp32 on every
    CPU. At these model sizes bf16 has not paid on any CPU measured (bench.py precision, a whole training step:
    0.53x of fp32 on an AVX512-BF16 Xeon, about 1x on a Zen 4, 1.1x for pretraining and 0.5x for a QA step on a
    Xeon with AMX, 0.04x where it is emulated on AVX2)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device_type == "cuda" else "fp32"


# The cache key's entry per (device, precision): fp32 on a CPU adds none and bf16 on a GPU "bf16 autocast", the
# default on each, so that a default run's key does not depend on whether --precision is given.
PRECISION_KEYS = {("cpu", "fp32"): None, ("cuda", "bf16"): "bf16 autocast",
                  ("cpu", "bf16"): "bf16 autocast on cpu", ("cuda", "fp32"): "fp32 on cuda"}

# -----------------------------------------------------------------------------------------------
# Time


class Meter:
    """Where a stage's wall-clock time goes (training steps, evaluations, checkpoints, a strategy's own work)
    and the useful training FLOPs done (Transformer.flops_per_token; the loop's own forward and backward, not
    a strategy's extra passes), for its summary.json. A stage run in legs (killed, then resumed) carries the
    counts of its last saved state into the next leg (state, restore): the work done after that state in the
    killed leg is lost with it, and counted once, when it is redone."""

    def __init__(self):
        self.seconds = dict.fromkeys(("train", "eval", "checkpoint", "strategy"), 0.0)
        self.train_flops = 0.0
        self.train_tokens = 0
        self.queued = None  # the kind whose GPU work may still be running
        self.earlier, self.start = 0.0, time.perf_counter()  # the seconds of earlier legs; this leg's start

    def elapsed(self):
        return self.earlier + time.perf_counter() - self.start

    def state(self):
        """The counts so far, for a saved state (save_state)."""
        return {"seconds": self.elapsed(), "time_s": dict(self.seconds), "train_flops": float(self.train_flops),
                "train_tokens": int(self.train_tokens)}

    def restore(self, state):
        """Carry on from a saved state's counts, replacing this leg's so far (the work they count is redone)."""
        self.settle()
        self.earlier, self.start = state["seconds"], time.perf_counter()
        self.seconds = dict(state["time_s"])
        self.train_flops, self.train_tokens = state["train_flops"], state["train_tokens"]

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

# -----------------------------------------------------------------------------------------------
# One run at a time, and its errors


def keep_freed_memory():
    """Let glibc's malloc keep freed memory mapped for reuse (Linux with glibc; elsewhere nothing changes).

    Every step frees and reallocates the same few-megabyte activation buffers. By default glibc serves the
    largest with fresh pages from the kernel and hands freed memory back, so the next step faults every 4 KB
    page in again: two pretraining epochs of the cpu preset took 2.3-3.2 million page faults, 0.4-0.5 million
    with these settings (docs/engineering.md, "Speed"). The arithmetic and its bits stay the same; only the faults go.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL(None).mallopt
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # from <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MB (glibc's largest setting) come from the heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)   # free memory at the heap's top is returned only past 1 GB
    mallopt(M_TOP_PAD, 64 << 20)         # and the heap grows in 64 MB steps, not page by page


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
    """Whether pid still runs. A killed process lingers as a zombie until it is reaped (a killed torchrun's
    workers wait for the system's init, seconds at times); it holds nothing any more, so it counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        return process_state(pid) not in ("Z", "X")
    except OSError:  # no /proc (not Linux): kill's answer stands; or the process has just gone
        return not os.path.isdir("/proc")


def process_state(pid):
    """pid's state letter (R running, S sleeping, Z zombie, ...) from /proc/<pid>/stat (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # after the command name, which may hold spaces or ')'


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def process_setup(root):
    """Around one process's work: freed memory kept mapped, the torchrun group joined (and left), and the run
    lock on `root` held by rank 0."""
    keep_freed_memory()
    init_distributed()
    try:
        with RunLock(root) if DIST.main else contextlib.nullcontext():
            yield
    finally:
        if DIST.world > 1:
            torch.distributed.destroy_process_group()  # (a rank that fails ends them all: torchrun stops the rest)


def parse_command_line(argv, description, config_class, presets, pipelines, strategy_fields, commands, stage_names):
    """train.py's command line as (config, stage, resume, seeds): --stage, --seeds, --resume, --pipeline, a --flag per
    field of config_class (TrainConfig) and per strategy setting (strategy_fields: {name: (strategy, field)}). The
    config is the preset's settings, then a pipeline's, then the flags given; a strategy setting of another strategy
    than the run's is refused, except in the `commands` over several runs, which use them all."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="recover", help="stage to reach: pretrain, task0, task1..taskK, or recover"
                        f" (default); or a command of report.py over several runs: {', '.join(commands)}")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of --stage headline (default: 0,1,2)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted stages from their last saved state")
    parser.add_argument("--pipeline", choices=pipelines, help="the fine-tuning settings of one of the authors' two"
                        " pipelines (train.PIPELINES); flags given too win")
    args, (flags, given) = parse_flags(parser, argv, [
        (None, [f for f in dataclasses.fields(config_class) if f.name != "strategy_args"], "cpu preset"),
        ("strategy hyper-parameters (each applies to its own strategy)", [f for _, f in strategy_fields.values()],
         "default")])
    preset, strategy = flags.pop("preset", "cpu"), flags.get("strategy", config_class.strategy)
    if args.stage not in commands and (other := [n for n in given if strategy_fields[n][0] != strategy]):
        parser.error(f"--{other[0].replace('_', '-')} is a setting of --strategy {strategy_fields[other[0]][0]}, not"
                     f" {strategy}")
    seeds = args.seeds.split(",")
    if not all(s.isdigit() for s in seeds):
        parser.error(f"--seeds {args.seeds!r}: expected seeds like 0,1,2")
    if preset not in presets:
        parser.error(f"--preset {preset!r}: expected one of {', '.join(presets)}")
    strategy_args = presets[preset].get("strategy_args", {}) | given
    try:
        cfg = config_class(**presets[preset] | pipelines.get(args.pipeline, {}) | flags
                           | {"preset": preset, "strategy_args": strategy_args})
    except ValueError as e:
        parser.error(str(e))
    if args.stage not in stage_names(cfg) + list(commands):
        parser.error(f"--stage {args.stage!r}: expected one of {', '.join(stage_names(cfg) + list(commands))}")
    return cfg, args.stage, args.resume, [int(s) for s in seeds]


def add_flags(parser, fields, default_note):
    """A --flag for each dataclass field, of its type and with its help; None when not given."""
    for f in fields:
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                            help=f"{f.metadata['help']} ({default_note}: {f.default})")


def parse_flags(parser, argv, groups):
    """Parse argv with add_flags' --flags for each (title, dataclass fields, default note) group (title None: the
    parser's own section); returns (args, one {field name: value} per group, of the flags given)."""
    for title, fields, default_note in groups:
        add_flags(parser if title is None else parser.add_argument_group(title), fields, default_note)
    args = parser.parse_args(argv)
    return args, [{f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
                  for _, fields, _ in groups]


@contextlib.contextmanager
def flag_error(flags):
    """A check of `flags` that fails (a ValueError) fails as one ValueError that names them."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{flags}: {e}") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (the usage of a parser with 60 flags would bury it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def cli(main, argv=None):
    """main(argv) for the command line: a user's mistake or a disk problem is one line, not a traceback."""
    try:
        return main(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        sys.exit(f"error: {e.filename or 'writing'}: {e.strerror}; the last complete state is kept (--resume continues)")
