"""Folders the libraries write in the home folder, where it cannot be written."""

from __future__ import annotations

import os

from pipeline.homes import cannot_write, hf_modules_where_writable


def test_the_module_cache_moves_only_where_the_home_folder_cannot_be_written(tmp_path, monkeypatch):
    for var in ("HF_MODULES_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert hf_modules_where_writable() is None and "HF_MODULES_CACHE" not in os.environ
    assert list(home.iterdir()) == []  # judged by its parent, not made: transformers makes it when it needs it

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path / "a-file" / "home"))
    moved = hf_modules_where_writable()
    assert moved is not None and os.environ["HF_MODULES_CACHE"] == moved and os.path.isdir(moved)
    assert cannot_write(moved) is None
    monkeypatch.setenv("HF_MODULES_CACHE", "/elsewhere")  # the user's own setting stays
    assert hf_modules_where_writable() is None and os.environ["HF_MODULES_CACHE"] == "/elsewhere"


def test_a_file_in_a_folder_s_place_is_said(tmp_path):
    (tmp_path / "f").write_text("")
    assert cannot_write(str(tmp_path / "f" / "x"), make=False) == "Not a directory"
    assert cannot_write(str(tmp_path / "f" / "x")) == "Not a directory"
    assert cannot_write(str(tmp_path / "new" / "deeper"), make=False) is None and not (tmp_path / "new").exists()
