"""Opt-in: the real ENAT-L checkpoint against the reference implementation.

Runs only when `ENAT_CHECKPOINT` points to `nnet_ema.pth` (or `nnet_ema_512.pth`); the comparison with the reference
also needs `ENAT_REFERENCE_DIR`, a checkout of LeapLabTHU/ENAT (with einops and omegaconf installed).
"""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from enat_diffusers.conversion.pipeline import convert_transformer

CHECKPOINT = os.environ.get("ENAT_CHECKPOINT")
REFERENCE_DIR = os.environ.get("ENAT_REFERENCE_DIR")

pytestmark = pytest.mark.skipif(not CHECKPOINT, reason="set ENAT_CHECKPOINT to nnet_ema.pth to run")


@pytest.fixture(scope="module")
def converted():
    return convert_transformer(CHECKPOINT, num_attention_heads=16, num_decoder_layers=2)


def test_real_checkpoint_converts_to_enat_l(converted):
    assert converted.config.hidden_size == 1024 and converted.config.num_encoder_layers == 22
    assert 570e6 < converted.num_parameters() < 580e6


@pytest.mark.skipif(not REFERENCE_DIR, reason="set ENAT_REFERENCE_DIR to compare with the reference")
def test_real_checkpoint_matches_reference_on_a_reuse_step(converted):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conversion"))
    from reference_import import import_reference

    (models_module,) = import_reference(REFERENCE_DIR, "libs.models")
    side = converted.config.sample_size
    reference = models_module.DiT(
        input_size=side, hidden_size=1024, num_heads=16, num_classes=1000, args=SimpleNamespace(enc_dec=[22, 2])
    )
    reference.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    reference.eval()
    generator = torch.Generator().manual_seed(0)
    num_tokens = side * side
    ids = torch.randint(0, 1024, (2, num_tokens), generator=generator)
    order = torch.rand(2, num_tokens, generator=generator).argsort(dim=1)
    previous_ids = ids.masked_fill(order < num_tokens // 2, 1024)
    current_ids = ids.masked_fill(order < num_tokens // 3, 1024)
    labels = torch.tensor([207, 360])
    with torch.no_grad():
        reference_previous = reference(previous_ids, context=labels, return_dict=True)
        reference_current = reference(current_ids, context=labels, prev_dict=reference_previous, return_dict=True)
        ours_previous = converted(previous_ids, class_labels=labels)
        ours_current = converted(current_ids, class_labels=labels, reuse_state=ours_previous.reuse_state)
    expected = reference_current["logits"].transpose(1, 2).reshape(ours_current.logits.shape)
    assert (ours_current.logits - expected).abs().max() < 1e-3
    assert (ours_current.reuse_state.features - reference_current["feat"]).abs().max() < 1e-3
