"""`python -m deeplab_jax.convert --source=PATH --config=CONFIG --output=DIR`.

Converts official TF checkpoints, the official DeepLab TFLite models or PyTorch ImageNet backbones into an
orbax checkpoint `DIR/checkpoints/0` (+ `DIR/conversion_report.json`) for this library:
  evaluate:  python -m deeplab_jax.main --mode=eval --config=CONFIG --workdir=DIR
  fine-tune: python -m deeplab_jax.main --config=CONFIG --workdir=RUN --config.init_from=DIR
             [--config.init_from_scope=backbone]
Config overrides work as for main (`--config.model.backbone=xception_41`).
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deeplab_jax import convert
from deeplab_jax.convert import common


def define_flags() -> None:
  """Defines the command-line flags; called only when this module runs as a program."""
  flags.DEFINE_string('source', None, 'TF checkpoint (prefix, .index or directory), .tflite, or a PyTorch '
                      'state dict (.safetensors; .pth with torch installed).')
  config_flags.DEFINE_config_file('config', None, 'Config file of the model the weights are for.',
                                  lock_config=True)
  flags.DEFINE_string('output', None, 'Directory to write the converted checkpoint into (must be new/empty).')
  flags.DEFINE_enum('format', 'auto', list(convert.FORMATS), 'Source format (auto: from the file name).')
  flags.DEFINE_enum('scope', 'auto', list(common.SCOPES),
                    "'all': every model variable must come from the source; 'backbone': only the backbone "
                    "(ImageNet checkpoints); 'auto': 'all' if the source has head variables.")
  flags.DEFINE_bool('match_tflite_runtime', False,
                    'TFLite only: reproduce the official uint8 runtime (its requantization-free resize of the '
                    'image-pooling branch) instead of what the graph means.')
  flags.mark_flags_as_required(['source', 'config', 'output'])


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    report = convert.convert_and_save(FLAGS.source, FLAGS.config, FLAGS.output, FLAGS.format, FLAGS.scope,
                                      FLAGS.match_tflite_runtime)
  except convert.ConversionError as e:
    print(f'Conversion failed: {e}', file=sys.stderr)
    sys.exit(1)
  print(f"Converted {FLAGS.source} ({report['format']}) -> {report['checkpoint']}")
  print(common.format_report(report))
  print(f'Full lists: {FLAGS.output}/{common.REPORT_FILE}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
