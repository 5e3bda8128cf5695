"""torchrun: two processes (gloo, on the CPU) train like one process on the same global batch, and resume."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from model import read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--preset", "tiny", "--pretrain-epochs", "1"]  # Task 0: 33 + 10 steps
ENV = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def command(runs, processes, *extra, stage="task0"):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return launcher + ["train.py", *FLAGS, "--stage", stage, "--runs", str(runs), *extra]


def final_weights(runs, stage):
    (path,) = glob.glob(os.path.join(str(runs), "tiny", f"{stage}-*", "final", "model.safetensors"))
    return read_safetensors(path)


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def descendants(pid):
    """Every live process below pid (from /proc: Linux)."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    runs = tmp_path_factory.mktemp("one")
    subprocess.run([sys.executable, "train.py", *FLAGS, "--stage", "task0", "--runs", str(runs)], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    return runs


def test_two_processes_train_as_one(one_process, tmp_path):
    done = subprocess.run(command(tmp_path, 2), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("pretrain", "task0"):  # pretraining (no loss mask) and QA fine-tuning (answer tokens only)
        assert max_difference(final_weights(one_process, stage), final_weights(tmp_path, stage)) <= 1e-5
    summaries = glob.glob(os.path.join(str(tmp_path), "tiny", "*", "summary.json"))
    assert len(summaries) == 2 and '"processes": 2' in open(summaries[0]).read()
    assert done.stdout.count("task0 done") == 1  # rank 0 alone reports


def test_gradient_projection_under_two_processes_edits_gradients_as_one(one_process, tmp_path):
    """Its own machinery under torchrun (preliminary runs on every rank, rank 0's direction broadcast, gradients
    edited after DDP's average) still trains as one process does. (On CPUs the ranks' directions agree even
    unbroadcast; the broadcast is for GPUs, whose kernels need not round alike run to run.)"""
    for runs in (tmp_path / "one", tmp_path / "two"):
        shutil.copytree(one_process, runs)  # the same pretraining and Task 0
    subprocess.run([sys.executable, "train.py", *FLAGS, "--stage", "task1", "--strategy", "gradproj", "--runs",
                    str(tmp_path / "one")], cwd=ROOT, env=ENV, check=True, capture_output=True)
    done = subprocess.run(command(tmp_path / "two", 2, "--strategy", "gradproj", stage="task1"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (final_weights(tmp_path / runs, "task1-gradproj") for runs in ("one", "two"))
    assert max_difference(one, two) <= 1e-5


@pytest.mark.slow
def test_two_processes_resume_after_a_kill(one_process, tmp_path):
    """SIGKILL the whole torchrun group once pretraining has saved a state, then --resume it."""
    run = subprocess.Popen(command(tmp_path, 2, "--state-every", "5"), cwd=ROOT, env=ENV, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(os.path.join(str(tmp_path), "tiny", "pretrain-*", "state", "latest.json")):
        assert time.time() < deadline and run.poll() is None, "the run ended before it saved a state"
        time.sleep(0.05)
    for pid in [run.pid] + descendants(run.pid):  # torchrun starts its workers in process groups of their own
        os.kill(pid, signal.SIGKILL)
    run.wait()
    assert not glob.glob(os.path.join(str(tmp_path), "tiny", "pretrain-*", "summary.json"))
    done = subprocess.run(command(tmp_path, 2, "--state-every", "5", "--resume"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming at step" in done.stdout
    # --state-every is not part of the cache key: the same stages as the uninterrupted run
    for stage in ("pretrain", "task0"):
        assert max_difference(final_weights(one_process, stage), final_weights(tmp_path, stage)) <= 1e-5

# -----------------------------------------------------------------------------------------------
# Strategies under two processes, launched through a small script that runs a chosen part of train.py's
# methods table (report.TABLE) and, for the task-vector check, records what each rank chose.

LAUNCHER = """
import json, os, sys
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
import report, strategies, train, run_helpers

rank = int(os.environ.get("RANK", "0"))
methods, record_dir, argv = sys.argv[1].split("|"), sys.argv[2], sys.argv[3:]
report.TABLE = [row for row in report.TABLE if row[0] in methods]
if record_dir != "-":  # the task-vector check: the ranks' evaluations disagree, and each says what it chose
    def evaluate(model, qa, tok, exact_match=True, batch_size=1024):
        result = run_helpers.fake_evaluate(model, qa, tok, exact_match, batch_size)
        return {{k: 1 - v if isinstance(v, float) and rank else v for k, v in result.items()}}

    def end(self, ctx, original=strategies.TaskVector.end):
        original(self, ctx)
        with open(os.path.join(record_dir, f"rank{{rank}}.json"), "w") as f:
            json.dump({{"best": self.best, "weights": run_helpers.weight_score(ctx.model.named_parameters())}}, f)

    train.evaluate, strategies.TaskVector.end = evaluate, end
train.main(argv)
"""
METHODS = {"ewc": "EWC, per-sample Fisher, lambda 100", "replay": "Replay 20%",
           "freeze": "Freeze the embedding + bottom blocks", "lamol": "LAMOL_g (shared generation token)"}


def launch(runs, processes, methods, record_dir="-", *extra):
    script = os.path.join(str(runs), "launch.py")
    with open(script, "w") as f:
        f.write(LAUNCHER.format(root=ROOT))
    prefix = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    done = subprocess.run(prefix + [script, "|".join(methods), str(record_dir), *FLAGS, "--runs", str(runs), *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def strategy_runs(one_process, tmp_path_factory):
    """EWC, replay, freeze and LAMOL_g on Task 1 (the table's rows), by one process and by two, from the same
    pretraining and Task 0 (LAMOL trains its own Task 0: under two processes too)."""
    root = tmp_path_factory.mktemp("strategies")
    for name, processes in (("one", 1), ("two", 2)):
        shutil.copytree(one_process, root / name)
        launch(root / name, processes, METHODS.values(), "-", "--stage", "table")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    "ewc", "replay", "freeze",
    pytest.param("lamol", marks=pytest.mark.xfail(strict=True, reason="LAMOL's generation loss is a mean over each"
                 " rank's rows, not the global batch's (runs.init_distributed's docstring): on the tiny preset two"
                 " processes end ~2e-4 away from one")),
])
def test_strategies_under_two_processes_train_as_one(strategy_runs, strategy):
    label = {"ewc": "task1-ewc100", "replay": "task1-replay0.2", "freeze": "task1-freeze1", "lamol": "task1-lamol-g"}
    one, two = (final_weights(strategy_runs / name, label[strategy]) for name in ("one", "two"))
    assert max_difference(one, two) <= 1e-5


@pytest.mark.slow
def test_task_vector_choice_is_rank_0s_on_every_rank(one_process, tmp_path):
    """The ranks' evaluations are made to disagree (rank 1 scores 1 - rank 0's score): the point chosen, and so
    the model every rank ends Task 1 with, must still be one, rank 0's."""
    shutil.copytree(one_process, tmp_path / "runs")
    launch(tmp_path / "runs", 2, [], tmp_path, "--stage", "task1", "--strategy", "taskvector", "--early-stop", "0",
           "--tv-min-new", "0")
    rank0, rank1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert rank0["best"] is not None
    assert rank1["best"] == rank0["best"] and rank1["weights"] == rank0["weights"]
