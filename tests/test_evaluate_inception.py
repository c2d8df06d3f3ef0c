"""Opt-in: examples/evaluate.py's Inception path against torch-fidelity's own FID and IS, on the same images and
the same Inception weights (random ones, so nothing is downloaded). Needs `torchmetrics[image]` (torch-fidelity and
torchvision, which CI's CPU torch cannot have); skipped without it."""

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from .example_scripts import load_example

torch_fidelity = pytest.importorskip("torch_fidelity", reason="needs torchmetrics[image] (torch-fidelity)")
NUM_IMAGES = 48


@pytest.fixture(scope="module")
def evaluate():
    return load_example("evaluate")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file for torch-fidelity's Inception-v3 with He-initialised random convolutions."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    with (
        mock.patch.object(inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *_: None),
    ):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(network.state_dict(), path)
    return path


def _image_folder(folder, smooth: bool, seed: int):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(NUM_IMAGES):
        noise = rng.integers(0, 256, (64, 64, 3))
        if smooth:  # gradients with a little noise: another distribution than uniform noise
            ramp = np.linspace(0, 255, 64)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
            noise = 0.8 * ramp + 0.2 * noise
        Image.fromarray(noise.astype(np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def test_inception_features_match_torch_fidelity(evaluate, inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(inception_weights)
    ).eval()
    with torch.no_grad():
        expected_features, expected_logits = theirs(images)
        features, logits = evaluate.InceptionFeatures(inception_weights)(images)
    assert features.abs().max() > 0
    torch.testing.assert_close(features.float(), expected_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.float(), expected_logits, rtol=1e-4, atol=1e-4)


def test_fid_and_inception_score_match_torch_fidelity(evaluate, inception_weights, tmp_path):
    samples = _image_folder(tmp_path / "samples", smooth=True, seed=0)
    reference = _image_folder(tmp_path / "reference", smooth=False, seed=1)
    ours = evaluate.main(
        [
            "--samples", str(samples), "--reference_images", str(reference),
            "--inception_weights", str(inception_weights), "--splits", "1", "--device", "cpu",
        ]
    )  # fmt: skip
    theirs = torch_fidelity.calculate_metrics(
        input1=str(samples),
        input2=str(reference),
        fid=True,
        isc=True,
        isc_splits=1,
        cuda=False,
        verbose=False,
        feature_extractor_weights_path=str(inception_weights),
    )
    assert ours["fid"] > 1e-3
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["inception_score_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)
