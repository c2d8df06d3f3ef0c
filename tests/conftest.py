import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and json-decoded metadata of a parity fixture written by a `conversion/make_*_fixtures.py` script."""
    with safe_open(str(FIXTURES / name), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    return tensors, metadata


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
