"""Tests for benchmarks/peers.py's interleaved rounds (no subprocess, no PyTorch: `measure` is replaced)."""
import importlib
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'


@pytest.fixture(name='peers')
def _peers(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # peers.py imports timing.py from its own folder
  return importlib.import_module('peers')


def test_combine_rounds_takes_medians_and_the_highest_peak(peers):
  rounds = [
      {'median_s': 2.0, 'compile_s': 10.0, 'peak_rss_mib': 900.0, 'peak_rss_runs_mib': 800.0,
       'times_s': [2.0, 2.1], 'warmup_s': [3.0]},
      {'median_s': 1.0, 'compile_s': 12.0, 'peak_rss_mib': 950.0, 'peak_rss_runs_mib': 700.0,
       'times_s': [1.0, 1.1], 'warmup_s': [2.5]},
      {'median_s': 4.0, 'compile_s': 11.0, 'peak_rss_mib': 920.0, 'peak_rss_runs_mib': 750.0,
       'times_s': [4.0, 4.2], 'warmup_s': [5.0]},
  ]
  combined = peers.combine_rounds(rounds)
  assert combined['median_s'] == 2.0 and combined['compile_s'] == 11.0
  assert combined['peak_rss_mib'] == 950.0 and combined['peak_rss_runs_mib'] == 800.0
  assert combined['round_median_s'] == [2.0, 1.0, 4.0] and combined['rounds'] == 3
  assert combined['times_s'] == [2.0, 2.1, 1.0, 1.1, 4.0, 4.2]
  assert combined['warmup_s'] == [3.0, 2.5, 5.0]


def test_a_failed_round_fails_the_measurement(peers):
  combined = peers.combine_rounds([{'median_s': 1.0}, {'error': 'child exited with 137'}])
  assert combined['error'] == 'child exited with 137' and 'median_s' not in combined


def test_rounds_run_interleaved_and_print_each_rounds_ratio(peers, monkeypatch, capsys, tmp_path):
  calls = []
  medians = {'ours_xception_train': [6.0, 9.0], 'smp_xception_train': [5.0, 10.0]}

  def fake_measure(name, args, cpus, peers_python):
    calls.append(name)
    return {'median_s': medians[name][sum(c == name for c in calls) - 1], 'peak_rss_mib': 100.0}

  monkeypatch.setattr(peers, 'measure', fake_measure)
  monkeypatch.setattr(peers, 'ensure_peers_venv', lambda venv: (pathlib.Path('python'), {'torch': 'x'}))
  monkeypatch.setattr(sys, 'argv', ['peers.py', '--only=xception_train', '--rounds=2',
                                    f'--json={tmp_path / "out.json"}'])
  assert peers.main() == 0
  assert calls == ['ours_xception_train', 'smp_xception_train'] * 2
  out = capsys.readouterr().out
  assert 'then the median over 2 interleaved rounds' in out
  assert 'Xception-65 V3+ OS16 train b2: 1.20 0.90' in out
  # The table's step row: medians over the rounds (7.5 vs 7.5 s), ratio 1.00.
  step_row = next(line for line in out.splitlines() if line.startswith('Xception-65 V3+ OS16 train b2'))
  assert step_row.split()[7:10] == ['7.500', '7.500', '1.00'], step_row


def test_rounds_must_be_positive(peers, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['peers.py', '--only=mobilenetv2', '--rounds=0'])
  with pytest.raises(SystemExit):
    peers.main()


def test_round_ratios_pair_the_remat_rows_with_their_peers(peers):
  results = {name: {'round_median_s': [2.0, 4.0]} for name in peers.MEASUREMENTS}
  results['smp_xception_train']['round_median_s'] = [1.0, 8.0]
  ratios = dict(peers.round_ratios(['remat'], results))
  assert ratios == {'Xception-65 train b2 remat': [2.0, 0.5], 'ResNet-101 OS8 train b2 remat': [1.0, 1.0]}
