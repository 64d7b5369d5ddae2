"""Files named by a local path or by an object-store URL (gs://bucket/..., also s3://, az://, hf://).

Every file the project reads or writes outside Orbax goes through these functions. A URL is served by
`etils.epath`, which uses TensorFlow's tf.io.gfile when TensorFlow is installed (the `train` extra) and fsspec
otherwise (gs:// then needs gcsfs). A local path takes the os functions the code used before, so local behaviour
and error messages do not change, and a URL is never looked up as a local path of the same name.

Like os.path, an empty path names nothing (epath would read it as the current folder).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from etils import epath

# The schemes epath hands to an object store; any other string is a local path, as before.
URL_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def is_url(path: str) -> bool:
    """Whether `path` names an object in a store (gs://...) rather than a local file."""
    return str(path).startswith(URL_PREFIXES)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    """A folder; on an object store, a prefix that has objects under it (or a folder marker)."""
    if not is_url(path):
        return os.path.isdir(path)
    return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    return epath.Path(path).is_file()


def _stat(url: str) -> epath.stat_utils.StatResult:
    """The object's stat; a missing one raises FileNotFoundError as os.stat does (its strerror is what the local
    error messages show), whatever the backend's own message."""
    try:
        return epath.Path(url).stat()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url) from None


def size(path: str) -> int:
    """Bytes in the file; FileNotFoundError when there is none."""
    if not is_url(path):
        return os.path.getsize(path)
    return _stat(path).length


def mtime(path: str) -> float:
    """Seconds since the epoch of the last modification (whole seconds for a URL; 0 where the store has none)."""
    if not is_url(path):
        return os.path.getmtime(path)
    return _stat(path).mtime


def listdir(path: str) -> list[str]:
    """Names of the entries directly in the folder `path` (OSError as os.listdir raises it)."""
    if not is_url(path):
        return os.listdir(path)
    return [child.name for child in epath.Path(path).iterdir()]


def remove(path: str) -> None:
    if not is_url(path):
        os.remove(path)
    else:
        epath.Path(path).unlink()


def rename(path: str, target: str) -> None:
    """`os.rename`; on an object store, a copy of each object then its deletion (not atomic)."""
    if not is_url(path):
        os.rename(path, target)
    else:
        epath.Path(path).rename(target)


def open_file(path: str, mode: str = "r") -> Any:
    """`open(path, mode)`, text as UTF-8; for a URL, a context manager (TensorFlow's backend gives no plain file
    object), so always use it in a `with`."""
    if not is_url(path):
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    return epath.Path(path).open(mode)


@contextlib.contextmanager
def open_seekable(path: str) -> Iterator[IO[bytes]]:
    """The file opened for reading bytes, and seekable anywhere as a local file is: an object is read whole into
    memory, as TensorFlow's GCS files raise an error of their own when a seek passes the end, which Pillow's format
    probes do on short files. For files read whole anyway, such as images."""
    if not is_url(path):
        with open(path, "rb") as f:
            yield f
        return
    with epath.Path(path).open("rb") as f:
        data = f.read()
    yield io.BytesIO(data)


def makedirs(path: str) -> None:
    """`os.makedirs(path, exist_ok=True)`; object stores have no folders, so for a URL this at most writes a
    folder marker."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
    else:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def absolute(path: str) -> str:
    """`os.path.abspath` of a local path; a URL as it is."""
    return path if is_url(path) else os.path.abspath(path)


def files_under(folder: str) -> list[str]:
    """Every file below `folder`, recursively, as sorted paths relative to it (like `os.walk`)."""
    if not is_url(folder):
        return sorted(
            os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
        )
    found = []

    def visit(directory: epath.Path, prefix: str) -> None:
        for child in directory.iterdir():
            if child.is_dir():
                visit(child, prefix + child.name + "/")
            else:
                found.append(prefix + child.name)

    visit(epath.Path(folder), "")
    return sorted(found)


def _copy_stream(source: IO[bytes], target: IO[bytes]) -> None:
    shutil.copyfileobj(source, target, length=1 << 24)


def _download(url: str, local: str) -> None:
    with epath.Path(url).open("rb") as source, open(local, "wb") as target:
        _copy_stream(source, target)


def _upload(local: str, url: str) -> None:
    with open(local, "rb") as source, epath.Path(url).open("wb") as target:
        target.write(b"")  # tf.io.gfile creates the object at the first write: an empty file needs one too
        _copy_stream(source, target)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """`path` itself when it is local; for a URL, a temporary local copy of the file (or of the files directly in
    the folder), removed on exit.

    For readers that need a real file: safetensors' `safe_open` and `torch.load(mmap=True)` map the file, so the
    host holds one tensor at a time instead of the whole file and its tensors (reading the bytes into memory
    would double a multi-GB UNet); transformers' `from_pretrained` only takes a folder. The copy needs local disk
    (TMPDIR) the size of the file.
    """
    if not is_url(path):
        yield path
        return
    source = epath.Path(path)
    with tempfile.TemporaryDirectory(prefix="tadsr_jax-") as tmp:
        target = os.path.join(tmp, source.name)
        if source.is_dir():
            os.mkdir(target)
            for child in source.iterdir():
                if not child.is_dir():
                    _download(os.fspath(child), os.path.join(target, child.name))
        else:
            _download(path, target)
        yield target


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(local temporary path)`, then put the file at `path`: readers see the old file or the whole new one.

    Locally the temporary file lies beside `path` and is renamed onto it. For a URL it lies in TMPDIR and is
    uploaded as one object, which the store (e.g. GCS) shows only once the upload is complete.
    """
    if is_url(path):
        with tempfile.TemporaryDirectory(prefix="tadsr_jax-") as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            write(local)
            _upload(local, path)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write` of UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def upload_tree(local: str, url: str) -> None:
    """Copy every file below the local folder `local` to the same relative path under `url`, one object each; a
    kill midway leaves some of them there (an object store cannot rename a folder atomically either)."""
    for name in files_under(local):
        _upload(os.path.join(local, name), f"{url.rstrip('/')}/{name}")
