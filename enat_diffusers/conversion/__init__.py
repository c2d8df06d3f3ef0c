"""Turn the reference ENAT checkpoints (LeapLabTHU/ENAT) into this package's models and pipelines."""

from .common import CheckpointMismatchError, check_output_dir, load_reference_checkpoint, save_converted
from .pipeline import check_id2label, convert_enat_pipeline, convert_transformer, imagenet_id2label
from .transformer import convert_enat_transformer_state_dict, match_preset, transformer_config_from_state_dict
from .vqgan import convert_maskgit_vqgan_state_dict, convert_vqgan, vqgan_config_from_state_dict

__all__ = [
    "CheckpointMismatchError",
    "check_id2label",
    "check_output_dir",
    "convert_enat_pipeline",
    "convert_enat_transformer_state_dict",
    "convert_maskgit_vqgan_state_dict",
    "convert_transformer",
    "convert_vqgan",
    "imagenet_id2label",
    "load_reference_checkpoint",
    "match_preset",
    "save_converted",
    "transformer_config_from_state_dict",
    "vqgan_config_from_state_dict",
]
