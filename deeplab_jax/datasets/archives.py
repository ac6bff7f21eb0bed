"""Read manual downloads the same way whether they are archives or extracted folders.

TFDS's own extractor needs TensorFlow, so builders read archives with the standard library:
uncompressed tars and zips by random access, compressed tars (`.tgz`) in one streaming pass that keeps
only the wanted members in memory (SBD's `cls/*.mat` are small). An archive that cannot be opened or
streamed (truncated, damaged, not a zip or tar) raises `DamagedArchiveError` naming it.
"""
import abc
import os
import tarfile
from typing import Callable
import zipfile
import zlib


class DamagedArchiveError(ValueError):
  """A manual-download archive cannot be read; the message names it and says what to do."""


class FileTree(abc.ABC):
  """Files under a root, addressed by '/'-separated paths relative to that root."""

  description: str

  @abc.abstractmethod
  def read(self, relpath: str) -> bytes:
    """The bytes of one file."""

  @abc.abstractmethod
  def files(self) -> list[str]:
    """All file paths, sorted."""

  def exists(self, relpath: str) -> bool:
    return relpath in self._file_set()

  def _file_set(self) -> set[str]:
    if not hasattr(self, '_files_cache'):
      self._files_cache = set(self.files())
    return self._files_cache

  def location(self, relpath: str) -> str:
    """A human-readable location of `relpath`, for errors."""
    return f'{self.description}/{relpath}'


class DirTree(FileTree):
  """An extracted folder."""

  def __init__(self, root: str):
    self.root = os.fspath(root)
    self.description = self.root

  def read(self, relpath: str) -> bytes:
    with open(os.path.join(self.root, relpath), 'rb') as f:
      return f.read()

  def exists(self, relpath: str) -> bool:
    return os.path.isfile(os.path.join(self.root, relpath))

  def files(self) -> list[str]:
    found = []
    for folder, _, names in os.walk(self.root, followlinks=True):
      rel = os.path.relpath(folder, self.root)
      for name in names:
        found.append(name if rel == '.' else f'{rel}/{name}'.replace(os.sep, '/'))
    return sorted(found)


class ZipTree(FileTree):
  """Members of a zip file under `prefix` (random access)."""

  def __init__(self, path: str, prefix: str = ''):
    self._zip = zipfile.ZipFile(path)
    self._prefix = prefix
    self.description = f'{path}:{prefix}'.rstrip('/')

  def read(self, relpath: str) -> bytes:
    return self._zip.read(self._prefix + relpath)

  def files(self) -> list[str]:
    n = len(self._prefix)
    return sorted(name[n:] for name in self._zip.namelist()
                  if name.startswith(self._prefix) and not name.endswith('/'))


class TarTree(FileTree):
  """Members of a tar under `prefix`.

  Uncompressed tars are indexed once (headers only) and read by random access. Compressed tars cannot be
  seeked cheaply, so they are streamed once and the members for which `keep(relpath)` is true are held in
  memory.
  """

  def __init__(self, path: str, prefix: str = '', keep: Callable[[str], bool] | None = None):
    self._prefix = prefix
    self.description = f'{path}:{prefix}'.rstrip('/')
    self._members = {}
    self._data = None
    try:
      self._tar = tarfile.open(path, mode='r:')
    except tarfile.ReadError:
      self._tar = None
    if self._tar is not None:
      for member in self._tar.getmembers():
        if member.isfile() and member.name.startswith(prefix):
          self._members[member.name[len(prefix):]] = member
    else:
      self._data = {}
      with tarfile.open(path, mode='r|*') as stream:
        for member in stream:
          rel = member.name[len(prefix):]
          if member.isfile() and member.name.startswith(prefix) and (keep is None or keep(rel)):
            self._data[rel] = stream.extractfile(member).read()

  def read(self, relpath: str) -> bytes:
    if self._data is not None:
      return self._data[relpath]
    return self._tar.extractfile(self._members[relpath]).read()

  def files(self) -> list[str]:
    return sorted(self._data if self._data is not None else self._members)


def open_tree(manual_dir: str, archive_name: str, folder: str, archive_prefix: str,
              keep: Callable[[str], bool] | None = None) -> FileTree | None:
  """Opens `manual_dir/folder` if it exists, else the archive `manual_dir/archive_name`, else None.

  Args:
    manual_dir: where manual downloads live.
    archive_name: the archive's file name as published (e.g. 'VOCtrainval_11-May-2012.tar').
    folder: the extracted folder, relative to `manual_dir` (e.g. 'VOCdevkit/VOC2012').
    archive_prefix: the same folder inside the archive, with a trailing '/'.
    keep: for compressed tars, which relative paths to hold in memory.
  """
  folder_path = os.path.join(manual_dir, folder)
  if os.path.isdir(folder_path):
    return DirTree(folder_path)
  archive_path = os.path.join(manual_dir, archive_name)
  if not os.path.isfile(archive_path):
    return None
  try:
    if zipfile.is_zipfile(archive_path):
      return ZipTree(archive_path, archive_prefix)
    return TarTree(archive_path, archive_prefix, keep)
  except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
    raise DamagedArchiveError(
        f'{archive_path} cannot be read as a zip or tar archive ({type(e).__name__}: '
        f'{" ".join(str(e).split())}): it is truncated or damaged. Download it again, or extract it so that '
        f'{folder_path}/ exists.') from e
