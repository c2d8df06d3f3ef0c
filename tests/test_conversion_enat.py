"""The pipeline conversion script on tiny checkpoints in the exact layout of the reference release."""

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from enat_diffusers import ENATPipeline
from enat_diffusers.conversion import CheckpointMismatchError, convert_enat_pipeline, convert_transformer

from .conftest import FIXTURES

SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_enat_to_diffusers.py"
TRANSFORMER = FIXTURES / "tiny_nnet_ema.pth"
VQGAN = FIXTURES / "tiny_vqgan.ckpt"


def _run_script(*arguments: str) -> None:
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main(list(arguments)) == 0


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enat-tiny-256")
    _run_script(
        "--checkpoint", str(TRANSFORMER), "--vqgan", str(VQGAN), "--resolution", "256", "--output_dir", str(folder),
        "--num_attention_heads", "2", "--num_decoder_layers", "1",
    )  # fmt: skip
    return folder


def test_script_writes_a_complete_folder_with_reference_defaults(converted_folder, capsys):
    for path in (
        "model_index.json",
        "transformer/config.json",
        "vqvae/config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (converted_folder / path).is_file()
    assert (converted_folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(converted_folder)
    assert isinstance(pipe, ENATPipeline)
    assert pipe.scheduler.config.sample_temperature == 6.0 and pipe.scheduler.config.mask_temperature == 1.5
    assert pipe.scheduler.config.mask_token_id == 16
    assert pipe.config.default_guidance_scale == 2.5 and pipe.config.default_num_inference_steps == 8
    assert pipe.transformer.config.sample_size == 16 and pipe.transformer.config.num_encoder_layers == 1


def test_converted_folder_generates_images(converted_folder):
    pipe = DiffusionPipeline.from_pretrained(converted_folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([3, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 256, 256, 3) and np.isfinite(images).all()


def test_script_prints_parameter_counts(tmp_path, capsys):
    _run_script(
        "--checkpoint", str(TRANSFORMER), "--vqgan", str(VQGAN), "--resolution", "256", "--output_dir", str(tmp_path),
        "--num_attention_heads", "2", "--num_decoder_layers", "1", "--dtype", "fp16",
    )  # fmt: skip
    printed = capsys.readouterr().out
    transformer = convert_transformer(TRANSFORMER, num_attention_heads=2, num_decoder_layers=1)
    assert f"transformer: {transformer.num_parameters():,} parameters" in printed
    assert "vqvae: " in printed
    for component in ("transformer", "vqvae"):
        weights = load_file(tmp_path / component / "diffusion_pytorch_model.safetensors")
        assert {tensor.dtype for tensor in weights.values()} == {torch.float16}


def test_512_settings_and_resolution_mismatch():
    with pytest.raises(ValueError, match="needs a 32x32 token grid"):
        convert_enat_pipeline(TRANSFORMER, VQGAN, 512, num_attention_heads=2, num_decoder_layers=1)
    with pytest.raises(ValueError, match="`resolution` must be one of"):
        convert_enat_pipeline(TRANSFORMER, VQGAN, 384, num_attention_heads=2, num_decoder_layers=1)


def _modified_checkpoint(tmp_path, edit) -> Path:
    state_dict = torch.load(TRANSFORMER, weights_only=True)
    edit(state_dict)
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    return path


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    def edit(state_dict):
        del state_dict["blocks.0.attn.kv.A.weight"]
        state_dict["blocks.0.attn.extra.weight"] = torch.zeros(1)
        state_dict["mlm_layer.fc.bias"] = torch.zeros(7)

    with pytest.raises(CheckpointMismatchError) as error:
        convert_transformer(_modified_checkpoint(tmp_path, edit), num_attention_heads=2, num_decoder_layers=1)
    message = str(error.value)
    assert "missing keys: encoder_blocks.0.attn.to_kv_context.weight" in message
    assert "unexpected keys: blocks.0.attn.extra.weight" in message
    assert "mlm_layer.fc.bias -> head.proj.bias: (7,) vs (32,)" in message


def test_only_prev_embedder_is_dropped(tmp_path):
    state_dict = torch.load(TRANSFORMER, weights_only=True)
    assert any(key.startswith("prev_embedder.") for key in state_dict)
    transformer = convert_transformer(TRANSFORMER, num_attention_heads=2, num_decoder_layers=1)
    kept = {key for key in state_dict if not key.startswith("prev_embedder.")}
    assert len(kept) == len(transformer.state_dict())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "config": object()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_transformer(path)
