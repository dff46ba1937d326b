"""reproduce.py end to end at its smoke size (1 step per run, 4 problems): every experiment runs and the
page gets every section and figure. What the numbers say is the full run's business (docs/RESULTS.md)."""

import os
import subprocess
import sys

from conftest import ROOT


def test_smoke_sweep_writes_every_section_and_figure(tmp_path):
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    page = (tmp_path / "RESULTS.md").read_text()
    for section in ("Figure 4", "Figures 2 and 5", "Figure 3", "Table 3", "Figure 6", "App. C"):
        assert section in page, section
    for name in ("full OPD", "prefix 8", "linear 8 + 16/step", "adaptive 8 + 16", "SeqKD (dataset)", "first 32",
                 "last 32", "GKD b=1 l=0", "prefix SeqKD 32"):
        assert f"| {name} |" in page, name
    for figure in ("accuracy_vs_flop.png", "kl_by_position.png", "teacher_prefix_probe.png"):
        assert (tmp_path / figure).stat().st_size > 1000 and f"]({figure})" in page
    # resumable: a second call skips every finished run and only rewrites the page
    again = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "seed 0" not in again.stdout
