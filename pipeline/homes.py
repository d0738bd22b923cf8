"""Folders in the home folder that the libraries write, where a container's home cannot be written.

A container run under another user id (``docker run --user``: ``HOME`` is ``/``) or with a read-only
root file system has a home folder nothing can be written in. W&B's folders are moved by
`pipeline.tracking.wandb_home`; transformers copies a model's own Python code (a model trusted with
``trust_remote_code``) into ``~/.cache/huggingface/modules`` before it imports it, and failed there
as if the model's config.json could not be read.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def cannot_write(folder: str, make: bool = True) -> str | None:
    """Why a file cannot be made in `folder`, or None when one can. `make`: the folder is made if missing (one a
    library makes itself anyway); else a missing folder is judged by its nearest existing parent, left as it was."""
    try:
        if make:
            os.makedirs(folder, exist_ok=True)
        else:
            while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
                if os.path.lexists(folder):  # a file where the folder, or a folder above it, would be
                    raise NotADirectoryError(20, "Not a directory", folder)
                folder = os.path.dirname(folder)
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def xdg_folder(var: str, fallback: str) -> str:
    """An XDG base folder (``XDG_CACHE_HOME``, ``XDG_DATA_HOME``) as platformdirs reads it on Linux: the variable,
    else `fallback` in the home folder."""
    return os.environ.get(var, "").strip() or os.path.expanduser(fallback)


def hf_modules_where_writable() -> str | None:
    """Point ``HF_MODULES_CACHE`` at a temporary folder (removed as the process ends) when its default, in the home
    folder, cannot be written and the user has not set it; the folder, or None. Before transformers is imported: it
    reads the variable once. The copies there are made again each time a model is loaded, so none is lost."""
    if os.environ.get("HF_MODULES_CACHE"):
        return None
    hf_home = os.environ.get("HF_HOME") or os.path.join(xdg_folder("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    if cannot_write(os.path.join(os.path.expanduser(hf_home), "modules"), make=False) is None:
        return None
    folder = tempfile.mkdtemp(prefix="hf-modules-")
    atexit.register(shutil.rmtree, folder, True)
    os.environ["HF_MODULES_CACHE"] = folder
    return folder
