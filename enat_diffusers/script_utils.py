"""Command-line conventions shared by the scripts under examples/ and conversion/: deprecated flag names, optional
dependencies and the `--dtype` names.

Public so that the scripts (which are not part of the package) import one definition instead of each keeping a copy.
"""

import argparse
import importlib
import warnings
from types import ModuleType

import torch

# The names of `--dtype` (and of string `dtype` arguments, e.g. in the converters).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_deprecated_flag(parser: argparse.ArgumentParser, old_flag: str, new_flag: str, *, removed_in: str) -> None:
    """
    Lets `old_flag` keep working as `new_flag` (same destination, same type) for one more release, with a
    `FutureWarning` that names the replacement. `new_flag` must already be defined on `parser`; the old flag is
    hidden from `--help`.
    """
    new_action = next((action for action in parser._actions if new_flag in action.option_strings), None)
    if new_action is None:
        raise ValueError(f"define {new_flag} before its deprecated alias {old_flag}")

    class _DeprecatedFlag(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            warnings.warn(
                f"{old_flag} is deprecated and will be removed in enat-diffusers {removed_in}; use {new_flag}",
                FutureWarning,
                stacklevel=2,
            )
            setattr(namespace, self.dest, values)

    parser.add_argument(
        old_flag,
        dest=new_action.dest,
        type=new_action.type,
        nargs=new_action.nargs,
        choices=new_action.choices,
        action=_DeprecatedFlag,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


def require_optional(module_name: str, extra: str, purpose: str) -> ModuleType:
    """
    Imports an optional dependency, or stops the script with one sentence that names the pip command:
    `pip install "enat-diffusers[<extra>]"` (`pip install -e ".[<extra>]"` from a checkout).
    """
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise SystemExit(
            f"{purpose} needs the optional package {module_name.split('.')[0]!r}: "
            f'pip install "enat-diffusers[{extra}]" (from a checkout: pip install -e ".[{extra}]")'
        ) from None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"fp32"`, `"fp16"`, `"bf16"` or a floating `torch.dtype` -> that `torch.dtype`."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}.")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be one of {sorted(DTYPES)} or a floating torch.dtype, got {dtype!r}.")
    return dtype


# The precision flag of the scripts and the app (names and rule: `enat_diffusers.quantization`).
PRECISION_FLAG = "--precision"


def add_precision_flag(parser: argparse.ArgumentParser, default: str | None = "fp32") -> None:
    """`--precision {auto,fp32,bf16,fp16,int8}`: see `enat_diffusers.quantization.set_precision`."""
    from .quantization import PRECISION_CHOICES

    parser.add_argument(
        PRECISION_FLAG,
        choices=PRECISION_CHOICES,
        default=default,
        help="auto: the fastest measured precision for this machine (int8 on AVX2 CPUs, bf16 with AVX-512 BF16/AMX "
        "or on GPUs, else fp32); int8: the transformer's linear layers in int8 (CPU only)"
        + (f" (default: {default})" if default else ""),
    )
