"""bf16 autocast: chosen by auto on a GPU only (on the CPUs measured it never paid), trains like fp32, and keeps its
own stages."""
import os

import pytest
import torch

import runs
import train
from model import ModelConfig, Transformer


def fake_cpu(monkeypatch, has_bf16):
    capabilities = {"avx2": True, "avx512_bf16": has_bf16, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_picks_bf16_on_a_gpu_and_fp32_on_any_cpu(monkeypatch, has_bf16):
    fake_cpu(monkeypatch, has_bf16)
    cfg = train.TrainConfig(preset="tiny")
    assert runs.precision(cfg, "cpu") == "fp32"
    assert runs.precision(cfg, "cuda") == "bf16"
    for forced in ("bf16", "fp32"):  # an explicit choice is taken as given
        assert runs.precision(train.TrainConfig(preset="tiny", precision=forced), "cpu") == forced


def test_amx_counts_as_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert runs.native_bf16("cpu")


def test_precision_is_checked():
    with pytest.raises(ValueError, match="--precision 'fp16'"):
        train.TrainConfig(precision="fp16")


def test_cache_key_differs_between_fp32_and_bf16(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, has_bf16=False)
    auto = train.TrainConfig(preset="tiny", runs=str(tmp_path))
    fp32 = train.TrainConfig(preset="tiny", runs=str(tmp_path), precision="fp32")
    bf16 = train.TrainConfig(preset="tiny", runs=str(tmp_path), precision="bf16")
    for stage in ("pretrain", "task1"):
        assert runs.stage_dir(auto, stage) == runs.stage_dir(fp32, stage)  # both compute in fp32 here
        assert runs.stage_dir(bf16, stage)[0] != runs.stage_dir(fp32, stage)[0]
        assert "precision" not in runs.stage_dir(fp32, stage)[1]  # an fp32 CPU run keeps the key it always had
    fake_cpu(monkeypatch, has_bf16=True)  # a CPU with bf16 in hardware: still fp32, still the same key
    assert runs.stage_dir(auto, "task1") == runs.stage_dir(fp32, "task1")


def test_bf16_train_step_runs_bf16_products_and_an_fp32_loss_within_2_percent():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=100, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=32))
    idx = torch.randint(0, 100, (4, 17))
    batch = (idx[:, :-1], idx[:, 1:], None)
    with torch.no_grad():
        fp32_loss = model(*batch[:2])[1]
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    params = list(model.parameters())
    opt = train.make_optimizer(params, lr=1e-3, weight_decay=0.0)
    loss = train.train_step(model, opt, params, batch, strategy=train.Seq(), ctx=None, bf16=True)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    assert abs(loss.item() - fp32_loss.item()) < 0.02 * fp32_loss.item()
    assert all(p.dtype == torch.float32 for p in params)
    assert all(s.dtype == torch.float32 for state in opt.state.values() for s in state.values() if s.dim())
    train.train_step(model, opt, params, batch, strategy=train.Seq(), ctx=None, bf16=False)
    assert seen[-1] == torch.float32  # without bf16, plain fp32


def test_a_bf16_run_says_so_in_its_summary(tmp_path):
    out = train.main(["--preset", "tiny", "--runs", str(tmp_path), "--stage", "task0", "--precision", "bf16"])
    summary = runs.read_json(os.path.join(out, "summary.json"))
    assert summary["precision"] == "bf16" and summary["settings"]["precision"] == "bf16 autocast on cpu"


def test_chunked_cross_entropy_equals_the_plain_one():
    """bench.py head's candidate for the output layer: same sum and gradients as F.cross_entropy, to 1e-5."""
    import bench
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(50, 16).requires_grad_()
    targets = torch.randint(0, 50, (300,))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    plain_grads = torch.autograd.grad(3 * plain, (hidden, weight))
    chunked = bench.ChunkedCrossEntropy.apply(hidden, weight, targets, 64)  # 300 rows: a ragged last chunk
    chunked_grads = torch.autograd.grad(3 * chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for ours, reference in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
