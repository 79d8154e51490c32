"""pytest set-up: the repo on sys.path, one thread, and the ``tiny`` fixture (helpers live in tests/helpers.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils.synth  # noqa: E402,F401  (registers the synthetic presets, as main.py does)
from tests.helpers import tiny_setup  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny(tmp_path):
    """Factory fixture: ``tiny(model, **kw)`` -> (config, dataset)."""
    return lambda model, **kw: tiny_setup(tmp_path, model, **kw)
