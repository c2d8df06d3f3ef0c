"""Small ENAT pipelines trained on scikit-learn's 8x8 handwritten digits (16x16 px), shipped with the package.

`digits` is class-conditional (classes 0..9, named "zero".."nine"); `digits-text` answers prompts such as
"a handwritten seven" or "the digit 7". Both were trained by `examples/train_demo_digits.py`; each folder holds its
`evaluation.json` (accuracy of an independent digit classifier on generated samples).
"""

from pathlib import Path

DEMO_ROOT = Path(__file__).resolve().parent
DEMO_NAMES = ("digits", "digits-text")


def demo_path(name: str = "digits") -> Path:
    """The folder of the packaged demo pipeline `name`."""
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo pipeline {name!r}; available: {', '.join(DEMO_NAMES)}")
    folder = DEMO_ROOT / name
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the demo pipeline {name!r} is missing from {folder}; recreate it with examples/train_demo_digits.py"
        )
    return folder


DEMO_PREFIX = "demo:"


def resolve_pretrained_location(name_or_path: str | Path) -> str:
    """What every script's model argument (`--model`, `--pretrained_model_name_or_path`, ...) goes through: `demo:NAME`
    becomes the folder of the packaged demo `NAME`; a local folder or a Hub id is returned unchanged."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith(DEMO_PREFIX):
        return str(demo_path(name_or_path[len(DEMO_PREFIX) :]))
    return name_or_path


def load_demo_pipeline(name: str = "digits", **kwargs):
    """`DiffusionPipeline.from_pretrained` of a packaged demo pipeline (`"digits"` or `"digits-text"`); `kwargs` go
    to `from_pretrained`. No network access is needed."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(demo_path(name), **kwargs)


__all__ = ["DEMO_NAMES", "DEMO_PREFIX", "DEMO_ROOT", "demo_path", "load_demo_pipeline", "resolve_pretrained_location"]
