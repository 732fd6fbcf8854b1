"""Where Parquet files live: local paths, ``file://`` and object-store URIs, or an explicit
``pyarrow.fs.FileSystem``, and the few file operations the sinks need on each."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from arrowflow.exceptions import ConfigurationError, ExecutionError

__all__ = [
    "SUCCESS",
    "fsync",
    "is_object_store",
    "make_parent",
    "remove",
    "resolve",
    "touch",
]

#: Where directories are only key prefixes, and a rename is a copy then a delete.
OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})

#: Marks a published dataset, written last (ignored by readers, as every ``_`` file is).
SUCCESS = "_SUCCESS"


def resolve(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None
) -> tuple[pafs.FileSystem, str]:
    """The filesystem ``path`` is on, and the path inside it."""
    text = os.fspath(path)
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise ConfigurationError(
                f"filesystem= takes a pyarrow.fs.FileSystem, not {type(filesystem).__name__}; "
                "wrap an fsspec one as pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))."
            )
        if "://" in text:
            raise ConfigurationError(
                f"{text!r} is a URI and filesystem= is given: pass the path inside the "
                "filesystem (e.g. 'bucket/data/part.parquet'), or the URI alone."
            )
        local = isinstance(filesystem, pafs.LocalFileSystem)
        return filesystem, os.path.abspath(text) if local else text.rstrip("/")
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    try:
        return pafs.FileSystem.from_uri(text)  # type: ignore[no-any-return]
    except pa.ArrowInvalid as exc:
        raise ConfigurationError(
            f"cannot open {text!r}: {exc}. Give a local path, a file://, s3://, gs:// or "
            "abfs:// URI, or filesystem=."
        ) from exc
    except OSError as exc:
        raise ExecutionError(f"cannot open {text!r}: {exc}") from exc


def is_object_store(filesystem: pafs.FileSystem) -> bool:
    return filesystem.type_name in OBJECT_STORES


def make_parent(filesystem: pafs.FileSystem, path: str) -> None:
    """Make the directory ``path`` goes in, on a filesystem that has directories."""
    parent = path.rpartition("/")[0]
    if parent and not is_object_store(filesystem):
        filesystem.create_dir(parent, recursive=True)


def remove(filesystem: pafs.FileSystem, path: str) -> None:
    """Delete the file or the directory tree at ``path``, if there is one."""
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif kind == pafs.FileType.File:
        filesystem.delete_file(path)


def fsync(path: str) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def touch(filesystem: pafs.FileSystem, path: str) -> None:
    make_parent(filesystem, path)
    with filesystem.open_output_stream(path):
        pass
