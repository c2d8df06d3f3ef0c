"""Turn the reference ENAT checkpoints (LeapLabTHU/ENAT) into this package's models and pipelines."""

from .common import CheckpointMismatchError, load_reference_checkpoint
from .pipeline import convert_enat_pipeline, convert_transformer
from .transformer import convert_enat_transformer_state_dict, transformer_config_from_state_dict
from .vqgan import convert_maskgit_vqgan_state_dict, convert_vqgan, vqgan_config_from_state_dict

__all__ = [
    "CheckpointMismatchError",
    "convert_enat_pipeline",
    "convert_enat_transformer_state_dict",
    "convert_maskgit_vqgan_state_dict",
    "convert_transformer",
    "convert_vqgan",
    "load_reference_checkpoint",
    "transformer_config_from_state_dict",
    "vqgan_config_from_state_dict",
]
