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

Every Figure 4 run is graded twice on its seed's held-out problems: at its last step, and at the
checkpoint (every `save_every` steps) that scores best on the task's dev set (App. E's protocol:
`eval.py --select --dev toy-TASK-dev`, problems never in the test set), at the FLOP spent to reach it.
Then it writes RESULTS.md and its figures under --out from the runs' own metrics.jsonl, summary.json
and eval/: every number on the page is read from a run, none is typed. `--task both` runs each task
under --out/TASK and writes a page that sets them side by side with the reading: does the probe's
shape predict where a short prefix matches full OPD?

    python reproduce.py --task plan --quick    # 1 seed, 8 steps, every experiment: ~20 min on 2 cores
    python reproduce.py --task both            # 5 seeds x Figure 4 on both tasks: the committed docs/RESULTS.md
    cp -r runs/reproduce/{RESULTS.md,accuracy_vs_flop.png} docs/   # and each task's page and figures to docs/TASK/
    python reproduce.py --task both --ablations   # also Table 3, Figure 6 and App. C at every seed

Resumable: a run whose summary.json exists is skipped, so a stopped sweep continues where it
stopped (a run stopped half-way starts again from scratch: --overwrite).

Departures from the paper: a toy task, ~1M-parameter models and a few steps on a CPU (toy.py), one
sample per held-out problem at temperature 1; the accuracy is over the toy's held-out problems; the
dev set is small (eval.TOY_DEV_N), so the dev-picked checkpoint is a noisy choice.
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from eval import TOY_DEV_N

ROOT = Path(__file__).resolve().parent
PROBE_L = 32  # the short prefix of the GKD, window and KL-beyond-the-prefix comparisons

# name: (group, train.py flags). L_train and the objective are all the runs differ in.
EXPERIMENTS = {
    "full OPD": ("fig4", "--prefix 0 --kl-probe-every {probe_every}"),
    "prefix 4": ("fig4", "--prefix 4 --prefix-step 0"),  # plan task: shorter than its plan (tokens 4-6)
    "prefix 8": ("fig4", "--prefix 8 --prefix-step 0"),  # plan task: just past it
    f"prefix {PROBE_L}": ("fig4", f"--prefix {PROBE_L} --prefix-step 0 --kl-probe-every {{probe_every}}"),
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
# per mode: seeds, optimizer steps, held-out problems, checkpoint period for the dev selection (App. E), KL-probe
# period, probe problems, parallel runs, and the seeds of the ablations (Table 3, Figure 6, App. C; --ablations: all)
SETTINGS = {
    "quick": dict(seeds=[0], steps=8, eval_problems=128, save_every=2, probe_every=4, probe_limit=64, workers=2,
                  ablation_seeds=[0]),
    "full": dict(seeds=[0, 1, 2, 3, 4], steps=8, eval_problems=128, save_every=2, probe_every=3, probe_limit=128,
                 workers=2, ablation_seeds=[]),
    "smoke": dict(seeds=[0], steps=1, eval_problems=4, save_every=1, probe_every=1, probe_limit=4, workers=2,
                  ablation_seeds=[0]),  # the pipeline only
}


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace(' ', '_').replace('/', '-').replace('+', 'p')}_s{seed}"


def seeds_of(name: str, s: dict) -> list[int]:
    return s["seeds"] if EXPERIMENTS[name][0] == "fig4" else s["ablation_seeds"]


def run_all(out: Path, s: dict, task: str = "slips"):
    """Every experiment for every seed, skipping finished runs, `workers` at a time with one thread each
    (tiny models gain little from a second thread, much from a second process); then App. E's selection
    for the Figure 4 runs (select); then the probe."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    todo = []
    for seed in sorted({seed for name in EXPERIMENTS for seed in seeds_of(name, s)}):  # seed by seed
        for name, (group, flags) in EXPERIMENTS.items():
            if seed not in seeds_of(name, s):
                continue
            d = run_dir(out, name, seed)
            if (d / "summary.json").exists():
                continue
            cmd = [sys.executable, str(ROOT / "train.py"), "--preset", f"toy-{task}", "--out", str(d), "--seed", str(seed),
                   "--steps", str(s["steps"]), "--eval-problems", str(s["eval_problems"]),
                   "--overwrite", *flags.format(probe_every=s["probe_every"]).split()]
            if name != "full OPD":  # the teacher and the untrained student are graded once per seed
                cmd.append("--no-eval-before")
            if group == "fig4":  # checkpoints for the dev selection
                cmd += ["--save-every", str(s["save_every"])]
            todo.append((f"{name}, seed {seed}", cmd))
    for seed in s["seeds"]:  # one eval.py per seed: the selection of all its Figure 4 runs
        dirs = [run_dir(out, name, seed) for name, (group, _) in EXPERIMENTS.items() if group == "fig4"]
        if not all((d / "eval" / "best.json").exists() for d in dirs):
            todo.append((f"dev selection, seed {seed}", lambda dirs=dirs, seed=seed: select(dirs, task, seed, s, env)))
    with ThreadPoolExecutor(s["workers"]) as pool:  # the selections come last: their runs are done by then
        trains = [pool.submit(run_one, label, job, env) for label, job in todo if isinstance(job, list)]
        [t.result() for t in trains]
        list(pool.map(lambda job: run_one(*job, env), [j for j in todo if callable(j[1])]))
    if not (out / "probe" / "probe.json").exists():
        run_one("teacher-prefix probe", [sys.executable, str(ROOT / "probe.py"), "--benchmark", f"toy-{task}",
                                         "--k", "1", "--limit", str(s["probe_limit"]), "--out", str(out / "probe")], env)


def run_one(label: str, job, env: dict):
    print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)
    if callable(job):
        return job()
    done = subprocess.run(job, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {label} failed:\n{done.stderr[-3000:]}")


def select(dirs: list[Path], task: str, seed: int, s: dict, env: dict):
    """App. E: every checkpoint of each run graded on the task's dev set (eval.TOY_DEV, never a test problem),
    the best one on the run's own test problems (its --seed and --eval-problems, as train.py grades them: the
    same number when the best is the last); eval/best.json per run."""
    run_one(f"eval.py --select, seed {seed}", [
        sys.executable, str(ROOT / "eval.py"), "--backend", "hf", "--select", *map(str, dirs), "--dev",
        f"toy-{task}-dev", "--test", f"toy-{task}", "--toy-n", str(s["eval_problems"]),
        "--toy-seed", str(seed), "--seed", str(seed), "--k", "1"], env)
    for d in dirs:
        chosen = json.loads((d / "eval" / "select.json").read_text())
        best = chosen["best"]
        test = json.loads((d / "eval" / "test" / best / "summary.json").read_text())[f"toy-{task}"]
        meta = json.loads((d / "checkpoints" / best / "meta.json").read_text())
        (d / "eval" / "best.json").write_text(json.dumps(
            {"best": best, "step": meta["step"], "dev_acc": chosen["dev_acc"][best], "test_acc": test["acc"],
             "total_flops": meta["total_flops"]}, indent=1))


def load(out: Path, s: dict) -> dict:
    """{name: [(summary, metrics rows) per seed]}; a Figure 4 run's summary gains "best" (eval/best.json)."""
    runs = {}
    for name, (group, _) in EXPERIMENTS.items():
        for seed in seeds_of(name, s):
            d = run_dir(out, name, seed)
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
            summary = json.loads((d / "summary.json").read_text()) | {"seed": seed}
            if group == "fig4":
                summary["best"] = json.loads((d / "eval" / "best.json").read_text())
            runs.setdefault(name, []).append((summary, rows))
    return runs


def mean_sd(xs) -> str:
    xs = list(xs)
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def spread(xs) -> str:
    """mean ± sd [min, max] over seeds."""
    xs = list(xs)
    return mean_sd(xs) + (f" [{min(xs):.2f}, {max(xs):.2f}]" if len(xs) > 1 else "")


def accuracy_table(runs, names, full_flops) -> list[str]:
    """Last step for every run; for a Figure 4 run also the checkpoint picked on the dev set (App. E), with the
    FLOP spent to reach it."""
    with_best = all("best" in x for name in names for x, _ in runs[name])
    lines = ["| run | L_train | accuracy, last step | " + ("accuracy, best on dev | best step | " if with_best else "")
             + "training FLOP | full OPD's FLOP / this run's | training hours |",
             "| --- | --- | --- | " + ("--- | --- | " if with_best else "") + "---: | ---: | ---: |"]
    for name in names:
        summaries = [x for x, _ in runs[name]]
        L = sorted({r["L_train"] for _, rows in runs[name] for r in rows})
        flops = statistics.mean(x["total_flops"] for x in summaries)
        best = (f"{spread(x['best']['test_acc'] for x in summaries)} | "
                f"{', '.join(str(x['best']['step']) for x in summaries)} | ") if with_best else ""
        lines.append(f"| {name} | {L[0] if len(L) == 1 else f'{L[0]}..{L[-1]}'} | "
                     f"{spread(x['student_acc_after'] for x in summaries)} | {best}{flops:.2e} | "
                     f"{full_flops / flops:.1f}x | {statistics.mean(x['wall_seconds'] for x in summaries) / 3600:.4f} |")
    return lines


def accuracy_panel(ax, runs: dict, title: str, key=lambda x: x["student_acc_after"], flops=lambda x: x["total_flops"]):
    """Figure 4 on one axis: every seed a small point, the mean a marker with its range."""
    for i, (name, (group, _)) in enumerate(EXPERIMENTS.items()):
        if group != "fig4":
            continue
        xs, ys = [flops(x) for x, _ in runs[name]], [key(x) for x, _ in runs[name]]
        color = f"C{i % 10}"
        ax.scatter(xs, ys, s=9, color=color, alpha=0.45, lw=0)
        m = statistics.mean(ys)
        ax.errorbar(statistics.mean(xs), m, yerr=[[m - min(ys)], [max(ys) - m]], marker="o", capsize=3, color=color,
                    label=name)
    first = [x for x, _ in runs["full OPD"]]
    ax.axhline(statistics.mean(x["teacher_acc"] for x in first), color="k", ls="--", lw=1, label="teacher")
    ax.axhline(statistics.mean(x["student_acc_before"] for x in first), color="gray", ls=":", lw=1,
               label="student before")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOP (App. B)")
    ax.set_title(title, fontsize=10)


def figures(out: Path, runs: dict, s: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Figure 4 analog: accuracy against training FLOP, at the last step and at the checkpoint picked on dev
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    accuracy_panel(axes[0], runs, "last step")
    accuracy_panel(axes[1], runs, "best checkpoint on the dev set (App. E), at its FLOP",
                   key=lambda x: x["best"]["test_acc"], flops=lambda x: x["best"]["total_flops"])
    axes[0].set_ylabel("toy accuracy (held-out, 1 sample at T=1)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"accuracy vs training cost, {len(s['seeds'])} seed(s): points are seeds, bars their range")
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


def kl_beyond(rows, L) -> tuple[tuple, tuple]:
    """Mean probe KL inside [0, L) and beyond it, at the first and the last probe of a run (bins of kl_bin)."""
    probes = [r for r in rows if r.get("reverse_kl_by_position_full")]

    def split(r):
        width, bins = r["kl_bin"], r["reverse_kl_by_position_full"]
        inside = [v for b, v in enumerate(bins) if v is not None and (b + 1) * width <= L]
        beyond = [v for b, v in enumerate(bins) if v is not None and b * width >= L]
        return (statistics.mean(inside) if inside else None, statistics.mean(beyond) if beyond else None)
    return split(probes[0]), split(probes[-1])


def kl_beyond_table(runs) -> list[str]:
    """Figure 5's question per run: mean over seeds of the probe KL inside [0, PROBE_L) and beyond it."""
    fmt = lambda vs: "n/a" if None in vs else mean_sd(vs)
    lines = ["| run | KL inside [0, L) first → last probe | KL beyond L first → last probe |", "| --- | --- | --- |"]
    for name in ("full OPD", f"prefix {PROBE_L}"):
        splits = [kl_beyond(rows, PROBE_L) for _, rows in runs[name]]  # per seed ((inside, beyond) first, last)
        cell = lambda probe, part: fmt([sp[probe][part] for sp in splits])
        lines.append(f"| {name} (L = {PROBE_L} for the split) | {cell(0, 0)} → {cell(1, 0)} | "
                     f"{cell(0, 1)} → {cell(1, 1)} |")
    return lines


def gain_shares(runs) -> dict:
    """Per Figure 4 run: (share of full OPD's gain over the untrained student, share of full OPD's FLOP), at the
    last step and at the dev-picked checkpoint (its FLOP: those spent to reach it); means over seeds."""
    first = [x for x, _ in runs["full OPD"]]
    base = statistics.mean(x["student_acc_before"] for x in first)
    mean = lambda name, f: statistics.mean(f(x) for x, _ in runs[name])
    views = {"last": (lambda x: x["student_acc_after"], lambda x: x["total_flops"]),
             "best": (lambda x: x["best"]["test_acc"], lambda x: x["best"]["total_flops"])}
    shares = {}
    for name, (group, _) in EXPERIMENTS.items():
        if group == "fig4" and name != "full OPD":
            for view, (acc, flops) in views.items():
                full_gain = mean("full OPD", acc) - base
                shares[name, view] = ((mean(name, acc) - base) / full_gain if full_gain > 0 else None,
                                      mean(name, flops) / mean("full OPD", flops))
    return shares


def write_page(out: Path, runs: dict, s: dict, mode: str, wall: float, task: str = "slips"):
    full_flops = statistics.mean(summary["total_flops"] for summary, _ in runs["full OPD"])
    first = [summary for summary, _ in runs["full OPD"]]
    seeds = len(s["seeds"])
    names = lambda group: [n for n, (g, _) in EXPERIMENTS.items() if g == group]
    lines = [f"# The paper's experiments on the toy task '{task}' ({mode})", "", provenance(s, mode, wall, task), "",
             f"Teacher {mean_sd(x['teacher_acc'] for x in first)}, student before training "
             f"{mean_sd(x['student_acc_before'] for x in first)}.", "",
             "## Accuracy against training cost (Figure 4, Tables 1-2)", "",
             f"Each run is graded at its last step and at the checkpoint (every {s['save_every']} steps) that scores "
             f"best on the task's dev set (`eval.py --select --dev toy-{task}-dev`: {TOY_DEV_N} problems that are "
             "never test problems), on the run's test problems; the FLOP of that checkpoint are those spent to reach it. "
             f"Accuracy: mean{' ± sd [min, max] over seeds' if seeds > 1 else ''}.", "",
             "![accuracy vs FLOP](accuracy_vs_flop.png)", ""]
    lines += accuracy_table(runs, names("fig4"), full_flops)
    lines += ["", "Reading (computed from the table): share of full OPD's gain over the untrained student, at "
              "what share of its FLOP, at the last step / at the dev-picked checkpoint:", ""]
    pct = lambda v: "n/a (full OPD gained nothing)" if v is None else f"{v:.0%}"
    shares = gain_shares(runs)
    for name in names("fig4")[1:]:
        (g_last, f_last), (g_best, f_best) = shares[name, "last"], shares[name, "best"]
        lines.append(f"- {name}: {pct(g_last)} of the gain at {f_last:.0%} of the FLOP / {pct(g_best)} at {f_best:.0%}")
    lines += ["", "## Reverse KL by position, beyond the prefix (Figures 2 and 5)", "",
              "Every few steps the student samples whole responses for a fixed set of prompts and the teacher "
              "scores them (`--kl-probe-every`; evaluation FLOP, not counted above). Mean"
              f"{' ± sd over seeds' if seeds > 1 else ''}; the figure shows seed {s['seeds'][0]}.", "",
              "![KL by position](kl_by_position.png)", ""] + kl_beyond_table(runs)
    shutil.copy(out / "probe" / "probe.png", out / "teacher_prefix_probe.png")  # the page's figures side by side
    lines += ["", "## Teacher-prefix probe (Figure 3)", "", "![probe](teacher_prefix_probe.png)", ""] + probe_table(out)
    if s["ablation_seeds"]:
        lines += ["", f"## Which tokens get gradient (Table 3), all sampled in full; seed(s) "
                  f"{', '.join(map(str, s['ablation_seeds']))}", ""]
        lines += accuracy_table(runs, names("table3"), full_flops)
        lines += ["", f"## GKD at L_train = {PROBE_L} (Figure 6): beta 0 forward KL, 1 reverse; lambda 0 dataset "
                  "responses, 1 the student's own", ""]
        lines += accuracy_table(runs, names("fig6"), full_flops)
        lines += ["", "## Prefix SeqKD (App. C)", ""]
        lines += accuracy_table(runs, names("appc"), full_flops)
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def provenance(s: dict, mode: str, wall: float, task: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    flags = f" --task {task}" + ("" if mode == "full" else f" --{mode}") + (" --ablations" if mode == "full" and
                                                                            s["ablation_seeds"] else "")
    return (f"Written by `python reproduce.py{flags}` on {date.today()}, commit {commit}, {platform.machine()} CPU with "
            f"{os.cpu_count()} cores, no GPU; {len(s['seeds'])} seed(s) ({', '.join(map(str, s['seeds']))}), "
            f"{s['steps']} steps per run, {s['eval_problems']} held-out problems per seed, 1 sample each at "
            f"temperature 1; the sweep took {wall / 60:.0f} min. FLOP are App. B's count over the actual lengths "
            "(`total_flops`); hours are the runs' training wall time.")


def write_side_by_side(root: Path, pages: dict, s: dict, mode: str):
    """--task both: the two tasks' Figure 4, probe and KL beyond the prefix on one page, and the reading:
    does the probe's shape (how fast a teacher prefix closes the gap) predict where prefix OPD matches full OPD?"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (task, (runs, _)) in zip(axes, pages.items()):
        accuracy_panel(ax, runs, f"toy task '{task}'", key=lambda x: x["best"]["test_acc"],
                       flops=lambda x: x["best"]["total_flops"])
    axes[0].set_ylabel("accuracy of the dev-picked checkpoint")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"prefix OPD against full OPD on two toy tasks, {len(s['seeds'])} seed(s) each (points: seeds)")
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_flop.png", dpi=120)
    plt.close(fig)
    tasks = list(pages)
    lines = [f"# Prefix OPD where its premise holds and where it does not: two toy tasks ({mode})", "",
             provenance(s, mode, sum(w for _, w in pages.values()), "both"), "",
             "slips: every step line of a solution is equally likely to go wrong, so the decisive tokens are spread "
             "over the response. plan: the response opens with a plan line that decides the answer and the student "
             "picks the wrong plan most of the time, so the decisive tokens come first (toy.py). Per-task pages: "
             + ", ".join(f"[{t}]({t}/RESULTS.md)" for t in tasks) + ".", "",
             "![accuracy vs FLOP, both tasks](accuracy_vs_flop.png)", "",
             "## Accuracy of the dev-picked checkpoint (App. E) and its share of full OPD's FLOP", "",
             "| run | " + " | ".join(f"{t}: accuracy | {t}: last step | {t}: FLOP share" for t in tasks) + " |",
             "| --- |" + " ---: | ---: | ---: |" * len(tasks)]
    for name, (group, _) in EXPERIMENTS.items():
        if group != "fig4":
            continue
        cells = []
        for runs, _ in pages.values():
            summaries = [x for x, _ in runs[name]]
            full = statistics.mean(x["best"]["total_flops"] for x, _ in runs["full OPD"])
            cells.append(f"{spread(x['best']['test_acc'] for x in summaries)} | "
                         f"{mean_sd(x['student_acc_after'] for x in summaries)} | "
                         f"{statistics.mean(x['best']['total_flops'] for x in summaries) / full:.0%}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, key in (("teacher", "teacher_acc"), ("student before", "student_acc_before")):
        lines.append(f"| {label} | " + " | ".join(f"{mean_sd(x[key] for x, _ in runs['full OPD'])} | | "
                                                 for runs, _ in pages.values()) + " |")
    lines += ["", "## The teacher-prefix probe (Figure 3), before any training", ""]
    for task in tasks:
        lines += [f"**{task}** ([figure]({task}/teacher_prefix_probe.png))", ""] + probe_table(root / task) + [""]
    lines += ["## The KL beyond the prefix (Figure 5)", ""]
    for task, (runs, _) in pages.items():
        lines += [f"**{task}**", ""] + kl_beyond_table(runs) + [""]
    lines += ["## Reading (computed from the tables above)", ""]
    for task, (runs, _) in pages.items():
        probe = json.loads((root / task / "probe" / "probe.json").read_text())
        lines.append(f"- {task}: {probe_reading(probe)}; {prefix_reading(runs)}.")
    (root / "RESULTS.md").write_text("\n".join(lines) + "\n")


def probe_reading(probe: dict) -> str:
    """How much of the student-teacher gap the shortest teacher prefixes close (probe.py's probe.json)."""
    student, teacher = probe["student_alone"]["acc"], probe["teacher_alone"]["acc"]
    closes = [f"{r['L']} tokens close {(r['acc'] - student) / (teacher - student):.0%}" for r in probe["prefixes"]
              if 0 < r["L"] < probe["teacher_alone"]["L"]]
    return f"the probe: student alone {student:.3f}, teacher {teacher:.3f}; teacher prefixes of " + ", ".join(closes)


def prefix_reading(runs: dict) -> str:
    """The cheapest fixed prefix that reaches 90% of full OPD's gain (dev-picked checkpoints), if any."""
    shares = gain_shares(runs)
    fixed = sorted((int(n.split()[1]), n) for n in runs if re.fullmatch(r"prefix \d+", n))
    for L, name in fixed:
        gain, flops = shares[name, "best"]
        if gain is not None and gain >= 0.9:
            return f"the shortest fixed prefix with >= 90% of full OPD's gain is L_train = {L} ({gain:.0%} at {flops:.0%} of the FLOP)"
    best = max(fixed, key=lambda item: shares[item[1], "best"][0] or -1)[1]
    gain, flops = shares[best, "best"]
    return (f"no fixed prefix reaches 90% of full OPD's gain; the best is {best} "
            f"({'n/a' if gain is None else f'{gain:.0%}'} at {flops:.0%} of the FLOP)")


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
    parser.add_argument("--ablations", action="store_true", help="full mode: also Table 3, Figure 6 and App. C, "
                        "at every seed (quick and smoke always run them, at seed 0)")
    parser.add_argument("--report-only", action="store_true", help="write the page from finished runs only")
    parser.add_argument("--memory-table", action="store_true", help="print the README's memory table (train.py "
                        "--dry-run of the paper's setups on 8 x 80 GB) and exit")
    args = parser.parse_args(argv)
    if args.memory_table:
        return print(memory_table())
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    s = SETTINGS[mode] | ({"ablation_seeds": SETTINGS[mode]["seeds"]} if args.ablations else {})
    root = Path(args.out or f"runs/reproduce{'' if mode == 'full' else '_' + mode}")
    pages = {}
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
        pages[task] = (runs, wall)
        print(f"wrote {out / 'RESULTS.md'}")
    if args.task == "both":
        write_side_by_side(root, pages, s, mode)
        print(f"wrote {root / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
