"""The default job end to end: `python train.py` distils the committed toy teacher into the toy
student, and eval.py grades the final checkpoint exactly as train.py's summary did."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TOY = ROOT / "toy"
pytestmark = pytest.mark.skipif(not (TOY / "teacher" / "config.json").exists(),
                                reason="toy checkpoints not built: run `python toy.py`")


def test_default_run_lifts_the_student_and_eval_agrees(tmp_path):
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # the default run as a user starts it
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "run")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(summary)
    assert summary["preset"] == "toy"
    assert summary["student_acc_after"] >= summary["student_acc_before"] + 0.30
    assert summary["student_acc_after"] >= summary["teacher_acc"] - 0.20  # most of the way to the teacher
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000

    final = tmp_path / "run" / "checkpoints" / f"step_{summary['steps']:06d}"
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(final), "--benchmarks", "toy",
                           "--out", str(tmp_path / "eval")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())["toy"]
    assert evaluated["n"] == summary["eval_problems"]
    assert evaluated["acc"] == summary["student_acc_after"]  # same weights, prompts, seeds: same samples


def test_a_resumed_toy_run_reports_the_same_table_as_a_straight_one(tmp_path):
    """The before-training accuracies travel in the checkpoint, so a resumed run still prints and
    saves them, and its after-training accuracy is that of the uninterrupted run (resume is exact)."""
    def train(out, steps, *extra):
        flags = ["--out", str(out), "--steps", str(steps), "--save-every", "1", "--eval-problems", "32"]
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, *extra], cwd=ROOT,
                              env=os.environ | {"TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr, json.loads((out / "summary.json").read_text())

    output, straight = train(tmp_path / "straight", 2)
    assert "eval teacher" in output
    train(tmp_path / "resumed", 1)
    output, resumed = train(tmp_path / "resumed", 2, "--resume")
    assert "eval teacher" not in output  # not evaluated again (the bar's label): read from the checkpoint
    assert "| student before |" in output and "| student after |" in output
    for key in ("teacher_acc", "student_acc_before", "student_acc_after", "eval_problems"):
        assert resumed[key] == straight[key], key


def test_the_plan_task_through_train_probe_and_eval_at_tiny_size(tmp_path):
    """--preset toy-plan, --benchmark toy-plan: the plan task's checkpoints are the default models of all
    three scripts, and a teacher prefix that holds the plan lifts the student (toy/plan, probe.py)."""
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    def script(*cmd):
        done = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    script(ROOT / "train.py", "--preset", "toy-plan", "--steps", "1", "--prompts-per-step", "4",
           "--eval-problems", "16", "--out", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["preset"] == "toy-plan" and summary["eval_problems"] == 16
    assert json.loads((tmp_path / "run" / "args.json").read_text())["student"].endswith("toy/plan/student")
    script(ROOT / "probe.py", "--benchmark", "toy-plan", "--limit", "32", "--k", "1", "--prefixes", "0,16",
           "--out", tmp_path / "probe")
    rows = {r["L"]: r["acc"] for r in json.loads((tmp_path / "probe" / "probe.json").read_text())["prefixes"]}
    assert rows[16] >= rows[0] + 0.3  # the plan sits in the first 8 tokens (toy.py)
    script(ROOT / "eval.py", "--model", TOY / "plan" / "student", "--benchmarks", "toy-plan", "--toy-n", "16",
           "--out", tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["toy-plan"]["n"] == 16
