"""One run per workdir: an exclusive lock file `<workdir>/run.lock` held for the whole run.

Two runs writing one workdir would delete each other's half-written checkpoints (orbax cleans temporary
directories on start) and interleave their steps. `hold(workdir)` takes the lock or fails at once with a
message naming the holder (pid, host, start time, command) and the workdir:

  with run_lock.hold(workdir):
    train_and_evaluate(config, workdir)

The lock is `fcntl.flock` on the file, so the kernel releases it when the holding process dies, however it
dies (SIGKILL, OOM killer, power loss of a client of a network file system that honours flock); the next run
then takes it over and logs whose stale lock it replaced. Where the file system refuses flock (ENOLCK,
EOPNOTSUPP), the file itself is the lock: created exclusively, and taken over only when it names a process of
this host that no longer runs (the same pid started at another time counts as gone).
"""
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator, Optional

from absl import logging

LOCK_FILE = 'run.lock'
# flock errors that mean "this file system does not do flock", not "someone holds it".
_NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock; the message names it."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds (or held) a lock, as written in the lock file."""
  pid: int
  host: str
  started: str
  command: str
  process_start: Optional[str] = None  # /proc/<pid>/stat start time: tells a reused pid from the holder

  @classmethod
  def current(cls) -> 'Holder':
    pid = os.getpid()
    command = ' '.join([os.path.basename(sys.executable)] + sys.argv)
    return cls(pid=pid, host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
               command=command, process_start=_process_start(pid))

  @classmethod
  def parse(cls, text: str) -> Optional['Holder']:
    try:
      fields = json.loads(text)
      return cls(pid=int(fields['pid']), host=str(fields['host']), started=str(fields['started']),
                 command=str(fields['command']), process_start=fields.get('process_start'))
    except (ValueError, KeyError, TypeError):
      return None

  def describe(self) -> str:
    return f'pid {self.pid} on host {self.host}, started {self.started}, command: {self.command}'

  def is_alive_here(self) -> Optional[bool]:
    """Whether the holder still runs: True/False on its own host, None (unknown) on another host."""
    if self.host != socket.gethostname():
      return None
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      pass  # it exists, under another user
    start = _process_start(self.pid)
    return not (start and self.process_start and start != self.process_start)


def _process_start(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (Linux), to recognise a reused pid."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


class RunLock:
  """The exclusive lock of one workdir. Use `hold(workdir)`; `acquire`/`release` for manual control."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: Optional[int] = None
    self._uses_flock = True
    self.previous: Optional[Holder] = None  # the stale holder taken over, if any

  def acquire(self) -> Holder:
    """Takes the lock or raises WorkdirLockedError at once (it never waits).

    Returns:
      The holder record written (this process).

    Raises:
      WorkdirLockedError: another live process holds the lock.
      OSError: naming the lock file, when it cannot be created or written (read-only or full disk).
    """
    if self._fd is not None:
      raise RuntimeError(f'{self.path} is already held by this RunLock.')
    me = Holder.current()
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = self._acquire_flock()
      if fd is None:
        fd = self._acquire_exclusive_file()
    except OSError as e:
      raise OSError(e.errno, f'Cannot take the workdir lock {self.path}: {e.strerror or e}. Is the workdir '
                    'writable?') from e
    self._fd = fd
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(dataclasses.asdict(me), indent=1) + '\n').encode(), 0)
      os.fsync(fd)
    except OSError as e:
      self.release()
      raise OSError(e.errno, f'Cannot write the workdir lock {self.path}: {e.strerror or e}. Is its disk '
                    'full?') from e
    if self.previous is not None:
      logging.warning('Took over the lock %s left by a run that is no longer running (%s).', self.path,
                      self.previous.describe())
    return me

  def _acquire_flock(self) -> Optional[int]:
    """The locked file descriptor, or None where the file system does not support flock."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirLockedError(self._locked_message(holder)) from None
      except OSError as e:
        os.close(fd)
        if e.errno in _NO_FLOCK_ERRNOS:
          logging.warning('%s: the file system does not support flock (%s); using an exclusive lock file.',
                          self.path, e.strerror)
          self._uses_flock = False
          return None
        raise
      # The holder before us may have removed the file between our open and flock: lock the file that the
      # path names now, or two runs could each hold a different inode.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        self.previous = _read_holder(fd)
        return fd
      os.close(fd)

  def _acquire_exclusive_file(self) -> int:
    """Lock by exclusive creation (no flock): a stale file of a dead process on this host is replaced."""
    for _ in range(3):
      try:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        pass
      try:
        with open(self.path) as f:
          holder = Holder.parse(f.read())
      except FileNotFoundError:
        continue
      alive = holder.is_alive_here() if holder else None
      if alive is False:
        self.previous = holder
        stale = f'{self.path}.stale-{holder.pid}'
        try:
          os.replace(self.path, stale)  # kept for inspection, never deleted here
        except FileNotFoundError:
          pass
        continue
      message = self._locked_message(holder)
      if alive is None:
        message += (f' The holder runs on another host, or the lock file is unreadable: if no run uses this '
                    f'workdir any more, remove {self.path}.')
      raise WorkdirLockedError(message)
    raise WorkdirLockedError(f'Could not take {self.path}: other processes keep taking it.')

  def _locked_message(self, holder: Optional[Holder]) -> str:
    who = holder.describe() if holder else 'a process that has not written its details yet'
    return (f'The workdir {self.workdir} is in use by another run ({who}); its lock is {self.path}. Wait for '
            'that run to finish or stop it, or use another --workdir.')

  def release(self) -> None:
    """Releases the lock and removes the file (a no-op if not held)."""
    if self._fd is None:
      return
    try:
      # Remove while still holding: a process that opened the old file re-checks the inode and retries.
      os.unlink(self.path)
    except OSError:
      pass
    try:
      if self._uses_flock:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None


def _read_holder(fd: int) -> Optional[Holder]:
  try:
    return Holder.parse(os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace'))
  except OSError:
    return None


def read_holder(workdir: str) -> Optional[Holder]:
  """The record in `<workdir>/run.lock` (None if absent or unreadable); says nothing about liveness."""
  try:
    with open(os.path.join(workdir, LOCK_FILE)) as f:
      return Holder.parse(f.read())
  except OSError:
    return None


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[Optional[RunLock]]:
  """Holds the workdir's lock for the `with` block; raises WorkdirLockedError at once if another run has it.

  Args:
    workdir: the run directory (created if missing).
    enabled: False yields None without locking (e.g. on processes other than 0 of a multi-host run, which
      share process 0's workdir).
  """
  if not enabled:
    yield None
    return
  lock = RunLock(workdir)
  lock.acquire()
  try:
    yield lock
  finally:
    lock.release()
