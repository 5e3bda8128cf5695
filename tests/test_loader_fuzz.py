"""Damaged checkpoints: random mutations of a valid one (file bytes, safetensors header fields, config.json
fields, the shard index) must give a one-line ValueError or FileNotFoundError naming the file, and never
load a model that disagrees with its files. (How fast: the slow test below, as wall-clock limits flake
on a loaded machine.)"""
import json
import os
import random
import shutil
import time

import pytest
import torch

from model import DTYPES, ModelConfig, Transformer, fuse_hf, key_plan, read_safetensors

torch.set_num_threads(1)

ODD_VALUES = [0, -1, 1, 2, 3, 5, 7, 64, 10**9, 2**63, -2**63, 1.5, -0.5, 1e308, float("nan"), float("inf"), "12",
              "", None, [], [1], {}, True, False, "gelu", "llama", "gpt2", "silu"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A valid checkpoint, single-file and sharded."""
    root = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(model_type="gpt_neox", vocab_size=40, n_layer=2, n_head=2, d_model=16, d_ff=32,
                                    max_seq_len=32))
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_bytes=4000)
    Transformer.from_pretrained(str(root / "single"))(torch.zeros(1, 4, dtype=torch.long))  # torch's first-call set-up
    return root


def rewrite_header(path, mutate):
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    mutate(header)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + raw[8 + n:])


def mutate(ckpt, rng):
    """Damage the checkpoint directory `ckpt` in one random way; returns a description."""
    files = sorted(os.listdir(ckpt))
    tensors = [f for f in files if f.endswith(".safetensors")]
    kind = rng.choice(["config", "config", "header", "header", "bytes", "index"])
    if kind == "index" and "model.safetensors.index.json" not in files:
        kind = "bytes"
    if kind == "config":
        path = os.path.join(ckpt, "config.json")
        with open(path) as f:
            config = json.load(f)
        key = rng.choice(sorted(config) + ["rope_scaling", "head_dim", "sliding_window"])
        if rng.random() < 0.15:
            config.pop(key, None)
            what = f"config: removed {key}"
        else:
            config[key] = rng.choice(ODD_VALUES)
            what = f"config: {key} = {config[key]!r}"
        with open(path, "w") as f:
            json.dump(config, f)
        return what
    if kind == "header":
        path = os.path.join(ckpt, rng.choice(tensors))
        field = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "add"])

        def change(header):
            name = rng.choice(sorted(k for k in header if k != "__metadata__"))
            entry = header[name]
            if field == "dtype":
                entry["dtype"] = rng.choice(list(DTYPES) + ["F8", "x", 3])
            elif field == "shape":
                if entry["shape"] and rng.random() < 0.8:
                    entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice(ODD_VALUES)
                else:
                    entry["shape"] = rng.choice([[], [1], "x", None, entry["shape"][::-1]])
            elif field == "offsets":
                entry["data_offsets"][rng.randrange(2)] = rng.choice(ODD_VALUES)
            elif field == "drop":
                del header[name]
            elif field == "rename":
                header[name.replace("layers.0", "layers.5") if "layers.0" in name else name + ".x"] = header.pop(name)
            else:
                header["gpt_neox.layers.9.extra.weight"] = dict(entry)
        rewrite_header(path, change)
        return f"header of {os.path.basename(path)}: {field}"
    if kind == "bytes":
        path = os.path.join(ckpt, rng.choice(tensors + ["config.json"]))
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        how = rng.choice(["flip", "truncate", "append"])
        if how == "flip":
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(raw)) if rng.random() < 0.5 else rng.randrange(min(len(raw), 200))
                raw[i] = rng.randrange(256)
        elif how == "truncate":
            raw = raw[:rng.randrange(len(raw))]
        else:
            raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        with open(path, "wb") as f:
            f.write(raw)
        return f"bytes of {os.path.basename(path)}: {how}"
    path = os.path.join(ckpt, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    name = rng.choice(sorted(weight_map))
    how = rng.choice(["drop", "retarget", "escape", "type", "delete shard", "extra"])
    if how == "drop":
        del weight_map[name]
    elif how == "retarget":
        weight_map[name] = rng.choice(sorted(set(weight_map.values())) + ["missing.safetensors"])
    elif how == "escape":
        weight_map[name] = rng.choice(["../model.safetensors", "/etc/passwd", "", "."])
    elif how == "type":
        weight_map[name] = rng.choice([3, None, [], {}])
    elif how == "delete shard":
        os.remove(os.path.join(ckpt, weight_map[name]))
    else:
        weight_map["gpt_neox.layers.0.extra.weight"] = weight_map[name]
    with open(path, "w") as f:
        json.dump(index, f)
    return f"index: {how}"


def agrees_with_files(model, ckpt):
    """A loaded model is valid if every tensor it would save equals what its files hold, and it runs."""
    stored = {}
    for f in os.listdir(ckpt):
        if f.endswith(".safetensors"):
            stored |= read_safetensors(os.path.join(ckpt, f))
    params = dict(model.named_parameters())
    for names, hf, layout in key_plan(model):
        if not torch.equal(fuse_hf([params[n].detach() for n in names], layout, model.cfg), stored[hf].to(torch.float32)):
            return False
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long))  # one token: a mutated max length may be 1
    return logits.shape == (1, 1, model.cfg.vocab_size)


def check_mutations(checkpoints, tmp_path, count, seed, seconds=None):
    """Load `count` damaged copies; with `seconds`, each load must also end (refused or loaded) within it."""
    rng = random.Random(seed)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(count):
        source = rng.choice(["single", "sharded"])
        ckpt = tmp_path / f"m{i}"
        shutil.copytree(checkpoints / source, ckpt)
        what = mutate(str(ckpt), rng)
        start = time.time()
        try:
            model, message = Transformer.from_pretrained(str(ckpt)), None
        except (ValueError, FileNotFoundError) as e:
            model, message = None, str(e)
        assert seconds is None or time.time() - start < seconds, what
        if model is None:
            assert "\n" not in message and str(ckpt) in message, (what, message)
            outcomes["refused"] += 1
        else:
            assert agrees_with_files(model, str(ckpt)), what
            outcomes["loaded"] += 1
        shutil.rmtree(ckpt)
    return outcomes


def test_random_mutations_give_one_line_errors(checkpoints, tmp_path):
    outcomes = check_mutations(checkpoints, tmp_path, count=150, seed=0)
    assert outcomes["refused"] > 100  # most damage is caught; the rest (a weight's bytes, an epsilon) is a valid model


@pytest.mark.slow
def test_a_thousand_mutations(checkpoints, tmp_path):
    outcomes = check_mutations(checkpoints, tmp_path, count=1000, seed=1, seconds=1.0)
    print(outcomes)


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**9), ("hidden_size", 2**40), ("vocab_size", 0),
                                         ("intermediate_size", -3), ("num_hidden_layers", 3)])
def test_absurd_sizes_are_refused_before_allocating(checkpoints, tmp_path, monkeypatch, field, value):
    ckpt = tmp_path / "c"
    shutil.copytree(checkpoints / "single", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))

    def build(self, cfg):
        raise AssertionError(f"built a model of {cfg} before refusing the config")
    monkeypatch.setattr(Transformer, "__init__", build)  # refused from config.json and the headers alone
    with pytest.raises(ValueError, match=str(ckpt / "config.json")):
        Transformer.from_pretrained(str(ckpt))
