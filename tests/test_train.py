"""train.py end to end at tiny size: outputs, exact DDP, exact resume, and clear errors on bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_qwen3, tiny_tokenizer, write_tiny_run

ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny student, a different tiny teacher (same vocabulary) and a JSONL of 40 problems."""
    return write_tiny_run(tmp_path_factory.mktemp("models"))


def train_args(models, out, steps=2, **extra):
    args = dict(student=models / "student", teacher=models / "teacher", dataset=models / "data.jsonl",
                prefix=6, prefix_step=6, max_new_tokens=24, prompts_per_step=4, samples_per_prompt=2,
                lr=3e-3, steps=steps, micro_batch_tokens=200, save_every=2, kl_bin=8, out=out) | extra
    flags = []
    for k, v in args.items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return flags


def run(flags, nproc=1, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] \
        if nproc > 1 else [sys.executable]
    out = subprocess.run(launcher + [str(ROOT / "train.py")] + flags, cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"train.py failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def params(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_tiny_run_writes_metrics_checkpoints_summary_and_plots(models, tmp_path):
    run(train_args(models, tmp_path / "run", steps=3))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["L_train"] for r in rows] == [6, 12, 18]  # the linear schedule
    for r in rows:
        assert r["rollouts"] == 8 and r["response_tokens"] <= 8 * r["L_train"]
        assert abs(r["ratio_mean"] - 1) < 1e-4  # the trainer's own sampler: pi_theta = q up to rounding
        assert len(r["reverse_kl_by_position"]) == (r["L_train"] + 7) // 8
        assert r["total_flops"] > 0 and r["time_sample"] > 0
        # rates: the step's trained response tokens over its time; no bf16 peak on a CPU, so no MFU
        assert r["tokens_per_second"] == r["response_tokens"] / r["time_step"] and r["mfu"] is None
        assert r["time_step"] >= r["time_sample"] + r["time_score"] + r["time_update"] - 1e-6
        assert 0 <= r["pad_fraction"] < 1
    assert rows[2]["total_flops"] == pytest.approx(sum(r["flops"] for r in rows))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["L_train"] == 18
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["total_flops"] == pytest.approx(rows[-1]["total_flops"])
    # The checkpoint is a Hugging Face model that transformers loads as it is.
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_000003")
    assert torch.equal(loaded.lm_head.weight, params(tmp_path / "run", 3)["lm_head.weight"])


def test_ddp_on_two_processes_equals_one_process(models, tmp_path):
    run(train_args(models, tmp_path / "one"))
    run(train_args(models, tmp_path / "two"), nproc=2)
    a, b = params(tmp_path / "one", 2), params(tmp_path / "two", 2)
    start = load_file(models / "student" / "model.safetensors")
    assert max_diff(a, start) > 1e-3  # training really moved the weights
    assert max_diff(a, b) < 1e-5


def test_resume_after_sigkill_is_exact_and_ignores_a_half_written_checkpoint(models, tmp_path):
    run(train_args(models, tmp_path / "straight", steps=6))
    flags = train_args(models, tmp_path / "killed", steps=6)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + flags, cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step_000002" / "meta.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = tmp_path / "killed" / "checkpoints"
    latest = sorted(p.name for p in ckpts.glob("step_*"))[-1]
    assert latest in ("step_000002", "step_000004"), latest  # killed before the end
    # What a kill in the middle of writing the next checkpoint leaves: a temporary dir, half written.
    half = ckpts / ".tmp_step_000006"
    shutil.copytree(ckpts / latest, half)
    (half / "meta.json").unlink()
    (half / "model.safetensors").write_bytes((half / "model.safetensors").read_bytes()[:100])
    out = run(flags + ["--resume"])
    assert f"resumed from {ckpts / latest}" in out.stdout
    assert max_diff(params(tmp_path / "straight", 6), params(tmp_path / "killed", 6)) == 0.0
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # each step once: the killed run's steps after its checkpoint are gone


def test_malformed_and_missing_datasets_name_the_file_and_line(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "fine"}\n{"problem": 3}\n')
    out = run(train_args(models, tmp_path / "r", dataset=bad), check=False)
    assert out.returncode != 0 and f"{bad} line 2" in out.stderr
    bad.write_text('{"problem": "fine"}\n{not json\n')
    out = run(train_args(models, tmp_path / "r", dataset=bad), check=False)
    assert out.returncode != 0 and f"{bad} line 2 is not valid JSON" in out.stderr
    out = run(train_args(models, tmp_path / "r", dataset=tmp_path / "absent.jsonl"), check=False)
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_vocabulary_mismatch_fails_before_any_sampling(models, tmp_path):
    other = tiny_tokenizer(with_think=False)
    teacher = tmp_path / "teacher"
    m = tiny_qwen3(vocab_size=len(other))
    m.save_pretrained(teacher)
    other.save_pretrained(teacher)
    out = run(train_args(models, tmp_path / "r", teacher=teacher), check=False)
    assert out.returncode != 0 and "different vocabularies" in out.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_prompts_longer_than_the_context_are_skipped_and_counted(models, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"problem": "x" * (200 if i % 5 == 0 else 5)}) + "\n" for i in range(40)))
    short = tmp_path / "short"  # the student's context: 200 positions
    shutil.copytree(models / "student", short)
    config = json.loads((short / "config.json").read_text()) | {"max_position_embeddings": 200}
    (short / "config.json").write_text(json.dumps(config))
    run(train_args(models, tmp_path / "r", student=short, dataset=data, steps=1))
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["prompts_skipped"] == 8


def test_non_finite_steps_are_skipped_then_abort_with_the_last_checkpoint_intact(models, tmp_path):
    nan_teacher = tmp_path / "nan_teacher"
    shutil.copytree(models / "teacher", nan_teacher)
    weights = load_file(nan_teacher / "model.safetensors")
    weights["lm_head.weight"][:] = float("nan")
    from safetensors.torch import save_file
    save_file(weights, nan_teacher / "model.safetensors", metadata={"format": "pt"})
    out = run(train_args(models, tmp_path / "r", teacher=nan_teacher, steps=5, save_every=1), check=False)
    assert out.returncode != 0 and "3 steps in a row with a non-finite" in out.stderr  # train.MAX_BAD_STEPS
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True, True]
    kept = params(tmp_path / "r", 1)  # the step-1 checkpoint: loadable and never touched by a NaN update
    assert max_diff(kept, load_file(models / "student" / "model.safetensors")) == 0.0


def test_fsdp2_on_two_processes_equals_ddp(models, tmp_path):
    """FSDP2 (fully_shard) on CPU with gloo: the same parameters after 2 steps as DDP."""
    run(train_args(models, tmp_path / "ddp"), nproc=2)
    run(train_args(models, tmp_path / "fsdp", fsdp=True), nproc=2)
    assert max_diff(params(tmp_path / "ddp", 2), params(tmp_path / "fsdp", 2)) < 1e-5


@pytest.mark.parametrize("extra, check", [
    (dict(window="2 5"), lambda r: r["response_tokens"] <= 3 * r["rollouts"]),  # Table 3 window [2, 5)
    (dict(last_n=2, ratio_cap=2.0), lambda r: r["response_tokens"] <= 2 * r["rollouts"]),
    (dict(loss="gkd", beta=0.5), lambda r: r["loss"] > 0),  # a divergence: positive
    (dict(loss="sft", rollouts_from="teacher"), lambda r: r["loss"] > 0),  # SeqKD: NLL of teacher samples
])
def test_objective_variants_run(models, tmp_path, extra, check):
    flags = train_args(models, tmp_path / "r", **{k: v for k, v in extra.items() if k != "window"})
    if "window" in extra:
        flags += ["--window"] + extra["window"].split()
    run(flags)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(check(r) and not r["skipped"] for r in rows)


def test_activation_checkpointing_changes_memory_not_results(models, tmp_path):
    run(train_args(models, tmp_path / "plain"))
    run(train_args(models, tmp_path / "ckpt", activation_checkpointing=True))
    assert max_diff(params(tmp_path / "plain", 2), params(tmp_path / "ckpt", 2)) < 1e-6


@pytest.mark.parametrize("loss", ["opd", "gkd", "sft"])
def test_fsdp2_with_unequal_micro_batch_counts_finishes_and_equals_ddp(models, tmp_path, loss):
    """Ranks pack their own rollouts into micro-batches, so their counts differ; under FSDP2 every
    forward and backward is a collective, and a rank with fewer would leave the other waiting forever.
    The shorter rank runs zero-weight micro-batches instead: same student as DDP."""
    data = tmp_path / "uneven.jsonl"  # prompts of very different lengths: uneven packing
    data.write_text("".join(json.dumps({"problem": "x" * (3 + 37 * i % 90)}) + "\n" for i in range(40)))
    flags = dict(micro_batch_tokens=300, loss=loss, prefix=12, prefix_step=0, max_new_tokens=12, dataset=data)
    run(train_args(models, tmp_path / "ddp", **flags), nproc=2)
    run(train_args(models, tmp_path / "fsdp", fsdp=True, **flags), nproc=2)
    rows = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert any(len(set(r["micro_batches"])) > 1 for r in rows), [r["micro_batches"] for r in rows]
    assert max_diff(params(tmp_path / "ddp", 2), params(tmp_path / "fsdp", 2)) < 1e-5


def peak_rss_of(flags):
    """Run train.py and return its peak resident memory in bytes (the child's own ru_maxrss)."""
    env = ENV | {"MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks go back to the OS when freed
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + flags, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-3000:]
    return usage.ru_maxrss * 1024


def test_gkd_peak_memory_does_not_grow_with_the_number_of_micro_batches(tmp_path):
    """GKD computes the teacher's full-vocabulary logits inside the update, one micro-batch at a time:
    8 micro-batches peak where 1 does, not 8 times higher."""
    import memory
    tok = tiny_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):  # a 65,536-token output layer: big logits
        m = tiny_qwen3(vocab_size=65536, seed=seed)
        m.config.eos_token_id, m.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"problem": f"What is {i} + {i}?"}) + "\n"
                                                 for i in range(8)))
    models = tmp_path
    prompt = 120  # tokens of these prompts, about; 4 rollouts of prompt + 16 per micro-batch
    common = dict(loss="gkd", prefix=16, prefix_step=0, max_new_tokens=16, samples_per_prompt=4, steps=1,
                  micro_batch_tokens=4 * (prompt + 16 + 4))
    one = peak_rss_of(train_args(models, tmp_path / "one", prompts_per_step=1, **common))
    eight = peak_rss_of(train_args(models, tmp_path / "eight", prompts_per_step=8, **common))
    rows = [json.loads(line) for line in (tmp_path / "eight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["micro_batches"] == [8]
    one_micro_batch = memory.gkd_logits_bytes(memory.model_shape(tiny_qwen3(vocab_size=65536).config), 4 * 16,
                                              0.5, on_gpu=False)
    print(f"peak RSS: {one / 1e6:.0f} MB at 1 micro-batch, {eight / 1e6:.0f} MB at 8; one micro-batch of GKD "
          f"logits {one_micro_batch / 1e6:.0f} MB")
    assert eight - one < 0.5 * one_micro_batch  # keeping them all would add 7 x one_micro_batch


def test_seqkd_on_dataset_responses_and_the_gkd_lambda_mix(models, tmp_path):
    data = tmp_path / "with_responses.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + {2 * i}?", "response": f"{i} + {2 * i} = {3 * i}"})
                            + "\n" for i in range(40)))
    run(train_args(models, tmp_path / "seqkd", dataset=data, rollouts_from="dataset", loss="sft", steps=2))
    rows = [json.loads(line) for line in (tmp_path / "seqkd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy_fraction"] for r in rows] == [0.0, 0.0]
    assert all(r["response_tokens"] <= r["rollouts"] * r["L_train"] and r["loss"] > 0 for r in rows)
    assert rows[0]["truncated"] == rows[0]["rollouts"]  # "i + 2i = 3i" and its end are longer than L_train = 6
    run(train_args(models, tmp_path / "mix", dataset=data, rollouts_from="dataset", loss="gkd", lmbda=0.5,
                   prompts_per_step=8, steps=3))
    rows = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["on_policy_fraction"] for r in rows]
    assert all(f in {k / 8 for k in range(9)} for f in fractions)
    assert 0 < sum(fractions) / len(fractions) < 1, fractions
    out = run(train_args(models, tmp_path / "bad", dataset=data, lmbda=0.5), check=False)
    assert out.returncode != 0 and "OPD estimator needs the student's own rollouts" in out.stderr


def test_kl_probe_and_adaptive_schedule_log_and_resume(models, tmp_path):
    flags = dict(kl_probe_every=1, adaptive=True, prefix=6, prefix_step=6, steps=4, save_every=2)
    run(train_args(models, tmp_path / "straight", **flags))
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # the probe covers the whole response, past L_train
        assert len(r["reverse_kl_by_position_full"]) == (24 + 7) // 8
    L = [r["L_train"] for r in rows]
    assert L[0] == 6 and all(b - a in (0, 6) for a, b in zip(L, L[1:]))
    for r, L_next in zip(rows, L[1:]):  # L grows exactly after a step that logged a growth
        assert (L_next > r["L_train"]) == (r["adaptive_growth"] is not None)
    flops = sum(r["flops"] for r in rows)
    assert rows[-1]["total_flops"] == pytest.approx(flops)  # the probe's FLOP are not training FLOP
    shutil.rmtree(tmp_path / "straight" / "checkpoints" / "step_000004")
    run(train_args(models, tmp_path / "straight", **flags) + ["--resume"])
    again = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["L_train"] for r in again[-2:]] == L[2:]


def test_run_directories_never_mix_runs(models, tmp_path):
    out = tmp_path / "r"
    run(train_args(models, out, lr=3e-3, steps=4))
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    refused = run(train_args(models, out, lr=1e-5, steps=2), check=False)  # a fresh run into A's directory
    assert refused.returncode != 0 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before  # untouched
    refused = run(train_args(models, out, lr=1e-5, steps=6) + ["--resume"], check=False)
    assert refused.returncode != 0 and "--lr 1e-05 (was 0.003)" in refused.stderr
    run(train_args(models, out, lr=3e-3, steps=6, save_every=3) + ["--resume"])  # may change: steps, save_every
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004", "step_000006"]
    run(train_args(models, out, lr=1e-5, steps=1, save_every=1) + ["--overwrite"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]  # none of the old run's
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


@pytest.mark.parametrize("flags, message", [
    (["--prefix", "-5"], "--prefix must be >= 0"),
    (["--student", "/no/such/student"], "--student /no/such/student: no such checkpoint directory"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--lmbda", "0.5"], "the OPD estimator needs the student's own rollouts"),
])
def test_bad_flags_are_one_line_errors(models, tmp_path, flags, message):
    out = run(train_args(models, tmp_path / "r") + flags, check=False)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_the_ratio_is_one_on_the_trainers_own_rollouts_at_any_temperature(models, tmp_path):
    run(train_args(models, tmp_path / "r", temperature=0.7, steps=1))
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["ratio_mean"] - 1) < 1e-3 and row["ratio_max"] < 1.05, row
