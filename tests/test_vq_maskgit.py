"""MaskGITVQModel: parity with the reference VQGAN, checkpoint conversion, CLI, validation and dtypes.

The golden numbers come from `conversion/make_vqgan_fixtures.py` (a small random reference VQModel). The opt-in test
at the end converts the real `vqgan_jax_strongaug.ckpt` when `ENAT_VQGAN_CKPT` points to it.
"""

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors import safe_open
from safetensors.torch import load_file

from enat_diffusers.conversion.common import CheckpointMismatchError, load_reference_checkpoint
from enat_diffusers.conversion.vqgan import (
    convert_maskgit_vqgan_state_dict,
    convert_vqgan,
    vqgan_config_from_state_dict,
)
from enat_diffusers.models import vq_maskgit
from enat_diffusers.models.vq_maskgit import MaskGITVQEncoderOutput, MaskGITVQModel, MaskGITVQModelOutput

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "vqgan_reference.safetensors"
CLI_SCRIPT = REPO_ROOT / "conversion" / "convert_vqgan_to_diffusers.py"
TINY_CONFIG = {
    "hidden_channels": 32,
    "channel_multipliers": (1, 2),
    "layers_per_block": 1,
    "latent_channels": 8,
    "num_vq_embeddings": 16,
    "norm_num_groups": 8,
    "sample_size": 16,
}
# MaskGITVQModel() == the released f16 VQGAN: 128 * (1, 1, 2, 2, 4), 2 blocks per level, 1024 x 256 codebook.
RELEASED_NUM_PARAMETERS = 54_515_587


@pytest.fixture(scope="module")
def fixture():
    tensors = load_file(str(FIXTURE))
    with safe_open(str(FIXTURE), "pt") as handle:
        metadata = handle.metadata()
    reference_state_dict = {
        key[len("state_dict.") :]: value.float() for key, value in tensors.items() if key.startswith("state_dict.")
    }
    return tensors, metadata, reference_state_dict


@pytest.fixture(scope="module")
def converted_model(fixture):
    _, metadata, reference_state_dict = fixture
    model = MaskGITVQModel(**json.loads(metadata["config"])).eval()
    model.load_state_dict(convert_maskgit_vqgan_state_dict(reference_state_dict), strict=True)
    return model


def _tiny_model(seed: int = 0) -> MaskGITVQModel:
    torch.manual_seed(seed)
    model = MaskGITVQModel(**TINY_CONFIG).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model


def _load_cli_module():
    spec = importlib.util.spec_from_file_location("convert_vqgan_to_diffusers", CLI_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- architecture


def test_defaults_are_the_released_architecture():
    with torch.device("meta"):
        model = MaskGITVQModel()
    assert model.num_parameters() == RELEASED_NUM_PARAMETERS
    assert model.downsample_factor == 16
    assert model.codebook_size == 1024
    assert tuple(model.quantize.embedding.weight.shape) == (1024, 256)
    # No attention and no quant convs; only the first block of a level that changes width has a 1x1 projection.
    names = [name for name, _ in model.named_parameters()]
    assert not any("attn" in name or "quant_conv" in name for name in names)
    assert sum(name.endswith("skip_proj.weight") for name in names) == 4
    assert model.encoder.conv_in.bias is None and model.decoder.conv_in.bias is not None
    assert model.decoder.up_blocks[0].upsampler.conv.bias is not None and model.decoder.up_blocks[-1].upsampler is None


def test_model_mixin_is_importable_from_the_defining_module():
    # diffusers' pipeline loader looks the base class up by name in the module that defines the component.
    assert vq_maskgit.ModelMixin is ModelMixin


def test_width_changing_block_projects_its_output_not_its_input():
    model = _tiny_model()
    block = model.encoder.down_blocks[1].resnets[0]
    assert block.skip_proj is not None
    x = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        branch = block.conv2(
            torch.nn.functional.silu(block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x)))))
        )
        torch.testing.assert_close(block(x), branch + block.skip_proj(branch))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"hidden_channels": 20}, "norm_num_groups"),
        ({"channel_multipliers": ()}, "channel_multipliers"),
        ({"channel_multipliers": (1, 0)}, "channel_multipliers"),
        ({"num_vq_embeddings": 0}, "num_vq_embeddings"),
    ],
)
def test_invalid_config_is_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MaskGITVQModel(**{**TINY_CONFIG, **kwargs})


# ---------------------------------------------------------------------------------- parity with the reference


def test_config_is_inferred_from_the_reference_state_dict(fixture):
    _, metadata, reference_state_dict = fixture
    expected = json.loads(metadata["config"])
    inferred = vqgan_config_from_state_dict(reference_state_dict)
    for key, value in inferred.items():
        assert list(value) == expected[key] if isinstance(value, tuple) else value == expected[key], key


def test_converted_weights_cover_the_model_exactly(fixture, converted_model):
    _, _, reference_state_dict = fixture
    converted = convert_maskgit_vqgan_state_dict({"state_dict": reference_state_dict})
    assert set(converted) == set(converted_model.state_dict())
    assert len(converted) == len(reference_state_dict)
    # Up blocks run deepest level first: the reference's level 0 is our last up block.
    torch.testing.assert_close(
        converted[f"decoder.up_blocks.{len(converted_model.decoder.up_blocks) - 1}.resnets.0.skip_proj.weight"],
        reference_state_dict["decoder.up.0.block.0.nin_shortcut.weight"],
        rtol=0,
        atol=0,
    )


def test_encode_matches_reference(fixture, converted_model):
    tensors, _, _ = fixture
    with torch.no_grad():
        output = converted_model.encode(tensors["images"] * 2 - 1)
    assert isinstance(output, MaskGITVQEncoderOutput)
    assert output.token_ids.dtype == torch.long
    assert output.token_ids.shape == tensors["token_ids"].shape
    assert torch.equal(output.token_ids, tensors["token_ids"])
    assert tensors["token_ids"].unique().numel() > 16  # the fixture exercises many codes
    assert (output.latents - tensors["latents"]).abs().max() <= 1e-5

    token_ids, latents = converted_model.encode(tensors["images"] * 2 - 1, return_dict=False)
    assert torch.equal(token_ids, output.token_ids) and torch.equal(latents, output.latents)


def test_decode_matches_reference(fixture, converted_model):
    tensors, _, _ = fixture
    token_ids = tensors["token_ids"]
    with torch.no_grad():
        sample = converted_model.decode(token_ids).sample
        flat_sample = converted_model.decode(token_ids.flatten(1), return_dict=False)[0]
        int32_sample = converted_model.decode(token_ids.int()).sample
    assert sample.shape == tensors["decoded"].shape
    # Ours is in [-1, 1], the reference's in [0, 1]; neither is clamped.
    assert ((sample + 1) / 2 - tensors["decoded"]).abs().max() <= 1e-5
    assert torch.equal(flat_sample, sample) and torch.equal(int32_sample, sample)


def test_forward_reconstructs_through_the_codebook_and_trains_the_encoder(fixture, converted_model):
    tensors, _, _ = fixture
    model = copy.deepcopy(converted_model).train()
    output = model(tensors["images"] * 2 - 1)
    assert isinstance(output, MaskGITVQModelOutput)
    assert torch.equal(output.token_ids, tensors["token_ids"])
    assert ((output.sample.detach() + 1) / 2 - tensors["decoded"]).abs().max() <= 1e-4
    assert output.quantization_loss.ndim == 0 and output.quantization_loss > 0
    (output.sample.square().mean() + output.quantization_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("missing", "decoder.up_blocks.2.resnets.0.skip_proj.weight"),
        ("unexpected", "loss.discriminator.main.0.weight"),
        ("unexpected_resnet_param", "encoder.down.0.block.0.temb_proj.weight"),
        ("shape", "decoder.conv_in.bias"),
    ],
)
def test_conversion_reports_mismatched_keys(fixture, edit, expected):
    _, metadata, reference_state_dict = fixture
    state_dict = dict(reference_state_dict)
    if edit == "missing":
        del state_dict["decoder.up.0.block.0.nin_shortcut.weight"]
    elif edit == "unexpected":
        state_dict["loss.discriminator.main.0.weight"] = torch.zeros(2)
    elif edit == "unexpected_resnet_param":
        state_dict["encoder.down.0.block.0.temb_proj.weight"] = torch.zeros(2)
    else:
        state_dict["decoder.conv_in.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=expected.replace(".", r"\.")):
        convert_maskgit_vqgan_state_dict(state_dict, json.loads(metadata["config"]))


def test_config_inference_names_the_key_it_needs(fixture):
    _, _, reference_state_dict = fixture
    state_dict = {k: v for k, v in reference_state_dict.items() if k != "quantize.embedding.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"quantize\.embedding\.weight"):
        convert_maskgit_vqgan_state_dict(state_dict)


def test_conversion_rejects_non_tensor_entries():
    with pytest.raises(TypeError, match="checkpoint"):
        convert_maskgit_vqgan_state_dict({"encoder.conv_in.weight": [1.0, 2.0]})
    with pytest.raises(TypeError, match="checkpoint"):
        convert_maskgit_vqgan_state_dict([("encoder.conv_in.weight", torch.zeros(1))])


class _NotATensor:
    pass


def test_checkpoint_loader_refuses_arbitrary_objects(tmp_path, fixture):
    _, _, reference_state_dict = fixture
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": reference_state_dict, "callback": _NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_reference_checkpoint(path)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cli_writes_a_folder_that_reloads(tmp_path, fixture, converted_model, dtype):
    tensors, _, reference_state_dict = fixture
    checkpoint = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": reference_state_dict}, checkpoint)
    output_dir = tmp_path / "vqgan"
    cli = _load_cli_module()
    assert cli.main(["--vqgan", str(checkpoint), "--output_dir", str(output_dir), "--dtype", dtype]) == 0
    assert (output_dir / "diffusion_pytorch_model.safetensors").is_file()

    expected_dtype = torch.float32 if dtype == "fp32" else torch.float16
    saved = load_file(str(output_dir / "diffusion_pytorch_model.safetensors"))
    assert {value.dtype for value in saved.values()} == {expected_dtype}
    reloaded = MaskGITVQModel.from_pretrained(output_dir, torch_dtype=expected_dtype).eval()
    assert reloaded.config.sample_size == 256
    assert reloaded.state_dict().keys() == converted_model.state_dict().keys() == saved.keys()
    for key, value in converted_model.state_dict().items():
        assert torch.equal(saved[key], value.to(expected_dtype)), key
        assert torch.equal(reloaded.state_dict()[key], value.to(expected_dtype)), key
    if dtype == "fp32":
        with torch.no_grad():
            assert torch.equal(reloaded.encode(tensors["images"] * 2 - 1).token_ids, tensors["token_ids"])


def test_convert_vqgan_dtype_and_sample_size(tmp_path, fixture, converted_model):
    _, _, reference_state_dict = fixture
    checkpoint = tmp_path / "vqgan.ckpt"
    torch.save(reference_state_dict, checkpoint)  # a bare state dict works too
    model = convert_vqgan(checkpoint, dtype=torch.bfloat16, sample_size=512)
    assert model.dtype == torch.bfloat16 and model.config.sample_size == 512 and not model.training
    weight = converted_model.decoder.conv_out.weight
    assert torch.equal(model.decoder.conv_out.weight, weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        convert_vqgan(checkpoint, dtype="fp8")
    with pytest.raises(TypeError, match="dtype"):
        convert_vqgan(checkpoint, dtype=torch.int64)
    # The script re-exports the same function for other conversion scripts.
    assert _load_cli_module().convert_vqgan is convert_vqgan


# ------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        ([[0.0]], TypeError, "images"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.long), TypeError, "floating-point"),
        (torch.zeros(3, 16, 16), ValueError, r"\(batch_size, 3, height, width\)"),
        (torch.zeros(1, 4, 16, 16), ValueError, r"\(batch_size, 3, height, width\)"),
        (torch.zeros(1, 3, 16, 15), ValueError, "multiples of the downsampling factor 2"),
    ],
)
def test_encode_rejects_bad_images(images, error, message):
    with pytest.raises(error, match=message):
        _tiny_model().encode(images)


@pytest.mark.parametrize(
    ("token_ids", "error", "message"),
    [
        (torch.zeros(1, 4, 4), TypeError, "integer tensor"),
        (torch.zeros(1, 4, 4, dtype=torch.bool), TypeError, "integer tensor"),
        ([[0, 1]], TypeError, "torch.Tensor"),
        (torch.full((1, 4, 4), 16), ValueError, r"\[0, 16\).*16 to 16"),
        (torch.full((1, 4, 4), -1), ValueError, r"\[0, 16\)"),
        (torch.zeros(1, 15, dtype=torch.long), ValueError, "square grid"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), ValueError, r"\(batch_size, height, width\)"),
        (torch.zeros(0, 4, 4, dtype=torch.long), ValueError, "empty"),
    ],
)
def test_decode_rejects_bad_token_ids(token_ids, error, message):
    with pytest.raises(error, match=message):
        _tiny_model().decode(token_ids)


def test_decode_accepts_non_square_grids():
    model = _tiny_model()
    with torch.no_grad():
        sample = model.decode(torch.randint(0, 16, (2, 3, 5))).sample
    assert sample.shape == (2, 3, 6, 10)


# ----------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_low_precision_decode_is_finite_and_close(dtype, tolerance):
    model = _tiny_model()
    token_ids = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Large activations: the group statistics of float16 inputs of this size overflow unless upcast.
        model.decoder.conv_in.weight.mul_(300)
        expected = model.decode(token_ids).sample
        low = copy.deepcopy(model)
        torch.nn.Module.to(low, dtype=dtype)
        assert low.dtype == dtype
        sample = low.decode(token_ids).sample
        token_ids_back = low.encode(sample.clamp(-1, 1)).token_ids
    assert sample.dtype == dtype
    assert torch.isfinite(sample).all()
    assert (sample.float() - expected).abs().max() <= tolerance * expected.abs().max()
    assert token_ids_back.shape == token_ids.shape


def _overflowing_float16_model(force_upcast: bool) -> MaskGITVQModel:
    """A tiny model whose first decoder convolution exceeds float16's range (65504) on every codebook entry."""
    model = MaskGITVQModel(**{**TINY_CONFIG, "force_upcast": force_upcast}).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
        model.decoder.conv_in.weight.mul_(1e5)
    return model


def test_float16_decode_overflow_is_an_error_not_black_images():
    model = _overflowing_float16_model(force_upcast=False)
    torch.nn.Module.to(model, dtype=torch.float16)
    with torch.no_grad(), pytest.raises(FloatingPointError, match="non-finite pixels.*force_upcast"):
        model.decode(torch.randint(0, 16, (1, 4, 4)))


def test_force_upcast_decodes_float16_models_in_float32():
    model = _overflowing_float16_model(force_upcast=True)
    token_ids = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.decode(token_ids).sample
        torch.nn.Module.to(model, dtype=torch.float16)
        sample = model.decode(token_ids).sample
    assert model.upcasts_decode and model.dtype == torch.float16  # the weights stay float16 for the caller
    assert sample.dtype == torch.float32
    torch.testing.assert_close(sample, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_force_upcast_leaves_other_dtypes_alone():
    model = _overflowing_float16_model(force_upcast=True)
    torch.nn.Module.to(model, dtype=torch.bfloat16)
    assert not model.upcasts_decode
    with torch.no_grad():
        assert model.decode(torch.randint(0, 16, (1, 4, 4))).sample.dtype == torch.bfloat16


def test_encode_continuous_is_what_encode_quantizes():
    model = _tiny_model()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        latents = model.encode_continuous(images)
        encoded = model.encode(images)
    assert latents.shape == (2, 8, 4, 4)
    assert torch.equal(model.quantize.nearest_ids(latents), encoded.token_ids)


def test_group_norm_runs_in_float32_for_half_inputs():
    norm = vq_maskgit._Float32GroupNorm(2, 4, eps=1e-6).half()
    hidden_states = torch.full((1, 4, 64, 64), 300.0, dtype=torch.float16)
    hidden_states[:, :, ::2] = -300.0
    out = norm(hidden_states)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float().abs(), torch.ones_like(out, dtype=torch.float32), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_pretrained_round_trip(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path / "vq")
    reloaded = MaskGITVQModel.from_pretrained(tmp_path / "vq").eval()
    assert list(reloaded.config.channel_multipliers) == [1, 2]
    assert reloaded.downsample_factor == 2 and reloaded.codebook_size == 16
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    token_ids = torch.randint(0, 16, (1, 4, 4))
    with torch.no_grad():
        assert torch.equal(reloaded.decode(token_ids).sample, model.decode(token_ids).sample)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loading_non_finite_weights_is_an_error_naming_the_tensor(tmp_path, value):
    model = _tiny_model()
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = value
    model.save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(in decoder\.conv_out\.weight\)"):
        MaskGITVQModel.from_pretrained(tmp_path / "vq")


def test_decoding_with_nan_weights_is_an_error_not_black_images():
    model = _tiny_model()
    with torch.no_grad():
        model.decoder.conv_in.weight[0, 0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="non-finite pixels"):
            model.decode(torch.randint(0, 16, (1, 4, 4)))


# --------------------------------------------------------------------------------- opt-in: the real checkpoint


@pytest.mark.skipif(not os.environ.get("ENAT_VQGAN_CKPT"), reason="set ENAT_VQGAN_CKPT to vqgan_jax_strongaug.ckpt")
def test_real_checkpoint_against_reference():
    state_dict = load_reference_checkpoint(os.environ["ENAT_VQGAN_CKPT"])
    assert sum(value.numel() for value in state_dict.values()) == RELEASED_NUM_PARAMETERS
    config = vqgan_config_from_state_dict(state_dict)
    model = MaskGITVQModel(**config).eval()
    model.load_state_dict(convert_maskgit_vqgan_state_dict(state_dict, config), strict=True)
    assert model.num_parameters() == RELEASED_NUM_PARAMETERS
    assert config == {
        "in_channels": 3,
        "out_channels": 3,
        "hidden_channels": 128,
        "channel_multipliers": (1, 1, 2, 2, 4),
        "layers_per_block": 2,
        "latent_channels": 256,
        "num_vq_embeddings": 1024,
    }

    reference_dir = os.environ.get("ENAT_REFERENCE_DIR")
    if not reference_dir:
        pytest.skip("set ENAT_REFERENCE_DIR to a LeapLabTHU/ENAT checkout to compare with the reference")
    sys.path.insert(0, str(REPO_ROOT / "conversion"))
    try:
        from reference_import import import_reference
    finally:
        sys.path.remove(str(REPO_ROOT / "conversion"))
    (vqgan_module,) = import_reference(reference_dir, "taming.models.vqgan")
    from omegaconf import OmegaConf

    params = OmegaConf.load(Path(reference_dir) / "vq-f16-jax.yaml").model.params
    reference = vqgan_module.VQModel(
        ddconfig=params.ddconfig, lossconfig=None, n_embed=params.n_embed, embed_dim=params.embed_dim
    )
    reference.load_state_dict(state_dict, strict=True)
    reference.eval()

    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(256, 256), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        _, _, (_, _, reference_ids) = reference.encode(images)
        reference_ids = reference_ids.reshape(1, 16, 16)
        reference_decoded = reference.decode_code(reference_ids)
        ours = model.encode(images * 2 - 1)
        decoded = model.decode(reference_ids).sample
    agreement = (ours.token_ids == reference_ids).float().mean()
    assert agreement >= 0.99, f"only {agreement:.3f} of the token ids agree"
    assert ((decoded + 1) / 2 - reference_decoded).abs().max() <= 1e-4
