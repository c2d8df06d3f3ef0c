"""Loading a transformer folder whose weights do not fit its config is an error; bad head counts are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from enat_diffusers.models.transformer_enat import ENATTransformer2DModel
from enat_diffusers.pipelines.pipeline_enat import ENATPipeline

from .tiny_components import TINY_TRANSFORMER_CONFIG, tiny_pipeline, tiny_transformer

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _drop_weights(folder, *prefixes):
    tensors = load_file(folder / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if not k.startswith(prefixes)}, folder / WEIGHTS)


@pytest.fixture
def saved(tmp_path):
    tiny_transformer().save_pretrained(tmp_path)
    return tmp_path


def test_matching_folder_loads_and_reports_loading_info(saved):
    model, info = ENATTransformer2DModel.from_pretrained(saved, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    ids, labels = torch.full((1, 16), 16), torch.tensor([1])
    expected = tiny_transformer()(ids, class_labels=labels).logits
    assert torch.allclose(model(ids, class_labels=labels).logits, expected, atol=1e-6)


def test_missing_tensor_is_a_load_error_naming_it(saved):
    _drop_weights(saved, "encoder_blocks.1.attn.to_q.weight")
    with pytest.raises(ValueError, match=r"missing from the weights: encoder_blocks\.1\.attn\.to_q\.weight"):
        ENATTransformer2DModel.from_pretrained(saved)


def test_config_with_more_layers_than_the_weights_is_a_load_error(saved):
    _edit_config(saved, num_encoder_layers=TINY_TRANSFORMER_CONFIG["num_encoder_layers"] + 1)
    with pytest.raises(ValueError, match=r"missing from the weights: .*\(\d+ in all\)"):
        ENATTransformer2DModel.from_pretrained(saved)


def test_config_with_fewer_layers_than_the_weights_is_a_load_error(saved):
    _edit_config(saved, num_encoder_layers=1)
    with pytest.raises(ValueError, match=r"not used by the config: .*encoder_blocks\.1\."):
        ENATTransformer2DModel.from_pretrained(saved)


def test_pipeline_loading_refuses_a_transformer_that_does_not_fit(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    _drop_weights(tmp_path / "transformer", "decoder_blocks.0.ff")
    with pytest.raises(ValueError, match="missing from the weights: decoder_blocks.0.ff"):
        ENATPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("heads", [3, 0, -4])
def test_head_count_that_does_not_divide_the_width_is_refused(saved, heads):
    _edit_config(saved, num_attention_heads=heads)
    message = rf"`num_attention_heads` must be a positive integer that divides `hidden_size` \(32\), got {heads}"
    with pytest.raises(ValueError, match=message):
        ENATTransformer2DModel.from_pretrained(saved)
    with pytest.raises(ValueError, match=message):
        ENATTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "num_attention_heads": heads})
