"""models.py: the one-line errors and the GGUF-only directories it loads through transformers' gguf_file."""

import importlib.util

import pytest

from models import check_model_path, display_path, gguf_kwargs


def test_a_directory_holding_only_a_gguf_file_loads_through_gguf_file(tmp_path):
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"")
    if importlib.util.find_spec("gguf") is None:
        with pytest.raises(ValueError, match="pip install gguf"):
            gguf_kwargs(str(tmp_path))
    else:
        assert gguf_kwargs(str(tmp_path)) == {"gguf_file": "model.Q4_1.gguf"}
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face directory: its own files win
    assert gguf_kwargs(str(tmp_path)) == {}
    assert gguf_kwargs("Qwen/Qwen3-8B") == {}  # a hub name


def test_several_gguf_files_are_refused_in_one_line(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        gguf_kwargs(str(tmp_path))


def test_paths_inside_the_repository_are_shown_relative(tmp_path):
    from conftest import ROOT
    assert display_path(ROOT / "toy" / "student") == "toy/student"
    assert display_path(tmp_path) == str(tmp_path) and display_path("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        check_model_path(str(tmp_path / "absent"), "--student")
