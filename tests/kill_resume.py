"""Kill train.py with SIGKILL at random moments, resume it, and check that nothing was lost.

    python tests/kill_resume.py --kills 20      # tiny preset, every stage; prints where each kill landed

One uninterrupted run of `python train.py --preset tiny` is the reference (and times its stages). Then
each trial starts the same command in a fresh directory, SIGKILLs it at a random moment of one stage
(the trials take the stages in turn: pretraining, Task 0, Task 1 while it saves checkpoints, Task 2, the
recovery probe), resumes it with --resume and kills it again in the same or a later stage, then lets it
finish. Every file the stages leave (final models and saved checkpoints, metrics.jsonl, summaries less
their timings, recovery-probe results) must be bit-identical to the reference's. Exit status 0 if so.
"""
import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(runs, resume):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--runs", runs] + (["--resume"] if resume else [])


def environment():
    return os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def snapshot(runs):
    """Every file that must survive a kill, by path relative to the runs directory: bytes, or parsed JSON
    without the timings."""
    files = {}
    for path in sorted(glob.glob(os.path.join(runs, "**", "*"), recursive=True)):
        rel = os.path.relpath(path, runs)
        name = os.path.basename(path)
        if os.path.isdir(path) or name.startswith(".") or name.endswith(".png") or name == "train.lock":
            continue
        if "/state/" in f"/{rel}":  # resumable states are deleted once a stage completes
            continue
        if name in ("summary.json", "settings.json"):
            with open(path) as f:
                obj = json.load(f)
            for timing in ("seconds", "time_s"):  # wall-clock; the FLOPs and tokens of a resumed stage must be the same
                obj.pop(timing, None)
            files[rel] = obj
        else:
            with open(path, "rb") as f:
                files[rel] = f.read()
    return files


def run_until(runs, resume, stage=None, delay=0.0):
    """Run train.py; if `stage` is given, SIGKILL it `delay` seconds after that stage starts training.
    Returns (exit status, {stage: seconds from its start to the next stage's start}, where it was killed)."""
    proc = subprocess.Popen(command(runs, resume), env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    starts, timer, lines = {}, None, []
    for line in proc.stdout:  # train.py prints "<stage>: training into <dir>" as each stage begins
        lines.append(line)
        if ": training into" in line:
            name = line.split(":")[0]
            starts[name] = time.time()
            if name == stage and timer is None:
                timer = threading.Timer(delay, proc.send_signal, [signal.SIGKILL])
                timer.start()
    status = proc.wait()
    if timer:
        timer.cancel()
    if status not in (0, -signal.SIGKILL):
        print("".join(lines[-30:]))
        raise SystemExit(f"train.py failed with status {status}")
    names = list(starts)
    durations = {a: starts[b] - starts[a] for a, b in zip(names, names[1:])}
    return status, durations, names[-1] if names else "start-up"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills in all (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="kill-resume-")
    try:
        reference = os.path.join(work, "reference")
        start = time.time()
        _, durations, last = run_until(reference, resume=False)
        durations[last] = time.time() - start - sum(durations.values())
        print(f"reference run: {time.time() - start:.1f} s; stages {', '.join(f'{k} {v:.1f} s' for k, v in durations.items())}")
        expected = snapshot(reference)
        kills, trial, failures = [], 0, 0
        stages = list(durations)
        while len(kills) < args.kills:
            runs = os.path.join(work, f"killed-{trial}")
            # Kill once in one stage, then once in a later one, then let it finish: every stage gets kills.
            first = stages[trial % len(stages)]
            targets = [first] + rng.sample(stages[stages.index(first):], 1)
            resume = False
            for stage in targets:
                status, _, where = run_until(runs, resume, stage, rng.uniform(0, durations[stage]))
                if status == 0:
                    break
                kills.append(where)
                print(f"kill {len(kills):>2}: in {where}")
                resume = True
            status, _, _ = run_until(runs, resume=True)
            got = snapshot(runs)
            same = got.keys() == expected.keys() and all(got[k] == expected[k] for k in expected)
            if not same:
                failures += 1
                diff = sorted(k for k in expected.keys() | got.keys() if got.get(k) != expected.get(k))
                print(f"trial {trial}: DIFFERS from the reference in {diff[:5]}")
            else:
                print(f"trial {trial}: bit-identical to the reference ({len(expected)} files)")
            trial += 1
        by_stage = {s: kills.count(s) for s in dict.fromkeys(kills)}
        print(f"{len(kills)} kills over {trial} runs, by stage: {by_stage}; runs differing: {failures}")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
