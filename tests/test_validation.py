"""Every bad setting is refused where its config is built, in one line naming the flag, before anything is
written. The cases for train.py and the strategies are generated from the dataclasses' own fields, so a new
setting is covered without a new line here; the flags of analysis.py, data.py and theory.py are listed."""
import dataclasses
import os

import pytest

import analysis
import data
import runs
import strategies
import theory
import train

# Free-text settings: any string is a valid value, only the empty one is not.
FREE_TEXT = {"runs"}


def bad_values(f):
    """Values of dataclass field f that must be refused, as flag strings: every float that is not finite, a
    number of the wrong type, the values its declared check rejects among a few probes, an unknown word."""
    valid, _ = f.metadata.get("check") or (None, None)
    if f.type is float:
        probes = ["-1", "-0.5", "0", "1.5", "11", "1e9"]
        return ["nan", "inf", "-inf", "x"] + [v for v in probes if valid and not valid(float(v))]
    if f.type is int:
        probes = ["-1", "0", "1", "2"]
        return ["1.5", "x"] + [v for v in probes if valid and not valid(int(v))]
    assert f.type is str, f.name
    return [""] if f.name in FREE_TEXT else ["bogus"]


def flag(name):
    return "--" + name.replace("_", "-")


CONFIG_CASES = [(f.name, value) for f in dataclasses.fields(train.TrainConfig) if f.name != "strategy_args"
                for value in bad_values(f)]
STRATEGY_CASES = [(owner, name, value) for name, (owner, f) in strategies.config_fields().items()
                  for value in bad_values(f)]
# The command lines that once trained, or ended in a traceback, on the tiny preset: each must be refused.
KNOWN_BAD = [
    ["--ft-lr", "inf"], ["--strategy", "lamol", "--lamol-gen-weight", "nan"], ["--ft-lr", "nan"],
    ["--pretrain-lr", "nan"], ["--recover-fraction", "nan"], ["--context", "3"], ["--d-model", "7", "--n-head", "4"],
    ["--early-stop", "1.5"], ["--early-stop", "-0.1"], ["--early-stop", "nan"], ["--strategy", "ewc", "--ewc-lambda", "nan"],
    # strings parsed into numbers: checked with `if`, not `assert` (which python -O removes)
    ["--strategy", "gradproj", "--gp-window", "5,5"], ["--strategy", "gradproj", "--gp-window", "1,2,3"],
    ["--strategy", "taskvector", "--tv-alphas", "-1"], ["--strategy", "taskvector", "--tv-alphas", "nan"],
]


@pytest.fixture
def runs_dir(tmp_path):
    """A runs directory holding one file: a refused command must leave it exactly so."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "sentinel").write_text("untouched")
    return tmp_path


def listing(root):
    return sorted((os.path.relpath(os.path.join(d, name), root), os.path.getsize(os.path.join(d, name)))
                  for d, dirs, files in os.walk(root) for name in dirs + files)


def refused(main, argv, capsys):
    """Run main(argv) as the command line does (runs.cli); returns its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        runs.cli(main, argv)
    code = exit_info.value.code
    assert code not in (0, None)
    message = (capsys.readouterr().err + ("" if isinstance(code, int) else str(code))).strip()
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


def test_every_number_setting_declares_what_is_valid():
    """A new number setting without a check would let nan-free but out-of-range values through unseen."""
    for cls in [train.TrainConfig] + [s.Config for s in strategies.STRATEGIES.values()]:
        for f in dataclasses.fields(cls):
            if f.type in (int, float):
                assert f.metadata.get("check"), f"{cls.__qualname__}.{f.name} has no check"


@pytest.mark.parametrize("name,value", CONFIG_CASES)
def test_train_flag_is_refused_in_one_line_before_anything_is_written(name, value, runs_dir, capsys):
    before = listing(runs_dir)
    argv = ["--preset", "tiny", "--runs", value] if name == "runs" else ["--preset", "tiny", "--runs", str(runs_dir),
                                                                          flag(name), value]
    message = refused(train.main, argv, capsys)
    assert flag(name) in message, message
    assert listing(runs_dir) == before


@pytest.mark.parametrize("owner,name,value", STRATEGY_CASES)
def test_strategy_flag_is_refused_in_one_line_before_anything_is_written(owner, name, value, runs_dir, capsys):
    before = listing(runs_dir)
    message = refused(train.main, ["--preset", "tiny", "--runs", str(runs_dir), "--strategy", owner, flag(name), value],
                      capsys)
    assert flag(name) in message, message
    assert listing(runs_dir) == before


@pytest.mark.parametrize("flags", KNOWN_BAD, ids=" ".join)
def test_command_lines_that_once_got_through_are_refused(flags, runs_dir, capsys):
    before = listing(runs_dir)
    message = refused(train.main, ["--preset", "tiny", "--runs", str(runs_dir), *flags], capsys)
    assert any(f in message for f in flags if f.startswith("--") and f != "--strategy"), message
    assert listing(runs_dir) == before


@pytest.mark.parametrize("name,value", [(n, v) for n, v in CONFIG_CASES if v not in ("x", "1.5") or n in FREE_TEXT])
def test_a_config_built_in_python_is_checked_like_the_flags(name, value):
    f = train.TrainConfig.__dataclass_fields__[name]
    typed = value if f.type is str else f.type(float(value)) if f.type is int else float(value)
    with pytest.raises(ValueError, match=flag(name)):
        train.TrainConfig(**{name: typed})


@pytest.mark.parametrize("owner,name,value", [c for c in STRATEGY_CASES if c[2] not in ("x", "1.5")])
def test_a_strategy_config_built_in_python_is_checked_like_the_flags(owner, name, value):
    f = strategies.STRATEGIES[owner].Config.__dataclass_fields__[name]
    typed = value if f.type is str else int(float(value)) if f.type is int else float(value)
    with pytest.raises(ValueError, match=flag(name)):
        strategies.make_strategy(owner, {name: typed})
    with pytest.raises(ValueError, match=flag(name)):  # and in the settings of a whole run
        train.preset_config("tiny", strategy=owner, strategy_args={name: typed})


@pytest.mark.parametrize("flags,names", [
    (["--resolution", "1"], "--resolution"), (["--resolution", "0"], "--resolution"), (["--resolution", "x"], "--resolution"), (["--prompts", "1"], "--prompts"),
    (["--prompts", "-3"], "--prompts"), (["--run", "no/such/run"], "--run"), (["--out", "FILE"], "--out"),
    (["--ft-lr", "nan"], "--ft-lr"), (["--context", "3"], "--context"),  # train.py's flags, as analysis.py takes them
])
def test_analysis_flags_are_refused_in_one_line(flags, names, runs_dir, capsys):
    flags = [str(runs_dir / "tiny" / "sentinel") if f == "FILE" else f for f in flags]
    before = listing(runs_dir)
    message = refused(analysis.main, ["--preset", "tiny", "--runs", str(runs_dir), *flags], capsys)
    assert names in message, message
    assert listing(runs_dir) == before


TINY = ["--n-people", "50", "--task-size", "25", "--n-tasks", "2", "--name-pools", "5,5,5"]


@pytest.mark.parametrize("flags,names", [
    (["--n-people", "1"], "n_people"), (["--n-people", "x"], "--n-people"), (["--task-size", "0"], "task_size"),
    (["--n-tasks", "-1"], "n_tasks"), (["--seed", "-1"], "seed"), (["--name-pools", "a,b"], "--name-pools"),
    (["--name-pools", "0,5,5"], "name_pools"), (["--name-pools", "2,2,2"], "name triples"), (["--show", "-1"], "--show"),
    (["--show", "1000"], "--show"), (["--pools", "no/such/dir"], "no/such/dir"), (["--out", "FILE"], "FILE"),
])
def test_data_flags_are_refused_in_one_line(flags, names, runs_dir, capsys):
    sentinel = str(runs_dir / "tiny" / "sentinel")
    flags = [sentinel if f == "FILE" else f for f in flags]
    before = listing(runs_dir)
    try:
        code = data.main([*TINY, *flags])
    except SystemExit as e:
        code = e.code
    assert code not in (0, None)
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and names.replace("FILE", sentinel) in message, message
    assert listing(runs_dir) == before


@pytest.mark.parametrize("flags,names", [(["--plot", "FILE"], "--plot"), (["--bogus"], "--bogus")])
def test_theory_flags_are_refused_in_one_line(flags, names, runs_dir, capsys):
    flags = [str(runs_dir / "tiny" / "sentinel") if f == "FILE" else f for f in flags]
    before = listing(runs_dir)
    with pytest.raises(SystemExit) as exit_info:
        theory.main(flags)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and names in message, message
    assert listing(runs_dir) == before


@pytest.mark.parametrize("argv,names", [
    (["train", "--steps", "0"], "--steps"), (["train", "--steps", "x"], "--steps"), (["train", "--preset", "big"], "--preset"),
    (["model", "--batch", "-1"], "--batch"), (["model", "--seq-len", "0"], "--seq-len"), (["eval", "--reps", "0"], "--reps"),
    (["eval", "--checkpoint", "no/such/dir"], "--checkpoint"), (["flops", "--profile", "-1"], "--profile"),
    (["run", "--runs", "no/such/dir"], "--runs"), (["head", "--reps", "1.5"], "--reps"), (["speed"], "speed"),
    (["train", "--bogus"], "--bogus"),
])
def test_bench_flags_are_refused_in_one_line(argv, names, capsys):
    import bench
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and names in message, message
