"""Loading a config file's sibling files by path, so configs work from any directory and install.

`configs/*.py` build on each other (`voc_xception71.py` starts from `default.py`). A plain
`from configs import default` only works when the repository root is on `sys.path` (running from the
checkout); `ml_collections` loads `--config=/any/path/voc_xception71.py` by file path, so each config
file loads its parents by path instead:

    from deeplab_jax.config_files import sibling
    default = sibling(__file__, 'default')

This module imports nothing heavy (no JAX): config files stay cheap to load.
"""
import importlib.util
import os
import sys
import types


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The module `<name>.py` from the folder of `config_file` (loaded once per path).

  Args:
    config_file: the calling config file's `__file__`.
    name: the sibling's module name, e.g. 'default'.

  Raises:
    FileNotFoundError: naming the expected file when the sibling is missing.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{config_file} builds on {path}, which does not exist: keep the config files '
                            'of one folder together.')
  module_name = f'_deeplab_jax_config.{os.path.realpath(path)}'
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[module_name]
      raise
  return sys.modules[module_name]
