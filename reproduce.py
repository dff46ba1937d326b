"""
The paper's experiments on the toy task, run by one script, and the page that reports them.

What it runs (each a `train.py` run on the toy preset, for every seed; then `probe.py` once):

    Figure 4 / Tables 1-2   accuracy against training FLOP and hours: the base student, full OPD,
                            fixed prefixes (a few tokens to most of a response), the linear schedule,
                            the adaptive schedule (schedule.AdaptivePrefix), SeqKD on the dataset's
                            responses, and the teacher
    Figures 2 and 5         reverse KL by response position over training, over whole responses
                            (train.py --kl-probe-every), for full OPD and for a prefix run
    Figure 3                the teacher-prefix probe (probe.py)
    Table 3                 which tokens get gradient: the first L, a later window of L, the last L
    Figure 6                GKD at a short prefix, beta in {0, 1} x lambda in {0, 1}, beside OPD
    App. C                  prefix SeqKD: SFT on the first L_train tokens of the dataset's responses

Then it writes RESULTS.md and its figures under --out from the runs' own metrics.jsonl and
summary.json: every number on the page is read from a run, none is typed.

    python reproduce.py --quick --out runs/reproduce_quick     # 1 seed, 8 steps: minutes on 2 cores
    python reproduce.py --out runs/reproduce                   # 3 seeds, the committed docs/RESULTS.md

Resumable: a run whose summary.json exists is skipped, so a stopped sweep continues where it
stopped (a run stopped half-way starts again from scratch: --overwrite).

Departures from the paper: a toy task, ~1M-parameter models and tens of steps on a CPU (toy.py), one
sample per held-out problem at temperature 1; the accuracy is over the toy's held-out problems.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROBE_L = 32  # the short prefix of the GKD, window and KL-beyond-the-prefix comparisons

# name: (group, train.py flags). L_train and the objective are all the runs differ in.
EXPERIMENTS = {
    "full OPD": ("fig4", "--prefix 0 --kl-probe-every {probe_every}"),
    "prefix 4": ("fig4", "--prefix 4 --prefix-step 0"),  # plan task: shorter than its plan (tokens 4-6)
    "prefix 8": ("fig4", "--prefix 8 --prefix-step 0"),
    "prefix 16": ("fig4", "--prefix 16 --prefix-step 0"),
    f"prefix {PROBE_L}": ("fig4", f"--prefix {PROBE_L} --prefix-step 0 --kl-probe-every {{probe_every}}"),
    "prefix 64": ("fig4", "--prefix 64 --prefix-step 0"),
    "prefix 128": ("fig4", "--prefix 128 --prefix-step 0"),
    "linear 8 + 16/step": ("fig4", "--prefix 8 --prefix-step 16"),
    "adaptive 8 + 16": ("fig4", "--prefix 8 --prefix-step 16 --adaptive --kl-probe-every 1"),
    "SeqKD (dataset)": ("fig4", "--prefix 0 --rollouts-from dataset --loss sft"),
    f"prefix SeqKD {PROBE_L}": ("appc", f"--prefix {PROBE_L} --prefix-step 0 --rollouts-from dataset --loss sft"),
    f"first {PROBE_L}": ("table3", f"--prefix 0 --window 0 {PROBE_L}"),
    f"window {PROBE_L}-{2 * PROBE_L}": ("table3", f"--prefix 0 --window {PROBE_L} {2 * PROBE_L}"),
    f"last {PROBE_L}": ("table3", f"--prefix 0 --last-n {PROBE_L}"),
    "GKD b=0 l=0": ("fig6", f"--prefix {PROBE_L} --prefix-step 0 --loss gkd --beta 0 --lmbda 0 --rollouts-from dataset"),
    "GKD b=0 l=1": ("fig6", f"--prefix {PROBE_L} --prefix-step 0 --loss gkd --beta 0 --lmbda 1 --rollouts-from dataset"),
    "GKD b=1 l=0": ("fig6", f"--prefix {PROBE_L} --prefix-step 0 --loss gkd --beta 1 --lmbda 0 --rollouts-from dataset"),
    "GKD b=1 l=1": ("fig6", f"--prefix {PROBE_L} --prefix-step 0 --loss gkd --beta 1 --lmbda 1 --rollouts-from dataset"),
}
SETTINGS = {  # per mode: seeds, optimizer steps, held-out problems, KL-probe period, parallel runs
    "quick": dict(seeds=[0], steps=8, eval_problems=128, probe_every=4, probe_limit=64, workers=2),
    "full": dict(seeds=[0, 1, 2], steps=10, eval_problems=128, probe_every=3, probe_limit=128, workers=2),
    "smoke": dict(seeds=[0], steps=1, eval_problems=4, probe_every=1, probe_limit=4, workers=2),  # the pipeline only
}


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace(' ', '_').replace('/', '-').replace('+', 'p')}_s{seed}"


def run_all(out: Path, s: dict, task: str = "slips"):
    """Every experiment for every seed, skipping finished runs, `workers` at a time with one thread each
    (tiny models gain little from a second thread, much from a second process); then the probe."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    todo = []
    for seed in s["seeds"]:
        for name, (_, flags) in EXPERIMENTS.items():
            d = run_dir(out, name, seed)
            if (d / "summary.json").exists():
                continue
            cmd = [sys.executable, str(ROOT / "train.py"), "--preset", f"toy-{task}", "--out", str(d), "--seed", str(seed),
                   "--steps", str(s["steps"]), "--eval-problems", str(s["eval_problems"]),
                   "--overwrite", *flags.format(probe_every=s["probe_every"]).split()]
            if name != "full OPD":  # the teacher and the untrained student are graded once per seed
                cmd.append("--no-eval-before")
            todo.append((f"{name}, seed {seed}", cmd))
    with ThreadPoolExecutor(s["workers"]) as pool:
        list(pool.map(lambda job: run_one(*job, env), todo))
    if not (out / "probe" / "probe.json").exists():
        run_one("teacher-prefix probe", [sys.executable, str(ROOT / "probe.py"), "--benchmark", f"toy-{task}",
                                         "--k", "1", "--limit",
                                         str(s["probe_limit"]), "--out", str(out / "probe")], env)


def run_one(label: str, cmd: list[str], env: dict):
    print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {label} failed:\n{done.stderr[-3000:]}")


def load(out: Path, s: dict) -> dict:
    """{name: [(summary, metrics rows) per seed]}."""
    runs = {}
    for name in EXPERIMENTS:
        for seed in s["seeds"]:
            d = run_dir(out, name, seed)
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
            runs.setdefault(name, []).append((json.loads((d / "summary.json").read_text()), rows))
    return runs


def mean_sd(xs) -> str:
    xs = list(xs)
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def accuracy_table(runs, names, full_flops) -> list[str]:
    lines = ["| run | L_train | accuracy | training FLOP | full OPD's FLOP / this run's | training hours |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for name in names:
        summaries = [s for s, _ in runs[name]]
        last = runs[name][0][1]
        L = sorted({r["L_train"] for r in last})
        flops = statistics.mean(s["total_flops"] for s in summaries)
        lines.append(f"| {name} | {L[0] if len(L) == 1 else f'{L[0]}..{L[-1]}'} | "
                     f"{mean_sd(s['student_acc_after'] for s in summaries)} | {flops:.2e} | "
                     f"{full_flops / flops:.1f}x | {statistics.mean(s['wall_seconds'] for s in summaries) / 3600:.4f} |")
    return lines


def figures(out: Path, runs: dict, s: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Figure 4 analog: accuracy against training FLOP
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (group, _) in EXPERIMENTS.items():
        if group != "fig4":
            continue
        xs = [summary["total_flops"] for summary, _ in runs[name]]
        ys = [summary["student_acc_after"] for summary, _ in runs[name]]
        ax.errorbar(statistics.mean(xs), statistics.mean(ys), yerr=statistics.stdev(ys) if len(ys) > 1 else None,
                    marker="o", capsize=3, label=name)
    first = [summary for summary, _ in runs["full OPD"]]
    ax.axhline(statistics.mean(x["teacher_acc"] for x in first), color="k", ls="--", lw=1, label="teacher")
    ax.axhline(statistics.mean(x["student_acc_before"] for x in first), color="gray", ls=":", lw=1, label="student before")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOP (App. B)")
    ax.set_ylabel("toy accuracy (held-out, 1 sample at T=1)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("accuracy vs training cost")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flop.png", dpi=120)
    plt.close(fig)

    # Figures 2 and 5 analog: reverse KL by position over whole responses, over training
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, name in zip(axes, ["full OPD", f"prefix {PROBE_L}"]):
        rows = [r for r in runs[name][0][1] if r.get("reverse_kl_by_position_full")]
        cmap = plt.get_cmap("viridis")
        for i, r in enumerate(rows):
            width = r["kl_bin"]
            bins = r["reverse_kl_by_position_full"]
            xs = [width * b + width / 2 for b, v in enumerate(bins) if v is not None]
            ax.plot(xs, [v for v in bins if v is not None], marker="o", ms=3, color=cmap(i / max(1, len(rows) - 1)),
                    label=f"step {r['step']}")
        if name != "full OPD":
            ax.axvline(PROBE_L, color="r", ls="--", lw=1, label=f"L_train = {PROBE_L}")
        ax.set_title(f"{name} (seed {s['seeds'][0]})")
        ax.set_xlabel("response position (tokens)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("reverse KL per token, whole responses")
    fig.tight_layout()
    fig.savefig(out / "kl_by_position.png", dpi=120)
    plt.close(fig)


def probe_table(out: Path) -> list[str]:
    """probe.py's own table, without its heading."""
    return [line for line in (out / "probe" / "probe.md").read_text().strip().splitlines() if not line.startswith("#")]


def kl_beyond(rows, L) -> tuple[float | None, float | None]:
    """Mean probe KL inside [0, L) and beyond it, at the first and the last probe of a run (bins of kl_bin)."""
    probes = [r for r in rows if r.get("reverse_kl_by_position_full")]

    def split(r):
        width, bins = r["kl_bin"], r["reverse_kl_by_position_full"]
        inside = [v for b, v in enumerate(bins) if v is not None and (b + 1) * width <= L]
        beyond = [v for b, v in enumerate(bins) if v is not None and b * width >= L]
        return (statistics.mean(inside) if inside else None, statistics.mean(beyond) if beyond else None)
    return split(probes[0]), split(probes[-1])


def write_page(out: Path, runs: dict, s: dict, mode: str, wall: float, task: str = "slips"):
    full_flops = statistics.mean(summary["total_flops"] for summary, _ in runs["full OPD"])
    first = [summary for summary, _ in runs["full OPD"]]
    teacher = mean_sd(x["teacher_acc"] for x in first)
    before = mean_sd(x["student_acc_before"] for x in first)
    seeds = len(s["seeds"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    names = lambda group: [n for n, (g, _) in EXPERIMENTS.items() if g == group]
    lines = [f"# The paper's experiments on the toy task '{task}' ({mode})", "",
             f"Written by `python reproduce.py --task {task}{'' if mode == 'full' else ' --' + mode}` on {date.today()}, commit "
             f"{commit}, {platform.machine()} CPU with {os.cpu_count()} cores, no GPU; {seeds} seed(s) "
             f"({', '.join(map(str, s['seeds']))}), {s['steps']} steps per run, {s['eval_problems']} held-out "
             f"problems, 1 sample each at temperature 1; the sweep took {wall / 60:.0f} min. Accuracy is mean"
             f"{' ± sd over seeds' if seeds > 1 else ''}. FLOP are App. B's count over the actual lengths "
             f"(`total_flops`); hours are the runs' training wall time.", "",
             f"Teacher {teacher}, student before training {before}.", "",
             "## Accuracy against training cost (Figure 4, Tables 1-2)", "",
             "![accuracy vs FLOP](accuracy_vs_flop.png)", ""]
    lines += accuracy_table(runs, names("fig4"), full_flops)
    lines += ["", "Reading (computed from the table): share of full OPD's gain over the untrained student, at "
              "what share of its FLOP:", ""]
    gain = lambda name: statistics.mean(x["student_acc_after"] for x, _ in runs[name])
    base, full_gain = statistics.mean(x["student_acc_before"] for x in first), gain("full OPD")
    for name in names("fig4")[1:]:
        flops = statistics.mean(x["total_flops"] for x, _ in runs[name])
        share = f"{(gain(name) - base) / (full_gain - base):.0%}" if full_gain != base else "n/a (full OPD gained nothing)"
        lines.append(f"- {name}: {share} of the gain at {flops / full_flops:.0%} of the FLOP")
    lines += ["", "## Reverse KL by position, beyond the prefix (Figures 2 and 5)", "",
              "Every few steps the student samples whole responses for a fixed set of prompts and the teacher "
              "scores them (`--kl-probe-every`; evaluation FLOP, not counted above).", "",
              "![KL by position](kl_by_position.png)", "",
              "| run | KL inside [0, L) first → last probe | KL beyond L first → last probe |", "| --- | --- | --- |"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    for name in ("full OPD", f"prefix {PROBE_L}"):
        (i0, b0), (i1, b1) = kl_beyond(runs[name][0][1], PROBE_L)
        lines.append(f"| {name} (L = {PROBE_L} for the split) | {fmt(i0)} → {fmt(i1)} | {fmt(b0)} → {fmt(b1)} |")
    shutil.copy(out / "probe" / "probe.png", out / "teacher_prefix_probe.png")  # the page's figures side by side
    lines += ["", "## Teacher-prefix probe (Figure 3)", "", "![probe](teacher_prefix_probe.png)", ""] + probe_table(out)
    lines += ["", "## Which tokens get gradient (Table 3), all sampled in full", ""]
    lines += accuracy_table(runs, names("table3"), full_flops)
    lines += ["", f"## GKD at L_train = {PROBE_L} (Figure 6): beta 0 forward KL, 1 reverse; lambda 0 dataset "
              "responses, 1 the student's own", ""]
    lines += accuracy_table(runs, names("fig6") + [f"prefix {PROBE_L}"], full_flops)
    lines += ["", "## Prefix SeqKD (App. C)", ""]
    lines += accuracy_table(runs, names("appc") + ["SeqKD (dataset)"], full_flops)
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


# The setups of the README's memory table: train.py flags (paper §4-5, on 8 x 80 GB)
MEMORY_SETUPS = {
    "1.7B, L_train 1024": "--prefix 1024",
    "1.7B, linear schedule": "--prefix 1 --prefix-step 256",
    "1.7B, full OPD": "--prefix 0",
    "1.7B, GKD at 256": "--loss gkd --prefix 256 --samples-per-prompt 1",
    "8B FSDP2, L_train 1024": "--preset qwen3-8b --fsdp --sampler vllm --prefix 1024",
    "8B FSDP2, full OPD": "--preset qwen3-8b --fsdp --sampler vllm --prefix 0",
    "8B DDP, L_train 1024": "--preset qwen3-8b --prefix 1024",
}


def memory_table(python: str = sys.executable) -> str:
    """The README's memory table: the JSON line of `train.py --dry-run` for each setup, GB per GPU."""
    results = {}
    for name, flags in MEMORY_SETUPS.items():
        out = subprocess.run([python, str(ROOT / "train.py"), "--dry-run", "--sampler", "vllm", *flags.split()],
                             capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
                                                                  "PATH": "/usr/bin:/bin"})
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    parts = list(dict.fromkeys(p for r in results.values() for p in r["parts"]))
    lines = ["| GB per GPU | " + " | ".join(results) + " |", "| --- |" + " ---: |" * len(results)]
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{r['parts'][part]:.1f}" if part in r["parts"] else ""
                                                  for r in results.values()) + " |")
    lines.append("| **peak** | " + " | ".join(f"**{r['peak_gb']:.1f}**" for r in results.values()) + " |")
    lines.append("| fits 80 GB | " + " | ".join("yes" if r["fits"] else f"no: {r['fit_hint']}"
                                                for r in results.values()) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The paper's experiments on the toy, and docs/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 steps, 128 problems")
    parser.add_argument("--out", default=None, help="directory for the runs and RESULTS.md "
                        "(default: runs/reproduce, or runs/reproduce_quick)")
    parser.add_argument("--smoke", action="store_true", help="1 step per run, 4 problems: tests the pipeline, "
                        "says nothing about the results")
    parser.add_argument("--task", choices=["slips", "plan", "both"], default="slips", help="the toy task (toy.py): "
                        "slips spread evenly, or a plan that opens the response; both: each under --out/TASK")
    parser.add_argument("--report-only", action="store_true", help="write the page from finished runs only")
    parser.add_argument("--memory-table", action="store_true", help="print the README's memory table (train.py "
                        "--dry-run of the paper's setups on 8 x 80 GB) and exit")
    args = parser.parse_args(argv)
    if args.memory_table:
        return print(memory_table())
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    s = SETTINGS[mode]
    root = Path(args.out or f"runs/reproduce{'' if mode == 'full' else '_' + mode}")
    for task in ("slips", "plan") if args.task == "both" else (args.task,):
        out = root / task if args.task == "both" else root
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        if not args.report_only:
            run_all(out, s, task)
        timing = out / "wall_seconds.json"  # the sweep's own time, summed over resumed sessions
        wall = (json.loads(timing.read_text())["wall_seconds"] if timing.exists() else 0.0) + time.time() - started
        if not args.report_only:
            timing.write_text(json.dumps({"wall_seconds": wall}))
        runs = load(out, s)
        figures(out, runs, s)
        write_page(out, runs, s, mode, wall, task)
        print(f"wrote {out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
