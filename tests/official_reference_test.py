"""Our models against the official TF DeepLab graph itself (../shared/data/official_tf_reference).

Every variable of the official graph is regenerated from its name by the data's value rule, mapped into our
variables by the TF-name map, and our forward pass must reproduce the official backbone features, decoder
tap, ASPP projection and logits (before and after the final upsampling) to 1e-4 relative. The 128x128
folders pin the explicit padding of strided convs, the OS8 folder the dilated middle flow.
"""
import json

import pytest

import reference
from deeplab_jax.models import create_model

# The CPU 'shifted' depthwise formulation must match too, on the even sizes where padding is tricky.
PARAMS = [(case, 'grouped') for case in sorted(reference.CASES)] + [
    ('xception_65_128', 'shifted'), ('mobilenet_v2_128', 'shifted'), ('xception_65_os8', 'shifted')]


@pytest.mark.parametrize('case,impl', PARAMS)
def test_matches_official_graph(case, impl, shared_data):
  folder = shared_data / 'official_tf_reference' / case
  reference.assert_matches_official(case, reference.official_outputs(case, impl))
  meta = json.loads((folder / 'meta.json').read_text())
  assert meta['model_options']['output_stride'] == create_model(reference.model_config(case)).output_stride
