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


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models: one thread is as fast, much faster when other processes share the cores, and
    results do not depend on the thread count of the machine. Use with `pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
