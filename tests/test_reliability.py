"""Interrupted and concurrent runs, disk trouble, and one cache key per setting (train.py, tiny preset)."""
import dataclasses
import errno
import glob
import os
import subprocess
import sys
import time

import pytest
import torch

import runs
import train
from model import read_safetensors

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argv(runs_dir, *flags):
    return ["--preset", "tiny", "--runs", str(runs_dir), *flags]


def final_weights(runs_dir, stage):
    (path,) = glob.glob(f"{runs_dir}/tiny/{stage}-*/final/model.safetensors")
    return read_safetensors(path)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("reference")
    train.main(argv(runs_dir, "--stage", "task0"))
    return runs_dir


def test_a_state_directory_without_latest_json_is_no_state(tmp_path, reference, monkeypatch):
    """A kill after state/ was made but before its first latest.json: --resume starts the stage afresh."""
    real_write_json = runs.write_json

    def die_at_latest(path, obj):
        if path.endswith("latest.json") and "/task0-" in path:
            raise KeyboardInterrupt
        real_write_json(path, obj)

    monkeypatch.setattr(runs, "write_json", die_at_latest)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(tmp_path, "--stage", "task0"))
    (state,) = glob.glob(f"{tmp_path}/tiny/task0-*/state")
    assert not os.path.exists(os.path.join(state, "latest.json"))
    monkeypatch.setattr(runs, "write_json", real_write_json)
    train.main(argv(tmp_path, "--stage", "task0", "--resume"))
    assert same(final_weights(tmp_path, "task0"), final_weights(reference, "task0"))


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, capsys):
    lock = tmp_path / "tiny" / "train.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(holder.pid))
        with pytest.raises(SystemExit) as exit_info:
            runs.cli(train.main, argv(tmp_path, "--stage", "pretrain"))
        message = str(exit_info.value.code)
        assert f"pid {holder.pid}" in message and str(lock) in message and "\n" not in message
        assert lock.read_text() == str(holder.pid)  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # Now the holder is dead: its lock is stale, taken over, and released at the end.
    runs.cli(train.main, argv(tmp_path, "--stage", "pretrain"))
    assert not lock.exists()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads a process's state from /proc (Linux)")
def test_a_lock_held_by_a_killed_process_not_yet_reaped_is_stale(tmp_path):
    """A SIGKILLed holder can linger as a zombie until it is reaped (a killed torchrun's workers wait for the
    system's init, seconds here): it holds nothing, so --resume right after the kill takes its lock over."""
    lock = tmp_path / "tiny" / "train.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder.kill()  # not waited for: a zombie until holder.wait() below
        while runs.process_state(holder.pid) != "Z":
            time.sleep(0.01)
        lock.write_text(str(holder.pid))
        runs.cli(train.main, argv(tmp_path, "--stage", "pretrain"))
        assert not lock.exists()
    finally:
        holder.wait()


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, reference, monkeypatch):
    real, calls = runs.write_safetensors, []

    def fill_disk(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # a state save partway into pretraining
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, tensors, metadata)

    monkeypatch.setattr(runs, "write_safetensors", fill_disk)
    with pytest.raises(SystemExit) as exit_info:
        runs.cli(train.main, argv(tmp_path, "--stage", "task0"))
    message = str(exit_info.value.code)
    assert "No space left on device" in message and calls[2] in message and "\n" not in message
    assert not glob.glob(f"{tmp_path}/tiny/*/state/*/.*.tmp")  # no half-written file left behind
    monkeypatch.setattr(runs, "write_safetensors", real)
    train.main(argv(tmp_path, "--stage", "task0", "--resume"))
    assert same(final_weights(tmp_path, "task0"), final_weights(reference, "task0"))


def test_a_read_only_runs_directory_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "tiny"))

    monkeypatch.setattr(train.os, "makedirs", read_only)
    with pytest.raises(SystemExit) as exit_info:
        runs.cli(train.main, argv(tmp_path, "--stage", "pretrain"))
    assert str(exit_info.value.code).startswith(f"error: {tmp_path / 'tiny'}: Read-only file system")


def test_a_config_built_in_python_has_the_cache_key_of_the_same_flags():
    from_flags = train.parse_args(["--ft-lr", "1", "--checkpoint-steps", "20,10,50,100,150,200,10"])[0]
    in_python = train.TrainConfig(ft_lr=1, checkpoint_steps="10,20,50,100,150,200")
    for stage in ("pretrain", "task0", "task1", "recover"):
        assert runs.stage_dir(in_python, stage) == runs.stage_dir(from_flags, stage)
    ewc = dataclasses.replace(in_python, strategy="ewc", strategy_args={"ewc_lambda": 100})
    assert runs.stage_dir(ewc, "task1") == runs.stage_dir(dataclasses.replace(ewc, strategy_args={"ewc_lambda": 100.0}), "task1")
    with pytest.raises(ValueError, match="--checkpoint-steps"):
        train.TrainConfig(checkpoint_steps="10,x")


@pytest.mark.slow
def test_kills_at_random_moments_lose_nothing():
    """SIGKILL at random moments of every stage, then --resume: bit-identical to an uninterrupted run.
    (A few kills here; `python tests/kill_resume.py --kills 20` for the count in docs/engineering.md.)"""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kill_resume.py"), "--kills", "4"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
