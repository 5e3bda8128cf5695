"""train.py on the tiny preset: every stage end to end, freezing, resuming, metrics, bad input."""
import glob
import math
import os
import types

import dataclasses

import numpy as np
import pytest
import torch

import data
import runs
import strategies
import train
from model import ModelConfig, Transformer, key_plan, read_safetensors

torch.set_num_threads(1)


def run(runs_dir, *flags):
    return train.main(["--preset", "tiny", "--runs", str(runs_dir), *flags])


def weights(checkpoint_dir):
    return read_safetensors(os.path.join(checkpoint_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One shared tiny experiment: SEQ through the recovery probe, then freeze through Task 1."""
    runs_dir = tmp_path_factory.mktemp("runs")
    seq_recover = run(runs_dir)
    freeze_task1 = run(runs_dir, "--stage", "task1", "--strategy", "freeze", "--freeze-layers", "1")
    return runs_dir, seq_recover, freeze_task1


def in_unit_range(x):
    if isinstance(x, dict):
        return all(in_unit_range(v) for v in x.values())
    return math.isfinite(x) and 0.0 <= x <= 1.0


def test_all_stages_write_their_outputs(tiny_runs):
    runs_dir, recover_dir, _ = tiny_runs
    stages = sorted(os.path.basename(d).split("-")[0] for d in glob.glob(f"{runs_dir}/tiny/*-*") if os.path.isdir(d))
    assert stages == ["pretrain", "recover", "task0", "task1", "task1", "task2"]  # recover comes after the last task
    for d in glob.glob(f"{runs_dir}/tiny/*/"):
        summary = runs.read_json(os.path.join(d, "summary.json"))
        assert summary["settings"]["seed"] == 0 and summary["versions"]["torch"] == torch.__version__
    recovery = runs.read_json(os.path.join(recover_dir, "summary.json"))
    assert [r["checkpoint"] for r in recovery["rows"]][:2] == ["pretrained", "task0"]  # the ceiling
    # the step-0 checkpoint is the Task-0 model: saved, and probed once, as "task0"
    assert [r["task1_step"] for r in recovery["rows"]] == [None, None, 2, 4, 20]
    assert recovery["ceiling"] == max(r["task0_em_after"] for r in recovery["rows"][:2])
    assert all(in_unit_range(r["before"]) and in_unit_range(r["after"]) for r in recovery["rows"])
    task1_dir = os.path.join(runs_dir, "tiny", recovery["task1_run"])
    assert os.path.exists(task1_dir + ".png")
    assert not glob.glob(f"{runs_dir}/tiny/*/state") and not glob.glob(f"{runs_dir}/tiny/*/*/state")  # complete
    records = runs.read_jsonl(os.path.join(task1_dir, "metrics.jsonl"))
    assert records[0]["step"] == 0 and {"task0", "current"} <= records[0].keys()
    for r in records:
        assert in_unit_range(r["task0"]) and in_unit_range(r.get("current", {}))
        assert math.isfinite(r.get("loss", 0.0))
    # Task 0 densely (every 2 steps to 6), the new task every sparse_every = 4 steps (20 steps in all)
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8, 12, 16, 20]
    assert [r["step"] for r in records if "current" in r] == [0, 4, 8, 12, 16, 20]
    for name in ("step-0000000", "step-0000002", "step-0000004"):
        ckpt = os.path.join(task1_dir, "ckpt", name)
        assert {"config.json", "model.safetensors", "tokenizer.json", "training_state.json"} <= set(os.listdir(ckpt))


def test_freeze_leaves_frozen_tensors_bit_identical(tiny_runs):
    runs_dir, _, freeze_dir = tiny_runs
    before = weights(glob.glob(f"{runs_dir}/tiny/task0-*/final")[0])
    after = weights(os.path.join(freeze_dir, "final"))
    frozen = [k for k in before if k.startswith(("gpt_neox.embed_in.", "gpt_neox.layers.0."))]
    trained = [k for k in before if k.startswith(("gpt_neox.layers.1.", "embed_out."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_cached_stages_are_reused_and_settings_change_the_key(tiny_runs, capsys):
    runs_dir, _, _ = tiny_runs
    run(runs_dir, "--stage", "task0")
    assert "task0: cached in" in capsys.readouterr().out
    assert runs.stage_dir(train.parse_args(["--preset", "tiny", "--ft-lr", "1e-3"])[0], "task0")[0] != \
        runs.stage_dir(train.parse_args(["--preset", "tiny"])[0], "task0")[0]


# Cache keys of the tiny preset, computed before train.py was split into train.py, runs.py and report.py:
# a layout change must leave every existing runs/ directory valid.
PINNED_KEYS = {
    ("seq", "pretrain"): "pretrain-948ddb10ff", ("seq", "task0"): "task0-632f7c41e6",
    ("seq", "task1"): "task1-seq-195795c313", ("seq", "task2"): "task2-seq-195795c313",
    ("seq", "recover"): "recover-seq-c1ca8644e7", ("freeze", "task1"): "task1-freeze1-cf3cee6b0c",
    ("lamol", "task0"): "task0-lamol-g-a28ef4b300", ("lamol", "task1"): "task1-lamol-g-8932a3a1f6",
    ("taskvector", "task1"): "task1-taskvector-f21c53e2ca", ("ewc", "task1"): "task1-ewc100-400666ba50",
    ("gradproj", "task1"): "task1-gradproj-71347820c9", ("replay", "task1"): "task1-replay0.2-3e9aa38c71",
}


@pytest.mark.parametrize("strategy,stage", PINNED_KEYS)
def test_cache_keys_are_those_of_existing_runs(strategy, stage):
    cfg = train.parse_args(["--preset", "tiny", "--strategy", strategy])[0]
    assert os.path.basename(runs.stage_dir(cfg, stage)[0]) == PINNED_KEYS[strategy, stage]


def test_a_gpu_run_never_reuses_cpu_stages(monkeypatch):
    cfg = train.parse_args(["--preset", "tiny"])[0]
    cpu_dir = runs.stage_dir(cfg, "task0")[0]
    assert os.path.basename(cpu_dir) == "task0-632f7c41e6"  # CPU keys as before the GPU entry: caches still count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # bf16 autocast: other numbers, other stages
    assert runs.stage_dir(cfg, "task0")[0] != cpu_dir


def test_resume_after_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    clean = run(tmp_path / "clean", "--stage", "pretrain")

    steps = {"n": 0}

    def interrupt(self, model):
        steps["n"] += 1
        if steps["n"] == 11:  # past the state saved at step 9, before the one at step 12
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(strategies.Seq, "after_backward", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed", "--stage", "pretrain")
    partial = glob.glob(f"{tmp_path}/resumed/tiny/pretrain-*")[0]
    assert not os.path.exists(os.path.join(partial, "summary.json"))
    assert runs.read_json(os.path.join(partial, "state", "latest.json"))["dir"] == "step-0000009"
    resumed = run(tmp_path / "resumed", "--stage", "pretrain", "--resume")
    a, b = weights(os.path.join(clean, "final")), weights(os.path.join(resumed, "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [r["step"] for r in runs.read_jsonl(os.path.join(resumed, "metrics.jsonl"))]
    assert lines == [r["step"] for r in runs.read_jsonl(os.path.join(clean, "metrics.jsonl"))]


@pytest.mark.parametrize("flags,message", [
    (["--stage", "task9"], "--stage 'task9'"),
    (["--strategy", "ewc2"], "--strategy 'ewc2'"),
    (["--preset", "huge"], "--preset 'huge'"),
    (["--strategy", "freeze", "--freeze-layers", "3"], "--freeze-layers 3: expected 0..2"),
    (["--strategy", "freeze", "--freeze-layers", "-1"], "--freeze-layers -1"),
    (["--freeze-layers", "1"], "--freeze-layers is a setting of --strategy freeze, not seq"),
    (["--strategy", "ewc", "--ewc-fisher", "exact"], "--ewc-fisher 'exact'"),
    (["--strategy", "replay", "--replay-fraction", "0"], "--replay-fraction 0.0"),
    (["--strategy", "gradproj", "--gp-window", "50,10"], "--gp-window '50,10'"),
    (["--strategy", "taskvector", "--tv-alphas", "a"], "--tv-alphas 'a'"),
    (["--strategy", "lamol", "--lamol-token", "x"], "--lamol-token 'x'"),
    (["--pretrain-lr", "fast"], "--pretrain-lr"),
    (["--state-every", "0"], "--state-every 0: expected 1 or more"),
    (["--n-tasks", "0"], "--n-tasks 0"),
    (["--checkpoint-steps", "0,10,"], "--checkpoint-steps '0,10,'"),
    (["--people", "1"], "--people 1: expected 2 or more"),
    (["--ft-lr", "0"], "--ft-lr 0.0: expected a number > 0"),
    (["--strategy", "freeze", "--freeze-by", "name"], "--freeze-by 'name'"),
    (["--name-pools", "2,2,2"], "name triples"),
    (["--name-pools", "5,5"], "--name-pools '5,5'"),
    (["--seeds", "0,x"], "--seeds '0,x'"),
])
def test_bad_flags_give_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--preset", "tiny", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_with_nothing_to_resume(tmp_path):
    with pytest.raises(runs.UserError, match="nothing to resume"):
        run(tmp_path, "--resume")


def test_malformed_checkpoint_is_a_one_line_error(tmp_path):
    pretrain = run(tmp_path, "--stage", "pretrain")
    with open(os.path.join(pretrain, "final", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(runs.UserError, match="cannot load checkpoint: .*model.safetensors") as err:
        run(tmp_path, "--stage", "task0")
    assert "\n" not in str(err.value)


def test_one_preset_table_holds_every_preset():
    """Data sizes, model, schedules and strategy settings of a preset all come from train.PRESETS; the cpu preset
    is TrainConfig's defaults, whose data sizes are data.DataConfig's."""
    assert train.data_config(train.TrainConfig()) == data.DataConfig()
    expected = {"tiny": (50, 25, 2, (5, 5, 5)), "cpu": (500, 200, 1, (25, 25, 35)), "deep": (300, 120, 1, (15, 15, 20)),
                "paper": (100_000, 20_000, 5, (400, 400, 1000)), "llama-1k": (1000, 400, 1, (50, 50, 70))}
    for name, (people, task_size, n_tasks, pools) in expected.items():
        cfg = train.parse_args(["--preset", name])[0]
        assert train.data_config(cfg) == data.DataConfig(people, task_size, n_tasks, name_pools=pools)
        assert cfg == train.preset_config(name) and cfg.strategy_args == train.PRESETS[name].get("strategy_args", {})
    assert train.parse_args(["--preset", "paper", "--gp-runs", "3", "--stage", "table"])[0].strategy_args == \
        {"freeze_layers": 7, "gp_window": "100,150", "gp_runs": 3}  # a flag adds to the preset's strategy settings


def another_value(value):
    """A valid setting other than `value`, for the hyper-parameters the strategies declare."""
    if isinstance(value, str):
        swaps = {"index": "substring", "per-sample": "authors", "authors": "exact", "shared": "task", "no": "yes"}
        return swaps.get(value, value + ",2" if value.count(",") > 1 else "1,2")
    return value + 1 if isinstance(value, int) else value / 2


def test_cache_key_holds_every_hyper_parameter_of_the_strategy_and_no_other():
    seq = train.parse_args(["--preset", "tiny"])[0]
    other = dataclasses.replace(seq, strategy_args=seq.strategy_args | {"freeze_layers": 2, "ewc_lambda": 1.0})
    assert runs.stage_dir(seq, "task1") == runs.stage_dir(other, "task1")  # not SEQ's settings
    assert runs.stage_dir(seq, "task0") == runs.stage_dir(dataclasses.replace(seq, strategy="ewc"), "task0")  # shared
    for name, cls in strategies.STRATEGIES.items():
        cfg = dataclasses.replace(seq, strategy=name)
        base = runs.stage_dir(cfg, "task1")[0]
        assert base != runs.stage_dir(seq, "task1")[0] or name == "seq"
        for f in dataclasses.fields(cls.Config):
            changed = another_value(f.default)
            changed_cfg = dataclasses.replace(cfg, strategy_args=cfg.strategy_args | {f.name: changed})
            assert runs.stage_dir(changed_cfg, "task1")[0] != base, f.name
            assert runs.stage_dir(changed_cfg, "task2")[0] != runs.stage_dir(cfg, "task2")[0], f.name
    lamol = dataclasses.replace(seq, strategy="lamol")  # LAMOL trains Task 0 its own way: its own Task-0 run
    assert runs.stage_dir(lamol, "task0")[0] != runs.stage_dir(seq, "task0")[0]


def test_pretraining_schedule_warms_up_then_follows_a_cosine_at_hand_computed_steps():
    phase = types.SimpleNamespace(lr=1e-3, min_lr=1e-4, warmup=4, total=14)
    # warm-up lr (step + 1) / 4; then 1e-4 + 9e-4 (1 + cos(pi (step - 4) / 10)) / 2, e.g. step 6: cos(0.2 pi) = 0.809017
    for step, want in [(0, 2.5e-4), (1, 5e-4), (3, 1e-3), (4, 1e-3), (6, 9.140576474687264e-4), (9, 5.5e-4),
                       (14, 1e-4)]:
        assert train.lr_at(step, phase) == pytest.approx(want, rel=1e-9), step
    constant = types.SimpleNamespace(lr=3e-4, min_lr=3e-4, warmup=0, total=5)  # fine-tuning: no warm-up, no decay
    assert [train.lr_at(step, constant) for step in range(5)] == [3e-4] * 5


def test_one_learning_rate_for_every_fine_tuning_stage(tiny_runs):
    """The paper fine-tunes Task 0, every later task and the recovery probe at one lr: a preset can only
    set one (no other lr setting exists), and every fine-tuning step of the tiny run used it."""
    lr_settings = [f.name for f in dataclasses.fields(train.TrainConfig) if "lr" in f.name]
    assert lr_settings == ["pretrain_lr", "pretrain_min_lr", "ft_lr"]
    for name in train.PRESETS:
        assert train.parse_args(["--preset", name])[0].ft_lr > 0
    runs_dir, recover_dir, _ = tiny_runs
    ft_lr = train.parse_args(["--preset", "tiny"])[0].ft_lr
    fine_tuning = [p for p in glob.glob(f"{runs_dir}/tiny/*/**/metrics.jsonl", recursive=True) if "/pretrain-" not in p]
    assert any("/recover-" in p for p in fine_tuning) and any("/task2-" in p for p in fine_tuning)
    for path in fine_tuning:
        assert {r["lr"] for r in runs.read_jsonl(path) if "lr" in r} == {ft_lr}, path


def test_recovery_probe_trains_on_exactly_the_task0_training_people(tiny_runs, monkeypatch):
    cfg = train.parse_args(["--preset", "tiny", "--runs", str(tiny_runs[0])])[0]
    exp = train.Experiment(cfg)
    phases = []

    def record(model, phase, out, cfg, tok, resume, meter):
        phases.append(phase)
        return phase.total, False

    monkeypatch.setattr(train, "train_loop", record)
    train.recover(exp, runs.Stage("recover", str(tiny_runs[0] / "probe-spy"), resume=False, meter=runs.Meter()))
    pad = exp.tok.pad_id
    expected = sorted(tuple(row[row != pad].tolist()) for row in exp.qa_set("task0_train").tokens)
    assert len(phases) == 2 + 2 + 1  # pretrained, Task 0 (= Task-1 step 0), Task-1 steps 2 and 4, the final model
    for phase in phases:
        seen = []
        for inputs, targets, _ in phase.make_epoch(np.random.default_rng(0)):
            pairs = torch.cat([inputs, targets[:, -1:]], 1)  # (B, width): the batch's pairs, padding trimmed
            seen += [tuple(row[row != pad].tolist()) for row in pairs]
        assert sorted(seen) == expected


def test_authors_freeze_set_is_their_substring_rule_on_12_layers():
    model = Transformer(ModelConfig(model_type="gpt_neox", vocab_size=16, n_layer=12, n_head=1, d_model=8, d_ff=8,
                                    max_seq_len=8))
    strategy = strategies.make_strategy("freeze", {"freeze_layers": 7, "freeze_by": "substring"})
    assert strategy.frozen_blocks(12) == [0, 1, 2, 3, 4, 5, 6, 10, 11]
    strategy.start(types.SimpleNamespace(model=model, task=1))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen_hf = {hf for names, hf, _ in key_plan(model) if not set(names) & trainable}
    # their rule, applied to the HF parameter names: the embedding, and every name containing 'layers.i', i < 7
    expected = {hf for _, hf, _ in key_plan(model) if "embed_in" in hf or any(f"layers.{i}" in hf for i in range(7))}
    assert frozen_hf == expected
    assert strategies.make_strategy("freeze", {"freeze_layers": 7}).frozen_blocks(12) == list(range(7))  # the default
    authors_seq = strategies.make_strategy("seq-authors")  # their SEQ's hidden 'layers.1' group
    assert authors_seq.frozen_blocks(12) == [1, 10, 11] and not authors_seq.freeze_embedding


def test_exact_match_by_one_teacher_forced_pass_is_greedy_decoding():
    """evaluate() reads exact match off one forward pass; it must agree, pair by pair, with decoding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=32)).eval()
    tok = types.SimpleNamespace(pad_id=0, eos_id=1)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 40, (int(n),), generator=gen).tolist() for n in torch.randint(3, 9, (40,), generator=gen)]
    # Half the answers are the 4 tokens greedy decoding writes (the last standing for EOS), so they must
    # match; the other half change one token of such an answer, so they must not.
    answers = model.generate(prompts, max_new_tokens=4)
    match = [i % 2 == 0 for i in range(len(answers))]
    for i, a in enumerate(answers):
        if i % 2:
            a[i % 4] = 2 + (a[i % 4] + 1) % 38  # another token
    qa = train.QASet.from_pairs(prompts, answers, pad_id=0, device="cpu")
    qa.attribute = torch.arange(40) // 2 % 2  # two attributes, each with matching and changed answers
    result = train.evaluate(model, qa, tok, batch_size=16)
    expected = [sum(m for m, a in zip(match, qa.attribute.tolist()) if a == k) / 20 for k in (0, 1)]
    assert result["em_by_attribute"] == pytest.approx({"birthday": expected[0], "birth_city": expected[1]})
    first_logits = torch.stack([model(torch.tensor([p]))[0][0, -1] for p in prompts])
    firsts = (first_logits.argmax(-1) == torch.tensor([a[0] for a in answers])).float()
    by_attribute = [firsts[qa.attribute == k].mean().item() for k in (0, 1)]
    assert result["first_token"] == pytest.approx(sum(by_attribute) / 2)


def test_the_files_import_one_another_without_a_circle():
    """model <- data <- strategies <- runs <- report <- train <- analysis: each file builds on those before it
    (theory.py stands alone); runs.py, the plumbing, never imports the science of train.py."""
    import ast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = {name[:-3] for name in os.listdir(root) if name.endswith(".py")}
    imports = {}
    for name in modules:
        with open(os.path.join(root, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        found = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imports[name] = found & modules
    assert "runs" in imports["train"] and "train" not in imports["runs"] and imports["theory"] <= {"model"}

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, seen + (m,))) for m in imports[start])

    assert not [name for name in modules if reaches(name, name)]
