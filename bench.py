"""Benchmarks that print ratios, not pass/fail: run them by hand, put the figures in the README.

    python bench.py model     # training tokens/s, our Transformer vs transformers' GPTNeoXForCausalLM

Both models get the same config, weights, batch, optimizer and threads, in the same process; the
timed steps alternate between them so that machine noise hits both alike.
"""
import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads
import torch

from model import Transformer


def train_step_timer(model, batch, lr=1e-4):
    """A closure doing one forward + backward + AdamW step; returns seconds taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step(loss_of):
        start = time.perf_counter()
        loss = loss_of(model, inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step


def ours_loss(model, inputs, targets):
    return model(inputs, targets)[1]


def hf_loss(model, inputs, targets):
    logits = model(inputs).logits
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def bench_model(args):
    import transformers  # test-only dependency (requirements-dev.txt)
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=6,
                                           num_attention_heads=8, intermediate_size=1024,
                                           max_position_embeddings=args.seq_len, rotary_pct=0.25)
    hf = transformers.GPTNeoXForCausalLM(hf_config).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Transformer.from_pretrained(tmp).train()
    batch = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq_len + 1))
    steps = {"ours": (train_step_timer(ours, batch), ours_loss), "transformers": (train_step_timer(hf, batch), hf_loss)}
    print(f"GPT-NeoX {ours.num_params() / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, (step, loss_of) in steps.items():
            seconds = step(loss_of)
            if i >= args.warmup:
                times[name].append(seconds)
    tokens = args.batch * args.seq_len
    rate = {name: tokens / sorted(t)[len(t) // 2] for name, t in times.items()}  # median step
    for name, r in rate.items():
        print(f"{name:>13}: {r:9.0f} training tokens/s")
    print(f"ratio ours / transformers: {rate['ours'] / rate['transformers']:.2f}  (target >= 1.0)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["model"], help="which benchmark to run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    bench_model(parser.parse_args())
