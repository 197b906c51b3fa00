"""Tune's storage on the local disk, written atomically.

Ray Tune snapshots an experiment into a staging directory and then copies the files to
the storage path with ``pyarrow.fs.copy_files``. That copy writes each file in place: a
driver killed (SIGKILL, OOM killer, node loss) in the middle of it leaves a truncated
``experiment_state``/``searcher-state`` file, and the sweep can no longer be restored
(``EOFError: Ran out of input``). :func:`atomic_local_fs` is a local filesystem whose
output streams write a hidden temporary file and rename it into place on close, so each
file in the storage path is always either the previous complete version or the new one.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = ["atomic_local_fs"]


class _AtomicFile:
    """A binary file object that becomes ``path`` only when it is closed."""

    def __init__(self, path: str):
        self.path = path
        head, tail = os.path.split(path)
        self.tmp = os.path.join(head, f".{tail}.{uuid.uuid4().hex[:8]}.tmp")
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed (and renamed) in close()

    closed = property(lambda self: self._f.closed)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def abort(self) -> None:
        """Drop what was written: the previous version stays."""
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """``pyarrow.fs.LocalFileSystem``, with atomic (write, then rename) output streams."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()

    def __reduce__(self):  # Tune ships its storage filesystem to every trial
        return (AtomicLocalHandler, ())

    def __eq__(self, other):
        return isinstance(other, AtomicLocalHandler)

    def __hash__(self):
        return hash(AtomicLocalHandler)

    def get_type_name(self):
        return "atomic-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        out = _AtomicFile(dest)
        try:
            with self.fs.open_input_stream(src) as i:
                while chunk := i.read(1 << 20):
                    out.write(chunk)
        except BaseException:
            out.abort()
            raise
        out.close()

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def atomic_local_fs() -> pafs.FileSystem:
    return pafs.PyFileSystem(AtomicLocalHandler())
