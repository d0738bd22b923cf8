"""External storage for reference-mode artifacts: ``file://``, ``s3://`` and ``gs://`` URIs.

In reference mode an artifact records a URI and a sha256 checksum for a file instead of
storing a copy, as W&B's ``add_reference`` does. The bytes live in the user's storage, under
a content-addressed layout (``<root>/sha256/ab/<hex><suffix>``), so publishing the same
content twice writes nothing, and a fetch verifies every byte it reads against the checksum.
All access goes through ``pyarrow.fs`` (local files, S3 and Google Cloud Storage with one API;
credentials come from the usual environment variables of each cloud).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import ConfigError, IntegrityError, RegistryError

SCHEMES = ("file", "s3", "gs")
CHUNK = 8 << 20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    uri: str
    sha256: str
    size: int


def is_uri(value: str) -> bool:
    return urlparse(str(value)).scheme in SCHEMES and "://" in str(value)


def check_uri(uri: str, what: str = "reference") -> str:
    scheme = urlparse(uri).scheme
    if "://" not in uri or scheme not in SCHEMES:
        raise ConfigError(f"{what} {uri!r} is not a file://, s3:// or gs:// URI")
    return uri.rstrip("/")


def _fs(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise RegistryError(f"cannot open {uri}: {e}") from None


def _is_local(fs) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def put(local: Path, root: str, sha256: str, suffix: str = "", *, verify: bool = False) -> Reference:
    """Store `local` (whose sha256 is known) under `root`, unless the same content is already there: a file of its
    size at its content address, and with `verify` one whose bytes hash to `sha256` (read back: a damaged file of
    the same size is written again)."""
    import pyarrow.fs as pafs

    uri = f"{check_uri(root)}/sha256/{sha256[:2]}/{sha256}{suffix}"
    fs, path = _fs(uri)
    size = local.stat().st_size
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File and info.size == size:
        if not verify or _sha256(fs, path) == sha256:
            return Reference(uri, sha256, size)  # content-addressed: the same bytes are there already
        log.warning("%s does not hold the bytes its name says (changed since it was written): writing them again", uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    # Local files appear by rename; object stores make an upload visible only once it completes.
    target = f"{path}.{uuid.uuid4().hex[:8]}.tmp" if _is_local(fs) else path
    try:
        with open(local, "rb") as src, fs.open_output_stream(target) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        if target != path:
            fs.move(target, path)
    except BaseException:
        if target != path:
            try:
                fs.delete_file(target)
            except OSError:
                pass
        raise
    return Reference(uri, sha256, size)


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as src:
        while chunk := src.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_verified(ref: Reference, dest: Path) -> None:
    """Copy the referenced file to `dest`, hashing as it goes; IntegrityError when it differs or is gone."""
    import pyarrow.fs as pafs

    fs, path = _fs(ref.uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise IntegrityError(f"referenced file {ref.uri} is missing")
    h = hashlib.sha256()
    with fs.open_input_stream(path) as src, open(dest, "wb") as dst:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    if h.hexdigest() != ref.sha256:
        dest.unlink(missing_ok=True)
        raise IntegrityError(f"referenced file {ref.uri} does not match its recorded sha256 {ref.sha256[:12]}...: "
                             "it was changed after it was published")


def check(ref: Reference) -> str:
    """``ok``, ``missing`` or ``corrupt``: re-reads the referenced bytes."""
    import pyarrow.fs as pafs

    fs, path = _fs(ref.uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return "missing"
    return "ok" if _sha256(fs, path) == ref.sha256 else "corrupt"


def materialize(uri: str, dest: Path, what: str = "dataset.source") -> Path:
    """A local path for a source URI: ``file://`` as it is, a remote file or prefix downloaded under `dest`."""
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    fs, path = _fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        files = [info]
    elif info.type == pafs.FileType.Directory:
        files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    else:
        raise ConfigError(f"{what} {uri} does not exist")
    base = dest / Path(path).name
    for i in files:
        local = base if i.path == path else base / os.path.relpath(i.path, path)
        local.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(i.path) as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    return base
