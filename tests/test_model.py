"""model.py: parity with `transformers`, KV-cache generation, checkpoint round trips, bad input."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import model as model_py
from model import ModelConfig, Transformer, config_from_hf, read_safetensors, write_safetensors

torch.set_num_threads(1)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# ------------------------------------------------------------------------------------------------
# Parity, from the committed fixtures: runs everywhere, with or without transformers.


def read_json(path):
    with open(path) as f:
        return json.load(f)


FIXTURE_FAMILY = {"llama": "llama", "gpt_neox": "gpt_neox", "gpt2": "gpt2", "gpt_neox_hd32": "gpt_neox"}


def max_gap(model, idx, want):
    """Largest |logit difference| between our model on idx and the reference logits."""
    with torch.no_grad():
        return (model.eval()(idx)[0] - want).abs().max().item()


def fixture(name):
    expected = read_json(os.path.join(FIXTURES, name, "expected_logits.json"))
    return os.path.join(FIXTURES, name), torch.tensor(expected["input_ids"]), torch.tensor(expected["logits"])


@pytest.mark.parametrize("name", list(FIXTURE_FAMILY))
def test_fixture_parity(name):
    path, idx, want = fixture(name)
    model = Transformer.from_pretrained(path)
    assert model.cfg.model_type == FIXTURE_FAMILY[name]
    assert want.abs().max() > 1.0  # weights at std 0.2: a wrong layout cannot hide in the noise
    assert max_gap(model, idx, want) <= 1e-4


def test_hd32_fixture_has_the_cpu_presets_head_shape():
    cfg = Transformer.from_pretrained(fixture("gpt_neox_hd32")[0]).cfg
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == (32, 8, 5000.0)

# ------------------------------------------------------------------------------------------------
# Parity, live against transformers (a test-only dependency, requirements-dev.txt).

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
HF_CASES = {
    "llama-gqa-untied": ("LlamaConfig", dict(TINY, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-gqa-tied-bias": ("LlamaConfig", dict(TINY, num_key_value_heads=1, tie_word_embeddings=True,
                                                attention_bias=True, mlp_bias=True)),
    "neox-rot0.25-parallel": ("GPTNeoXConfig", dict(TINY, rotary_pct=0.25, use_parallel_residual=True)),
    "neox-rot1.0-sequential": ("GPTNeoXConfig", dict(TINY, rotary_pct=1.0, use_parallel_residual=False)),
    # The cpu preset's head shape: head_dim 32, 8 of its dims rotating, at a base other than the default.
    "neox-hd32-rot0.25-base5000": ("GPTNeoXConfig", dict(TINY, hidden_size=64, num_attention_heads=2,
                                                         rotary_pct=0.25, rotary_emb_base=5000.0)),
    "gpt2": ("GPT2Config", dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def random_hf_model(transformers, case):
    class_name, kwargs = HF_CASES[case]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**kwargs)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("case", list(HF_CASES))
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_parity_both_ways(transformers, case, sharded, tmp_path):
    hf = random_hf_model(transformers, case)
    idx = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(idx).logits
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if sharded else "5GB")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got, _ = ours(idx)
    assert (got - want).abs().max() <= 1e-4
    # And back: our checkpoint loads in transformers with equal logits.
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=20_000 if sharded else None)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(idx).logits - got).abs().max() <= 1e-4


def test_hf_padded_batch_parity(transformers, tmp_path):
    """Left padding with an attention mask gives the logits HF gives for the same padded batch."""
    hf = random_hf_model(transformers, "llama-gqa-untied")
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want, (got, _) = hf(idx, attention_mask=mask).logits, ours(idx, attention_mask=mask)
    assert (got - want)[mask.bool()].abs().max() <= 1e-4  # padding positions are don't-cares


def test_config_reads_both_spellings():
    v4 = dict(model_type="gpt_neox", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=16, rotary_pct=0.5, rotary_emb_base=500.0)
    v5 = dict(v4, rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})
    del v5["rotary_pct"], v5["rotary_emb_base"]
    assert config_from_hf(v4) == config_from_hf(v5)
    assert config_from_hf(v4).rotary_pct == 0.5 and config_from_hf(v4).rope_theta == 500.0

# ------------------------------------------------------------------------------------------------
# Negative controls: the parity checks above have teeth. Each loads the same checkpoint into a model
# that is wrong in one known way (patched here, in the test) and must miss the reference by > 1e-2,
# while the unpatched model, on the same checkpoint and tokens, meets it to 1e-4.


def interleaved_rotary(x, cos, sin):
    """The other RoPE layout (GPT-J, Meta's original code): rotate dim pairs (0, 1), (2, 3), ... where HF
    pairs dim i with i + r/2. Frequency j then drives pair j, so the tables are re-laid out to match."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    cos, sin = (t[..., :r // 2].repeat_interleave(2, dim=-1) for t in (cos, sin))
    rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def q_and_k_swapped(split):
    """The loader's split of HF tensors (model.split_hf), handing a fused q, k, v back as k, q, v."""
    def wrong(t, layout, cfg, parts):
        out = split(t, layout, cfg, parts)
        return (out[1], out[0], out[2]) if parts == 3 else out
    return wrong


def conv1d_not_transposed(split):
    """The loader's split taking Conv1D's (in, out) matrices as (out, in) without the transpose: a reshape
    to the shape the model wants, which on a square matrix (attention's c_proj) is exactly a missing .t()."""
    def wrong(t, layout, cfg, parts):
        if layout == "conv1d" and t.dim() == 2:
            t = t.reshape(t.shape[1], t.shape[0]).t()  # split_hf transposes: the net effect is no transpose
        return split(t, layout, cfg, parts)
    return wrong


def with_config(**changes):
    """A load that gets the config wrong: the checkpoint's weights in a model built with `changes`."""
    def load(monkeypatch, path):
        right = Transformer.from_pretrained(path)
        wrong = Transformer(dataclasses.replace(right.cfg, **changes))
        wrong.load_state_dict(right.state_dict())
        return wrong
    return load


def with_patch(patch):
    def load(monkeypatch, path):
        patch(monkeypatch)
        return Transformer.from_pretrained(path)
    return load


WRONG_MODELS = {
    "interleaved rotary": with_patch(lambda mp: mp.setattr(model_py, "apply_rotary", interleaved_rotary)),
    "q and k swapped": with_patch(lambda mp: mp.setattr(model_py, "split_hf", q_and_k_swapped(model_py.split_hf))),
    "Conv1D not transposed": with_patch(lambda mp: mp.setattr(model_py, "split_hf",
                                                              conv1d_not_transposed(model_py.split_hf))),
    "rotary fraction 0.5": with_config(rotary_pct=0.5),
    "rotary fraction 1.0": with_config(rotary_pct=1.0),
    "default rotary base": with_config(rope_theta=10000.0),
}
LIVE_CONTROLS = [("interleaved rotary", "llama-gqa-untied"), ("interleaved rotary", "neox-hd32-rot0.25-base5000"),
                 ("q and k swapped", "neox-hd32-rot0.25-base5000"), ("q and k swapped", "gpt2"),
                 ("Conv1D not transposed", "gpt2"), ("rotary fraction 0.5", "llama-gqa-untied"),
                 ("rotary fraction 1.0", "neox-hd32-rot0.25-base5000"),
                 ("default rotary base", "neox-hd32-rot0.25-base5000")]
FIXTURE_CONTROLS = [("interleaved rotary", "llama"), ("interleaved rotary", "gpt_neox_hd32"),
                    ("q and k swapped", "gpt_neox_hd32"), ("q and k swapped", "gpt2"), ("Conv1D not transposed", "gpt2"),
                    ("rotary fraction 1.0", "gpt_neox_hd32"), ("default rotary base", "gpt_neox_hd32")]


def hf_reference(transformers, case, path):
    """Save a random HF model of `case` to path; its logits on a fixed batch."""
    hf = random_hf_model(transformers, case)
    idx = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(2))
    hf.save_pretrained(path)
    with torch.no_grad():
        return idx, hf(idx).logits


@pytest.mark.parametrize("wrong,case", LIVE_CONTROLS)
def test_hf_parity_fails_for_a_wrong_model(transformers, wrong, case, tmp_path, monkeypatch):
    idx, want = hf_reference(transformers, case, tmp_path)
    assert max_gap(Transformer.from_pretrained(tmp_path), idx, want) <= 1e-4
    assert max_gap(WRONG_MODELS[wrong](monkeypatch, tmp_path), idx, want) > 1e-2


@pytest.mark.parametrize("wrong,name", FIXTURE_CONTROLS)
def test_fixture_parity_fails_for_a_wrong_model(wrong, name, monkeypatch):
    path, idx, want = fixture(name)
    assert max_gap(Transformer.from_pretrained(path), idx, want) <= 1e-4
    assert max_gap(WRONG_MODELS[wrong](monkeypatch, path), idx, want) > 1e-2


def test_two_rotating_dims_cannot_tell_the_rotary_layouts_apart(transformers, tmp_path, monkeypatch):
    """Why the head_dim-32 case exists: where only 2 dims rotate (head_dim 8 at rotary 0.25), rotate-half
    and interleaved are one rotation, and a wrong layout passes."""
    idx, want = hf_reference(transformers, "neox-rot0.25-parallel", tmp_path)
    assert max_gap(WRONG_MODELS["interleaved rotary"](monkeypatch, tmp_path), idx, want) <= 1e-4

# ------------------------------------------------------------------------------------------------
# Generation


def tiny_model(model_type="gpt_neox", **overrides):
    base = dict(model_type=model_type, vocab_size=50, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)
    if model_type == "llama":
        base.update(norm="rmsnorm", mlp="swiglu", parallel_residual=False, rotary_pct=1.0, n_kv_head=2)
    if model_type == "gpt2":
        base.update(position="learned", mlp="gelu_tanh", parallel_residual=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**(base | overrides))).eval()
    with torch.no_grad():  # larger weights: varied, confident greedy choices
        for p in model.parameters():
            p.mul_(8.0)
    return model


def greedy_uncached(model, prompt, max_new_tokens, eos_id):
    seq = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
        if seq[-1] == eos_id:
            break
    return seq[len(prompt):]


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama", "gpt2"])
def test_cached_batched_generation_equals_uncached(model_type):
    model = tiny_model(model_type)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    eos_id = 2
    got = model.generate(prompts, max_new_tokens=12, eos_id=eos_id, pad_id=0)
    want = [greedy_uncached(model, p, 12, eos_id) for p in prompts]
    assert got == want


def test_generation_stops_at_eos():
    model = tiny_model()
    first = model.generate([[3, 4, 5]], max_new_tokens=5)[0]
    eos_id = first[2]  # make the third token the EOS: decoding must stop right there
    assert model.generate([[3, 4, 5]], max_new_tokens=5, eos_id=eos_id)[0] == first[:first.index(eos_id) + 1]


def test_top_k_sampling_stays_in_the_top_k_and_repeats_for_a_seed():
    torch.manual_seed(0)  # the default init: flat next-token distributions, where sampling has room to go wrong
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)).eval()
    prompts, k, steps = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]], 3, 10

    def sample(seed, top_k=k):
        return model.generate(prompts, max_new_tokens=steps, top_k=top_k, generator=torch.Generator().manual_seed(seed))

    got = sample(0)
    assert got == sample(0) and got != sample(1)
    assert sample(0, top_k=1) == model.generate(prompts, max_new_tokens=steps)  # top 1 is greedy
    not_argmax, mass_outside = 0, []
    for prompt, new in zip(prompts, got):
        assert len(new) == steps
        for t, token in enumerate(new):
            with torch.no_grad():  # the model's own logits at this step, uncached and unpadded
                logits = model(torch.tensor([prompt + new[:t]]))[0][0, -1]
            top = logits.topk(k)
            assert logits[token] >= top.values[-1] - 1e-4, (prompt, t)  # 1e-4: the cache's rounding, not a k+1-th token
            not_argmax += token != top.indices[0].item()
            mass_outside.append(1 - logits.softmax(-1)[top.indices].sum().item())
    assert not_argmax > 0             # it samples, not only the argmax
    assert min(mass_outside) > 0.5    # sampling from all 50 tokens would leave the top 3 at most of the 30 steps


def test_last_only_logits():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 10))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, 50) and torch.allclose(last[:, 0], full[:, -1], atol=1e-4)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, targets=idx, last_only=True)


def test_hidden_states_and_masked_loss():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool).index_fill(1, torch.tensor([3]), True)
    mask[1, 7] = True
    logits, loss, hidden = model(idx, targets=idx, loss_mask=mask, return_hidden=True)
    assert len(hidden) == model.cfg.n_layer + 1 and all(h.shape == (2, 10, 32) for h in hidden)
    full, _ = model(idx)
    assert logits.shape == (3, 50) and torch.allclose(logits, full[mask], atol=1e-5)  # the masked positions only
    by_hand = torch.nn.functional.cross_entropy(full[mask], idx[mask])  # the mean over the 3 masked targets
    assert torch.allclose(loss, by_hand, atol=1e-6)
    _, unmasked = model(idx, targets=idx)
    assert torch.allclose(unmasked, torch.nn.functional.cross_entropy(full.view(20, -1), idx.view(-1)), atol=1e-6)

# ------------------------------------------------------------------------------------------------
# Checkpoint round trips


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama", "gpt2"])
@pytest.mark.parametrize("shard_bytes", [None, 30_000])
def test_save_load_bit_identical(model_type, shard_bytes, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    if shard_bytes:
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_file_dtype(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert Transformer.from_pretrained(tmp_path).embed.weight.dtype == torch.float32
    kept = Transformer.from_pretrained(tmp_path, dtype="auto")
    assert kept.embed.weight.dtype == torch.bfloat16 and torch.equal(kept.embed.weight, model.embed.weight)


def test_safetensors_dtypes_round_trip(tmp_path):
    tensors = {f"t_{d}": (torch.randn(3, 5) * 10).to(d) for d in (torch.float32, torch.float16, torch.bfloat16,
                                                                   torch.float64, torch.int64, torch.int8)}
    tensors["empty"] = torch.zeros(0, 4)
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


def test_reads_safetensors_written_by_the_reference(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(4, 3).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32)}
    safetensors.save_file(tensors, tmp_path / "ref.safetensors")
    back = read_safetensors(tmp_path / "ref.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    ours = safetensors.load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in tensors.items())

# ------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and the problem


def write_raw(path, header_obj=None, header_bytes=None, data=b"", length=None):
    head = header_bytes if header_bytes is not None else json.dumps(header_obj).encode()
    with open(path, "wb") as f:
        f.write((len(head) if length is None else length).to_bytes(8, "little") + head + data)
    return path


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BAD_FILES = {
    "truncated": (dict(header_bytes=b"", length=None), "truncated"),
    "header beyond file": (dict(header_obj={}, length=10**6), "exceeds the file"),
    "header not JSON": (dict(header_bytes=b"{not json"), "not valid JSON"),
    "header not object": (dict(header_obj=[1, 2]), "not a JSON object"),
    "offsets outside": (dict(header_obj={"w": {**F32_2x2, "data_offsets": [0, 32]}}, data=b"\0" * 16), "outside"),
    "overlap": (dict(header_obj={"a": F32_2x2, "b": {**F32_2x2, "data_offsets": [8, 24]}}, data=b"\0" * 24), "overlap"),
    "size mismatch": (dict(header_obj={"w": {**F32_2x2, "shape": [3, 2]}}, data=b"\0" * 16), "does not match"),
    "unknown dtype": (dict(header_obj={"w": {**F32_2x2, "dtype": "F8_E9"}}, data=b"\0" * 16), "unknown dtype"),
    "malformed entry": (dict(header_obj={"w": {"dtype": "F32"}}, data=b"\0" * 16), "malformed"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors(case, tmp_path):
    kwargs, message = BAD_FILES[case]
    if case == "truncated":
        (tmp_path / "x.safetensors").write_bytes(b"\x01\x02")
    else:
        write_raw(tmp_path / "x.safetensors", **kwargs)
    with pytest.raises(ValueError, match=message) as err:
        read_safetensors(tmp_path / "x.safetensors")
    assert "x.safetensors" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt", max_shard_bytes=30_000)
    return tmp_path / "ckpt"


def test_missing_config(checkpoint):
    os.remove(checkpoint / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(checkpoint)


def test_missing_weights(tmp_path):
    os.makedirs(tmp_path / "c")
    shutil.copy(os.path.join(FIXTURES, "llama", "config.json"), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path / "c")


def test_missing_shard(checkpoint):
    shard = sorted(f for f in os.listdir(checkpoint) if f.startswith("model-"))[1]
    os.remove(checkpoint / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        Transformer.from_pretrained(checkpoint)


def test_shard_name_escaping_directory(checkpoint):
    index = read_json(checkpoint / "model.safetensors.index.json")
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="escapes"):
        Transformer.from_pretrained(checkpoint)


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "bert", "model_type"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("sliding_window", 4096, "sliding_window"),
    ("hidden_act", "relu", "hidden_act"),
])
def test_unsupported_config(checkpoint, field, value, message):
    cfg = read_json(checkpoint / "config.json")
    cfg[field] = value
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(checkpoint)


def saved_tensors(model, path):
    """Save model as a checkpoint in path and read its tensors back, ready to be tampered with."""
    model.save_pretrained(path)
    return read_safetensors(path / "model.safetensors")


def test_unknown_missing_and_misshapen_tensors(tmp_path):
    good = saved_tensors(tiny_model(), tmp_path)
    for tensors, message in [
        (good | {"gpt_neox.layers.0.attention.extra.weight": torch.zeros(2)}, "unexpected tensors"),
        ({k: v for k, v in good.items() if k != "embed_out.weight"}, "missing tensor 'embed_out.weight'"),
        (good | {"embed_out.weight": torch.zeros(3, 3)}, "embed_out.weight' has shape"),
    ]:
        write_safetensors(tmp_path / "model.safetensors", tensors)
        with pytest.raises(ValueError, match=message):
            Transformer.from_pretrained(tmp_path)


def test_known_buffers_are_skipped(tmp_path):
    tensors = saved_tensors(tiny_model(), tmp_path)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    Transformer.from_pretrained(tmp_path)


def test_gpt2_without_prefix(tmp_path):
    model = tiny_model("gpt2", tie_embeddings=True)
    tensors = saved_tensors(model, tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {k.removeprefix("transformer."): v for k, v in tensors.items()})
    loaded = Transformer.from_pretrained(tmp_path)
    assert torch.equal(loaded.embed.weight, model.embed.weight) and loaded.lm_head.weight is loaded.embed.weight
