"""
Pictures of a run from its metrics.jsonl: the loss curve, and the per-token reverse KL by response
position over training (the paper's Figures 2 and 5: where in the response the training signal is).

    python plots.py runs/toy
"""

import json
import sys
from pathlib import Path


def training_plots(metrics_path, out_dir):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(steps, [r["loss"] for r in rows], label="loss (Eq. 1, per sequence)")
    ax_loss.plot(steps, [r["reverse_kl"] for r in rows], label="reverse KL per token")
    ax_loss.set_xlabel("step")
    ax_loss.legend()
    ax_loss.set_title("training")
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rows):
        bins, width = r["reverse_kl_by_position"], r["kl_bin"]
        xs = [width * b + width / 2 for b, v in enumerate(bins) if v is not None]
        ys = [v for v in bins if v is not None]
        ax_kl.plot(xs, ys, marker="o", ms=3, color=cmap(i / max(1, len(rows) - 1)), alpha=0.8)
    ax_kl.set_xlabel(f"response position (bins of {rows[-1]['kl_bin']} tokens)")
    ax_kl.set_ylabel("mean log q - log pi_T")
    ax_kl.set_title(f"reverse KL by position, steps {steps[0]}..{steps[-1]} (dark to light)")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "training.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run = Path(sys.argv[1])
    training_plots(run / "metrics.jsonl", run)
    print(f"wrote {run / 'training.png'}")
