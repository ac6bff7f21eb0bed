"""DeepLab entry point: `python -m deeplab_jax.main --config=configs/synthetic.py --workdir=runs/synthetic`.

Config fields are overridden on the command line (`--config.train.batch_size=8`). Several processes (hosts,
or several processes on one machine) are joined with `jax.distributed` when `--num_processes > 1`, when
`JAX_COORDINATOR_ADDRESS` is set, or on a cluster JAX detects itself (`--distributed`).
"""
import logging as python_logging
import os
import sys

from deeplab_jax import hugepages  # no JAX: the process restarts (CPU-only installs) before JAX loads
if __name__ == '__main__':  # glibc reads GLIBC_TUNABLES only when a process starts
  hugepages.reexec_with_hugepages()

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from deeplab_jax import checkpoint
from deeplab_jax import datasets
from deeplab_jax import evaluate
from deeplab_jax import run_lock
from deeplab_jax import summary_writer
from deeplab_jax import train

# Errors whose message names the file or field and the fix.
_USER_ERRORS = (checkpoint.CheckpointError, run_lock.WorkdirLockedError, datasets.ManualDownloadError,
                datasets.BadFilesError, summary_writer.SummaryWriteError, FloatingPointError, OSError, ValueError)


def define_flags() -> None:
  """Defines the command-line flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections), e.g. configs/synthetic.py.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, TensorBoard events, predictions.')
  flags.DEFINE_enum('mode', 'train_and_eval', ['train_and_eval', 'train', 'eval'], 'What to run.')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with cluster auto-detection.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for jax.distributed.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes, for jax.distributed.')
  flags.DEFINE_integer('process_id', None, 'This process index, for jax.distributed.')
  flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO lines and its warning about periodic saves carrying no metrics."""
  if '/orbax/' not in record.pathname:
    return True
  return record.levelno >= python_logging.WARNING and 'did not provide metrics' not in record.getMessage()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if FLAGS.distributed or (FLAGS.num_processes or 1) > 1 or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info('JAX %s, process %d of %d; %d local / %d global devices: %s; %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices(), hugepages.describe())
  logging.info('Config:\n%s', FLAGS.config)
  try:
    if FLAGS.mode == 'eval':
      evaluate.evaluate(FLAGS.config, FLAGS.workdir, train.create_mesh())
    else:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir, run_eval=FLAGS.mode == 'train_and_eval')
  except train.TrainingInterrupted as e:
    logging.warning('%s', e)
    print(e, file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except _USER_ERRORS as e:  # a clean line, not a traceback: the message says what to do
    print(f'{type(e).__name__}: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  jax.config.config_with_absl()
  app.run(main)
