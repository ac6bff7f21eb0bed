"""Timing and peak memory of one benchmark process (standard library only: both `peers.py` and the PyTorch
side, `peers_torch.py`, which runs in a venv without the library, import it from this folder)."""
import statistics
import time


def peak_rss_mib() -> float:
  """This process's peak resident memory (VmHWM) in MiB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  raise RuntimeError('VmHWM not found in /proc/self/status.')


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux clear_refs '5'), so a later read covers only what follows."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def time_runs(run, warmup: int, repeats: int) -> dict:
  """Calls `run()` (which blocks until its results exist) `warmup` + `repeats` times; times and peak RSS.

  The peak RSS of the whole process (`peak_rss_mib`: model building and compilation included) and of the
  runs alone (`peak_rss_runs_mib`: VmHWM reset before the first run; None where the kernel refuses).
  """
  def timed():
    start = time.perf_counter()
    run()
    return time.perf_counter() - start

  peak_before = peak_rss_mib()
  reset = reset_peak_rss()
  warmup_s = [timed() for _ in range(warmup)]
  times_s = [timed() for _ in range(repeats)]
  peak_runs = peak_rss_mib()
  return {'warmup_s': warmup_s, 'times_s': times_s, 'median_s': statistics.median(times_s),
          'peak_rss_mib': max(peak_before, peak_runs), 'peak_rss_runs_mib': peak_runs if reset else None,
          'peak_rss_before_runs_mib': peak_before}
