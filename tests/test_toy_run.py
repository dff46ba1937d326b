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
    assert summary["student_acc_after"] >= summary["teacher_acc"] - 0.15
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000

    final = tmp_path / "run" / "checkpoints" / f"step_{summary['steps']:06d}"
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(final), "--benchmarks", "toy",
                           "--out", str(tmp_path / "eval")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())["toy"]
    assert evaluated["n"] == summary["eval_problems"]
    assert evaluated["acc"] == summary["student_acc_after"]  # same weights, prompts, seeds: same samples
