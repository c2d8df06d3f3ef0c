"""ENATTransformer2DModel converted from reference weights reproduces the reference outputs (fixtures)."""

import pytest
import torch

from enat_diffusers.conversion.transformer import (
    convert_enat_transformer_state_dict,
    transformer_config_from_state_dict,
)
from enat_diffusers.models.transformer_enat import ENATTransformer2DModel

from .conftest import load_fixture

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    tensors, metadata = load_fixture("transformer_reference.safetensors")
    state_dict = {k.removeprefix("reference."): v for k, v in tensors.items() if k.startswith("reference.")}
    return tensors, metadata, state_dict


@pytest.fixture(scope="module")
def converted_model(reference):
    _, metadata, state_dict = reference
    config = metadata["config"]
    model = ENATTransformer2DModel(**config).eval()
    target_shapes = {key: value.shape for key, value in model.state_dict().items()}
    converted = convert_enat_transformer_state_dict(state_dict, target_shapes, config["num_encoder_layers"])
    model.load_state_dict(converted, strict=True)
    return model


def _calls(tensors, metadata):
    for index, has_previous_state in enumerate(metadata["has_previous_state"]):
        yield (
            index,
            has_previous_state,
            {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"call{index}.")},
        )


def test_config_inferred_from_reference_weights(reference):
    _, metadata, state_dict = reference
    config = metadata["config"]
    inferred = transformer_config_from_state_dict(
        state_dict, config["num_attention_heads"], config["num_decoder_layers"]
    )
    assert inferred == {**config, "mlp_ratio": 4.0}


def test_step_without_reuse_matches_reference(reference, converted_model):
    tensors, metadata, _ = reference
    index, has_previous_state, call = list(_calls(tensors, metadata))[-1]
    assert not has_previous_state and (call["input_ids"] == 32).any() and (call["input_ids"] != 32).any()
    with torch.no_grad():
        output = converted_model(call["input_ids"], class_labels=call["class_labels"])
    side = metadata["config"]["sample_size"]
    expected_logits = call["logits"].transpose(1, 2).reshape(-1, metadata["config"]["codebook_size"], side, side)
    assert (output.logits - expected_logits).abs().max() < TOLERANCE
    assert (output.reuse_state.features - call["features"]).abs().max() < TOLERANCE


def test_trajectory_with_reuse_matches_reference_for_both_streams(reference, converted_model):
    """Teacher-forced on the reference's token trajectory; each guidance stream keeps its own reuse state."""
    tensors, metadata, _ = reference
    calls = list(_calls(tensors, metadata))[:-1]
    assert len(calls) == 2 * metadata["sampling"]["num_steps"]
    states = {"cond": None, "uncond": None}
    side = metadata["config"]["sample_size"]
    worst = 0.0
    for index, has_previous_state, call in calls:
        stream = "cond" if index % 2 == 0 else "uncond"
        assert has_previous_state == (states[stream] is not None)
        with torch.no_grad():
            output = converted_model(
                call["input_ids"].reshape(-1, side, side),
                class_labels=call["class_labels"],
                reuse_state=states[stream],
            )
        expected_logits = call["logits"].permute(0, 2, 1).reshape(output.logits.shape)
        logits_error = (output.logits - expected_logits).abs().max().item()
        features_error = (output.reuse_state.features - call["features"]).abs().max().item()
        assert logits_error < TOLERANCE, f"call {index} ({stream}): logits differ by {logits_error}"
        assert features_error < TOLERANCE, f"call {index} ({stream}): features differ by {features_error}"
        worst = max(worst, logits_error, features_error)
        states[stream] = output.reuse_state
    assert worst < TOLERANCE


def test_reuse_changes_outputs_on_this_trajectory(reference, converted_model):
    """Guards the parity test: with these weights, reusing features is not equivalent to recomputing them."""
    tensors, metadata, _ = reference
    index, _, call = list(_calls(tensors, metadata))[4]  # conditional stream, step 2
    with torch.no_grad():
        recomputed = converted_model(call["input_ids"], class_labels=call["class_labels"]).logits
    expected = call["logits"].permute(0, 2, 1).reshape(recomputed.shape)
    assert (recomputed - expected).abs().max() > 1e-3
