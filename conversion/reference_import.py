"""Import the reference ENAT implementation from a checkout outside this repository.

Only the parity-fixture scripts use this. The reference's vendored timm imports torchvision, which cannot be
installed beside the CPU torch wheel; nothing the transformer, VQGAN or sampler needs uses it, so empty stand-in
modules are registered before the import. The reference also needs `einops` and `omegaconf` installed.
"""

import importlib
import sys
import types
from pathlib import Path

_TORCHVISION_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _install_torchvision_stubs() -> None:
    for name in _TORCHVISION_STUBS:
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []
            sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


def import_reference(reference_dir: str, *module_names: str) -> list[types.ModuleType]:
    """Return the named modules (e.g. `"libs.models"`) of the reference checkout at `reference_dir`."""
    root = Path(reference_dir).resolve()
    if not (root / "libs" / "models.py").is_file():
        raise ValueError(f"`reference_dir` must be a checkout of LeapLabTHU/ENAT; no libs/models.py under {root}")
    _install_torchvision_stubs()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return [importlib.import_module(name) for name in module_names]
