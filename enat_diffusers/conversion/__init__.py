"""Turn the reference ENAT checkpoints (LeapLabTHU/ENAT) into state dicts of this package's models."""

from .common import CheckpointMismatchError
from .transformer import convert_enat_transformer_state_dict, transformer_config_from_state_dict
from .vqgan import convert_maskgit_vqgan_state_dict

__all__ = [
    "CheckpointMismatchError",
    "convert_enat_transformer_state_dict",
    "convert_maskgit_vqgan_state_dict",
    "transformer_config_from_state_dict",
]
