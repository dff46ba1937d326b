"""
Checkpoints that a crash cannot corrupt and that never put the whole model on one GPU.

What it writes, per saved step, into runs/NAME/checkpoints/step_XXXXXX/:
    model.safetensors, config.json, tokenizer files   the student in Hugging Face format (transformers
                                                      and vLLM load it as it is), gathered on rank 0's CPU
    trainer/                                          the trainer state (student weights and AdamW
                                                      moments) with torch.distributed.checkpoint (DCP):
                                                      every rank writes and later reads only its own shard
    meta.json                                         step, L_train, FLOP, wall time; written last

Why: under FSDP2 a full state dict gathered on every rank is 33 GB of fp32 weights per GPU for an 8B
student, and a full AdamW state loaded on every rank is 66 GB of host RAM per process. Here the Hugging
Face weights are gathered one tensor at a time onto rank 0's CPU (StateDictOptions(full_state_dict=True,
cpu_offload=True)), and the trainer state stays sharded on disk and in memory (DCP). Under DDP the same
code saves each replicated tensor once.

Atomicity: everything is written into .tmp_step_XXXXXX, then renamed into place by rank 0 after every
rank has finished writing; a directory counts as a checkpoint only once its meta.json exists. A crash
at any moment leaves the previous checkpoints as they were.
"""

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: directories appear only by an atomic rename once complete."""
    done = sorted(p for p in ckpt_dir.glob("step_*") if (p / "meta.json").exists()) if ckpt_dir.exists() else []
    return done[-1] if done else None


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns that it 'assumes' one process when there is no process group: here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def hf_weights(hf_model, sharded: bool) -> dict:
    """The student's full weights for save_pretrained: under FSDP2, gathered tensor by tensor onto
    rank 0's CPU (other ranks get an empty dict); otherwise the model's own state dict."""
    if sharded:
        return get_model_state_dict(hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return hf_model.state_dict()


def stream_weights(hf_model, dtype):
    """(name, tensor) of the model's full weights, one at a time, cast to dtype: what a sampler's
    push takes. Under FSDP2 each is all-gathered just before it is yielded and freed after: a
    collective, every rank iterates in step."""
    for name, tensor in hf_model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard
            tensor = tensor.full_tensor()
        yield name, tensor.detach().to(dtype)


def save(ckpt_dir: Path, step: int, model, optimizer, hf_model, tokenizer, meta: dict, *, sharded: bool,
         is_main: bool):
    """Write step_XXXXXX atomically. A collective: every rank calls it."""
    final, tmp = ckpt_dir / f"step_{step:06d}", ckpt_dir / f".tmp_step_{step:06d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    weights = hf_weights(hf_model, sharded)  # collective under FSDP2
    if is_main:
        hf_model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del weights
    model_state, optim_state = get_state_dict(model, optimizer)  # sharded under FSDP2: no gather
    with single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "trainer",
                 no_dist=not dist.is_initialized())
    _barrier()  # every rank's shard is on disk before the directory is marked complete
    if is_main:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the dir complete
        if final.exists():  # re-saving a step after a resume: swap, never delete the good one first
            old = ckpt_dir / f".old_step_{step:06d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    _barrier()


def load(path: Path, model, optimizer) -> dict:
    """Load the trainer state of checkpoint `path` into the (wrapped) model and optimizer, each rank
    reading only its own shard; returns meta.json. A collective: every rank calls it."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=path / "trainer", no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "meta.json").read_text())


# ----------------------------------------------------------------------------- run directories
def open_run_dir(out: Path, run_flags: dict, *, resume: bool, overwrite: bool) -> Path | None:
    """Check --out against --resume/--overwrite before anything is written; returns the checkpoint to
    resume from (None: a fresh run). Refuses, with one line and nothing touched, to start a fresh run
    over an old run's checkpoints, and to resume with other run-defining flags (run_flags: those a
    resume must repeat, JSON-ready; saved in every checkpoint's meta). Every rank calls it."""
    ckpt_dir = out / "checkpoints"
    old = sorted(ckpt_dir.glob("step_*")) if ckpt_dir.exists() else []
    if not resume:
        if old and not overwrite:
            raise SystemExit(f"error: {out} holds the checkpoints of an earlier run (up to {old[-1].name}); add "
                             f"--resume to continue it, or --overwrite to replace it")
        return None
    path = latest(ckpt_dir)
    if path is None:
        return None
    saved = json.loads((path / "meta.json").read_text()).get("run_flags")
    if saved is not None:
        now = run_flags
        differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if differ:
            raise SystemExit(f"error: --resume from {path} with other run-defining flags than it was trained with: "
                             + ", ".join(f"--{k.replace('_', '-')} {now.get(k)} (was {saved.get(k)})" for k in differ))
    return path


def clear_run_dir(out: Path, resume_step: int | None, is_main: bool):
    """Rank 0: with --overwrite, remove the old run; on resume, keep no metrics line after the resumed step
    (those steps are trained again)."""
    if not is_main:
        return
    if resume_step is None:
        for name in ("checkpoints", "metrics.jsonl", "summary.json", "training.png", "tb"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return
    log = out / "metrics.jsonl"
    if log.exists():
        lines = log.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resume_step]
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log)  # atomic: a crash here leaves the old log or the trimmed one
