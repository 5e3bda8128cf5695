"""Benchmarks that print ratios, not pass/fail: run them by hand; the figures are in docs/engineering.md.

    python bench.py model     # training tokens/s, our Transformer vs transformers' GPTNeoXForCausalLM
    python bench.py flops     # training FLOP/s as a share of this machine's measured matmul peak
    python bench.py eval      # exact-match evaluation (evaluation.evaluate) and our generate vs transformers' generate
    python bench.py run       # where the time of `python train.py` went (its summary.json files), and the
                              # whole run's useful training FLOPs / (wall clock x peak)
    python bench.py train --preset paper --steps 20   # tokens/s and MFU of real training steps on this
                              # device (a GPU: bf16 autocast, fused AdamW), and the paper run's time from them
    python bench.py precision # fp32 against bf16 autocast: matmul peaks, training steps, evaluation
    python bench.py head      # the output layer and its loss: plain, and chunked so no (N, V) logits exist

Each ratio is measured in one process, against a reference measured in the same process: the matmul
peak (a large square product in the training dtype) or transformers on the same model and inputs.
"""
import argparse
import os
import resource
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads
import numpy as np
import torch

import data
import runs
import train
from evaluation import evaluate
from model import Transformer, left_pad

# The paper's run, in optimizer steps (paper-notes section 3): 80 pretraining epochs of 1,000 steps of
# 96 x 512 tokens, then Task 0 (10 epochs) and Task 1 (25 epochs) at 6,250 and 2,500 steps an epoch.
PAPER_STEPS = {"pretrain": 80_000, "fine-tune": 62_500 + 62_500}
# Datasheet dense bf16 peaks (FLOP/s), the usual denominator of MFU, by a piece of torch's device name.
DATASHEET_BF16 = {"H200": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "A100": 312e12}


def seconds_of(fn, warmup=3, reps=10, best=False):
    """The median (or best) wall-clock seconds of reps calls of fn, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        runs.sync()
        start = time.perf_counter()
        fn()
        runs.sync()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def page_faults_per_call(fn, reps=2):
    """Minor page faults (pages the kernel had to map in) per call of fn: what runs.keep_freed_memory cuts."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / reps


def matmul_peak(device, dtype, n=None):
    """FLOP/s of a large square matrix product, the best of 20: the most this device does in `dtype`, the
    denominator of every utilisation figure here."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds_of(lambda: a @ b, reps=20, best=True)


def train_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # --precision auto's choice (runs.precision)


def step_fn(model, batch):
    """One training step as train.py takes it (train.train_step, its AdamW); returns a closure."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(params, lr=1e-4, weight_decay=0.01)
    bf16 = batch[0].device.type == "cuda"  # --precision auto's choice
    return lambda: train.train_step(model, opt, params, batch, strategy=train.Seq(), ctx=None, bf16=bf16)


def step_flops(model, batch):
    meter = runs.Meter()
    meter.count(model, batch[0], batch[2])
    return float(meter.train_flops), int(meter.train_tokens)


def preset_model(preset, device):
    cfg = train.preset_config(preset)
    torch.manual_seed(0)
    return cfg, Transformer(train.model_config(cfg, data.build_tokenizer().vocab_size)).to(device)


def pretrain_batch(cfg, vocab_size, device):
    rows = torch.randint(0, vocab_size, (cfg.pretrain_batch, cfg.context + 1), device=device)
    return rows[:, :-1], rows[:, 1:], None


def qa_batch(cfg, device):
    """A real QA fine-tuning batch of the cpu data (prompt, answer, EOS; right-padded; loss on the answer)."""
    tok = data.build_tokenizer()
    bio = data.build_dataset(train.data_config(train.preset_config("cpu")), tok)
    qa = train.QASet.from_arrays(data.qa_arrays(bio, bio.splits["task0_train"], tok), device)
    return qa.epoch(cfg.ft_batch, np.random.default_rng(0))[0]


def time_split(step, show=0):
    """The share of one step's CPU time in matrix products (and attention); with show, also print the
    `show` costliest operations by input shape, each with its share of the step."""
    matmul_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
    with torch.profiler.profile(record_shapes=bool(show)) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages(group_by_input_shape=bool(show))
    total = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:show]:
        shapes = ", ".join(str(tuple(s)) for s in e.input_shapes if s)
        print(f"    {e.self_cpu_time_total / total:6.1%}  {e.key:<52} {shapes}")
    return sum(e.self_cpu_time_total for e in events if e.key in matmul_ops) / total


def bench_flops(args):
    """Training FLOP/s as a share of this machine's measured fp32 matmul peak, and of the time in matrix products."""
    device = torch.device("cpu")
    peak = matmul_peak(device, torch.float32)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; fp32 matmul peak (2048^2): "
          f"{peak / 1e9:.0f} GFLOP/s")
    torch.manual_seed(0)
    bench_model = Transformer(train.ModelConfig(model_type="gpt_neox", vocab_size=8192, n_layer=6, n_head=8,
                                                d_model=256, d_ff=1024, max_seq_len=256))
    rows = torch.randint(0, 8192, (8, 257))
    cpu_cfg, cpu_model = preset_model("cpu", device)
    cases = [("bench model (6 x 256), 8 x 256 tokens", bench_model, (rows[:, :-1], rows[:, 1:], None)),
             ("cpu preset, pretraining 16 x 128", cpu_model, pretrain_batch(cpu_cfg, cpu_model.cfg.vocab_size, device)),
             ("cpu preset, QA fine-tuning 48 pairs", cpu_model, qa_batch(cpu_cfg, device))]
    # "if only matmuls": the utilisation if every other operation were free, i.e. the products' own rate at these
    # shapes (almost all FLOPs are in them), the ceiling that cutting element-wise work can approach.
    print(f"{'case':<40}{'ms/step':>9}{'GFLOP/s':>9}{'of peak':>9}{'in matmuls':>12}{'if only matmuls':>17}")
    for name, model, batch in cases:
        step = step_fn(model.train(), batch)
        seconds = seconds_of(step)
        flops, _ = step_flops(model, batch)
        share = time_split(step, show=args.profile)
        utilisation = flops / seconds / peak
        print(f"{name:<40}{seconds * 1e3:>9.1f}{flops / seconds / 1e9:>9.1f}{utilisation:>9.2f}{share:>12.2f}"
              f"{utilisation / share:>17.2f}")


def bench_train(args):
    """Real training steps of a preset's model: pretraining on random tokens (throughput does not depend on the
    text), fine-tuning on a real cpu-preset QA batch (its padding and answer mask are what cost)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    cfg, model = preset_model(args.preset, device)
    dtype = train_dtype(device)
    peak = matmul_peak(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    print(f"{args.preset} preset: {model.num_params() / 1e6:.1f}M parameters on {name}; {dtype} matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s measured" + (f", {datasheet / 1e12:.0f} on the datasheet" if datasheet else ""))
    net = torch.compile(model) if args.compile else model  # the same parameters either way
    seconds = {}
    for kind, batch in [("pretrain", pretrain_batch(cfg, model.cfg.vocab_size, device)),
                        ("fine-tune", qa_batch(cfg, device))]:
        step = step_fn(net, batch)
        first = seconds_of(step, warmup=0, reps=1)  # with --compile, the compilation is in here
        seconds[kind] = seconds_of(step, warmup=2, reps=args.steps)
        flops, tokens = step_flops(model, batch)
        rate = flops / seconds[kind]
        print(f"  {kind:<10} batch {tuple(batch[0].shape)}: {seconds[kind] * 1e3:8.1f} ms/step, "
              f"{tokens / seconds[kind]:10.0f} tokens/s, MFU {rate / peak:.2f} of the measured peak"
              + (f", {rate / datasheet:.2f} of the datasheet's" if datasheet else "") + f"; first step {first:.1f} s")
    if args.preset == "paper":
        hours = sum(PAPER_STEPS[k] * seconds[k] for k in PAPER_STEPS) / 3600
        print(f"  the paper's run ({PAPER_STEPS['pretrain']:,} pretraining + {PAPER_STEPS['fine-tune']:,} "
              f"fine-tuning steps) at these rates: {hours:.1f} h of training steps (evaluation not included)")


def bench_eval(args):
    """The cpu preset's Task-0 test prompts in one batch: exact match by evaluation.evaluate (one teacher-forced pass),
    and greedy decoding by our generate and by transformers' (same weights, same outputs)."""
    import transformers  # test-only dependency (requirements-dev.txt)
    cfg, ours = preset_model("cpu", torch.device("cpu"))
    if args.checkpoint:
        ours = Transformer.from_pretrained(args.checkpoint)
    ours.eval()
    tok = data.build_tokenizer()
    bio = data.build_dataset(train.data_config(cfg), tok)
    qa = train.QASet.from_arrays(data.qa_arrays(bio, bio.splits["task0_test"], tok), "cpu")
    prompts, answers = qa.prompts[:cfg.eval_subset], qa.answers[:cfg.eval_subset]
    max_new = max(map(len, answers))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
    idx, mask = left_pad(prompts, tok.pad_id)

    def run_evaluate():  # what train.py runs: one teacher-forced pass decides exact match (evaluation.evaluate)
        evaluate(ours, qa.subset(range(len(prompts))), tok)

    def run_ours():
        return ours.generate(prompts, max_new, eos_id=tok.eos_id, pad_id=tok.pad_id)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        rows = out[:, idx.shape[1]:].tolist()
        return [r[:r.index(tok.eos_id) + 1] if tok.eos_id in r else r for r in rows]

    print(f"{len(prompts)} prompts in one batch, up to {max_new} new tokens, {torch.get_num_threads()} threads, "
          f"weights: {args.checkpoint or 'random (cpu preset shape)'}; transformers {transformers.__version__}")
    outputs = {"ours, KV-cache generate": run_ours(), "transformers generate": run_hf()}
    same = sum(a == b for a, b in zip(*outputs.values())) / len(prompts)
    print(f"greedy outputs identical on {same:.1%} of prompts")
    runs = {"ours, evaluate": run_evaluate, "ours, KV-cache generate": run_ours,
            "transformers generate": run_hf}
    run_evaluate()  # the other two have run once above
    times = {name: [] for name in runs}
    for _ in range(args.reps):  # round-robin, so that this machine's drift hits all three alike
        for name, fn in runs.items():
            times[name].append(seconds_of(fn, warmup=0, reps=1))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    for name, fn in runs.items():
        print(f"{name:>24}: {seconds[name] * 1e3:8.1f} ms, {len(prompts) / seconds[name]:8.0f} QA pairs judged/s, "
              f"{page_faults_per_call(fn):8.0f} page faults")
    reference = seconds["transformers generate"]
    print(f"speed-up over transformers generate: evaluate {reference / seconds['ours, evaluate']:.2f}x, "
          f"generate {reference / seconds['ours, KV-cache generate']:.2f}x  (target >= 2)")


def bench_run(args):
    """The stages of `python train.py --preset P` (as cached in runs/): time by kind and utilisation. The
    peak is measured here, so the runs must come from this machine, one process, on its CPU."""
    cfg = train.preset_config(args.preset, runs=args.runs)
    here = runs.environment()["machine"]
    peak = matmul_peak(torch.device("cpu"), torch.float32)
    totals, flops, wall = {}, 0.0, 0.0
    print(f"{'stage':<10}{'seconds':>9}" + "".join(f"{k:>11}" for k in ("train", "eval", "checkpoint", "strategy",
                                                                        "other")) + f"{'TFLOP':>8}")
    for stage in train.stage_names(cfg):
        path = os.path.join(runs.stage_dir(cfg, stage)[0], "summary.json")
        if not os.path.exists(path):
            raise SystemExit(f"{path}: missing; run `python train.py --preset {args.preset}` first")
        summary = runs.read_json(path)
        if "time_s" not in summary:
            raise SystemExit(f"{path}: made before summaries split their time; delete the run and rerun it")
        if summary["machine"] != here or summary.get("processes", 1) != 1 or torch.cuda.is_available():
            raise SystemExit(f"{path}: made on {summary['machine']!r} by {summary.get('processes', 1)} process(es);"
                             f" this is {here!r}: the peak measured here would not be its peak")
        wall += summary["seconds"]
        flops += summary["train_flops"]
        for k, v in summary["time_s"].items():
            totals[k] = totals.get(k, 0.0) + v
        print(f"{stage:<10}{summary['seconds']:>9.1f}" + "".join(f"{v:>11.1f}" for v in summary["time_s"].values())
              + f"{summary['train_flops'] / 1e12:>8.2f}")
    print(f"{'total':<10}{wall:>9.1f}" + "".join(f"{v:>11.1f}" for v in totals.values()) + f"{flops / 1e12:>8.2f}")
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; useful training FLOPs / (wall clock x peak) = "
          f"{flops / (wall * peak):.2f}; training steps alone: {flops / (totals['train'] * peak):.2f}")


def bench_precision(args):
    """fp32 against bf16 autocast (train.py --precision) on this CPU, each ratio in one process: the matmul
    peaks, a pretraining and a QA step of the preset, and the exact-match evaluation of its eval subset."""
    device = torch.device("cpu")
    cfg, model = preset_model(args.preset, device)
    peaks = {dtype: matmul_peak(device, dtype, n=1024) for dtype in (torch.float32, torch.bfloat16)}
    print(f"{torch.get_num_threads()} threads; native bf16: {runs.native_bf16('cpu')}; matmul peak (1024^2): fp32 "
          f"{peaks[torch.float32] / 1e9:.1f}, bf16 {peaks[torch.bfloat16] / 1e9:.1f} GFLOP/s "
          f"({peaks[torch.bfloat16] / peaks[torch.float32]:.2f}x)")
    tok = data.build_tokenizer()
    bio = data.build_dataset(train.data_config(cfg), tok)
    qa = train.QASet.from_arrays(data.qa_arrays(bio, bio.splits["task0_test"], tok), device)
    qa = qa.subset(range(min(len(qa), cfg.eval_subset)))
    cases = {"pretraining step": pretrain_batch(cfg, model.cfg.vocab_size, device), "QA step": qa_batch(cfg, device)}
    print(f"{'':<18}{'fp32 ms':>10}{'bf16 ms':>10}{'speed-up':>10}{'fp32 of fp32 peak':>19}{'bf16 of bf16 peak':>19}")
    for name, batch in cases.items():
        flops, _ = step_flops(model, batch)
        params = [p for p in model.parameters()]
        opt = train.make_optimizer(params, lr=1e-4, weight_decay=0.01)
        seconds = {bf16: seconds_of(lambda: train.train_step(model, opt, params, batch, strategy=train.Seq(), ctx=None,
                                                             bf16=bf16), warmup=1, reps=args.reps)
                   for bf16 in (False, True)}
        print(f"{name:<18}{seconds[False] * 1e3:>10.1f}{seconds[True] * 1e3:>10.1f}{seconds[False] / seconds[True]:>9.2f}x"
              f"{flops / seconds[False] / peaks[torch.float32]:>19.2f}{flops / seconds[True] / peaks[torch.bfloat16]:>19.2f}")
    seconds = {bf16: seconds_of(lambda: evaluate_in(model, qa, tok, bf16), warmup=1, reps=args.reps)
               for bf16 in (False, True)}
    print(f"{'evaluation':<18}{seconds[False] * 1e3:>10.1f}{seconds[True] * 1e3:>10.1f}"
          f"{seconds[False] / seconds[True]:>9.2f}x   ({len(qa)} QA pairs, exact match)")


def evaluate_in(model, qa, tok, bf16):
    with runs.autocast("cpu", bf16):
        return evaluate(model, qa, tok)


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i) computed `chunk` rows at a time, the gradient taken in the same pass: no (N, V)
    logits tensor exists, each chunk's (chunk, V) block is used while it is still in cache. The candidate
    for the output layer that `bench.py head` measures against the plain F.cross_entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # hidden (N, C), weight (V, C), targets (N,)
        total = torch.zeros((), dtype=torch.float32)
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)
        for s in range(0, len(hidden), chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            logits = (h @ weight.t()).float()                                   # (n, V)
            lse = logits.logsumexp(-1)                                          # (n,)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            probs = logits.sub_(lse[:, None]).exp_()                            # softmax, in place
            probs[torch.arange(len(t)), t] -= 1                                 # d CE / d logits
            grad_hidden[s:s + chunk] = probs @ weight
            grad_weight.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad, None, None


def bench_head(args):
    """The output layer and its loss, forward and backward, at a pretraining step's shape of the preset
    (every position a target): the plain head + F.cross_entropy, which writes and rereads (N, V) logits, against
    ChunkedCrossEntropy at a few chunk sizes. Same sums and gradients (tests/test_precision.py)."""
    cfg, model = preset_model(args.preset, torch.device("cpu"))
    n, vocab = cfg.pretrain_batch * cfg.context, model.cfg.vocab_size
    hidden = torch.randn(n, cfg.d_model, requires_grad=True)
    weight = model.lm_head.weight.detach().clone().requires_grad_()
    targets = torch.randint(0, vocab, (n,))

    def plain():
        torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum").backward()

    cases = {"plain": plain} | {f"chunked {c}": (lambda c=c: ChunkedCrossEntropy.apply(hidden, weight, targets, c).backward())
                                for c in (128, 256, 512, 1024)}
    times = {name: [] for name in cases}
    for _ in range(args.reps):  # round-robin, so that this machine's drift hits all alike
        for name, fn in cases.items():
            times[name].append(seconds_of(fn, warmup=1, reps=3))
    plain_ms = statistics.median(times["plain"]) * 1e3
    print(f"({n} x {cfg.d_model}) x ({cfg.d_model} x {vocab}): logits {n * vocab * 4 / 2**20:.0f} MB in fp32")
    for name, t in times.items():
        ms = statistics.median(t) * 1e3
        print(f"{name:>14}: {ms:7.1f} ms forward + backward, {plain_ms / ms:.2f}x plain")


def bench_model(args):
    """Training tokens/s of our Transformer against transformers' GPTNeoXForCausalLM, same model and inputs."""
    import transformers  # test-only dependency (requirements-dev.txt)
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=6,
                                           num_attention_heads=8, intermediate_size=1024,
                                           max_position_embeddings=args.seq_len, rotary_pct=0.25)
    hf = transformers.GPTNeoXForCausalLM(hf_config).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Transformer.from_pretrained(tmp).train()
    rows = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq_len + 1))
    inputs, targets = rows[:, :-1], rows[:, 1:]
    losses = {"ours": lambda: ours(inputs, targets)[1],
              "transformers": lambda: torch.nn.functional.cross_entropy(
                  hf(inputs).logits.flatten(0, 1), targets.reshape(-1))}
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4), "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4)}

    def step(name):
        start = time.perf_counter()
        losses[name]().backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start
    print(f"GPT-NeoX {ours.num_params() / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    times = {name: [] for name in losses}
    for i in range(3 + args.steps):  # alternate, so that machine noise hits both alike
        for name in losses:
            seconds = step(name)
            if i >= 3:
                times[name].append(seconds)
    rate = {name: args.batch * args.seq_len / statistics.median(t) for name, t in times.items()}
    for name, r in rate.items():
        print(f"{name:>13}: {r:9.0f} training tokens/s")
    print(f"ratio ours / transformers: {rate['ours'] / rate['transformers']:.2f}  (target >= 1.0)")


def whole(minimum):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {minimum}")
        return value
    return parse


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc settings (to measure what runs.keep_freed_memory gains)")
    sub = parser.add_subparsers(dest="what", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    commands = {name: sub.add_parser(name, help=HELP[name]) for name in BENCHMARKS}
    for name in ("precision", "head", "train", "run"):
        commands[name].add_argument("--preset", default="cpu", choices=list(train.PRESETS),
                                    help="the preset whose model and batches are measured (default: cpu)")
    commands["model"].add_argument("--batch", type=whole(1), default=8, help="sequences per step")
    commands["model"].add_argument("--seq-len", type=whole(1), default=256, help="tokens per sequence")
    for name in ("model", "train"):
        commands[name].add_argument("--steps", type=whole(1), default=15, help="timed steps")
    for name in ("eval", "precision", "head"):
        commands[name].add_argument("--reps", type=whole(1), default=9 if name == "eval" else 3, help="timed rounds")
    commands["eval"].add_argument("--checkpoint", help="a checkpoint directory to evaluate (default: random weights)")
    commands["run"].add_argument("--runs", default="runs", help="the runs directory (default: runs)")
    commands["train"].add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    commands["train"].add_argument("--compile", action="store_true", help="torch.compile the model first")
    commands["flops"].add_argument("--profile", type=whole(0), default=0, metavar="N",
                                   help="also print each step's N costliest operations by input shape")
    args = parser.parse_args(argv)
    if getattr(args, "checkpoint", None) and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        parser.error(f"--checkpoint {args.checkpoint}: expected a checkpoint directory with a config.json")
    if args.what == "run" and not os.path.isdir(args.runs):
        parser.error(f"--runs {args.runs}: no such directory (run `python train.py --runs {args.runs}` first)")
    return args


HELP = {"model": "training tokens/s: ours against transformers", "flops": "utilisation of the fp32 matmul peak",
        "eval": "exact-match evaluation and generate against transformers' generate",
        "run": "where a cached train.py run's time went", "train": "tokens/s and MFU of a preset's training steps",
        "precision": "fp32 against bf16 autocast", "head": "the output layer's loss: plain against chunked"}
BENCHMARKS = {"model": bench_model, "flops": bench_flops, "eval": bench_eval, "run": bench_run, "train": bench_train,
              "precision": bench_precision, "head": bench_head}

if __name__ == "__main__":
    args = parse_args()
    if not args.default_malloc:
        runs.keep_freed_memory()  # as train.py does
    BENCHMARKS[args.what](args)
