"""examples/evaluate.py: torchmetrics' FID against the closed form, reference statistics (mu/sigma) round trip,
clear errors before any image is read. The digits check (examples/evaluate_demo_digits.py) is tested in test_demo.py."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from .example_scripts import load_example

pytest.importorskip("torchmetrics", reason="examples/evaluate.py computes the metrics with torchmetrics")
scipy_linalg = pytest.importorskip("scipy.linalg")


@pytest.fixture(scope="module")
def evaluate():
    return load_example("evaluate")


class AffineFeatures(nn.Module):
    """features = W @ flatten(image) + b (float64), optionally with logits = scale * one_hot(first pixel % k)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, num_classes: int | None = None):
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(weight))
        self.register_buffer("bias", torch.from_numpy(bias))
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor):
        features = images.flatten(1).double() @ self.weight.t() + self.bias
        if self.num_classes is None:
            return features
        classes = images[:, 0, 0, 0].long() % self.num_classes
        return features, 60.0 * nn.functional.one_hot(classes, self.num_classes).double()


def flat_pixels(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 -> the (N, C*H*W) vectors the feature modules see (NCHW order)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.float64)


def prescribed_features(images: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> AffineFeatures:
    """An affine module whose features of `images` have exactly the sample mean `mean` and the (unbiased) sample
    covariance `cov`: whiten the pixel vectors, keep `d` whitened coordinates, colour them with chol(cov)."""
    pixels = flat_pixels(images)
    pixel_mean, pixel_cov = pixels.mean(axis=0), np.cov(pixels, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(pixel_cov)
    whiten = eigenvectors @ np.diag(eigenvalues**-0.5) @ eigenvectors.T
    weight = np.linalg.cholesky(cov) @ whiten[: len(mean)]
    return AffineFeatures(weight, mean - weight @ pixel_mean)


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def closed_form_fid(mu1, sigma1, mu2, sigma2) -> float:
    root = scipy_linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2.0 * root))


def random_images(rng: np.random.Generator, count: int, low: int = 0, size: int = 4) -> np.ndarray:
    return rng.integers(low, 256, size=(count, size, size, 3), dtype=np.uint8)


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def write_png_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return folder


def test_fid_matches_the_closed_form_for_prescribed_statistics(evaluate, tmp_path):
    rng = np.random.default_rng(0)
    dim = 6
    images = random_images(rng, 200)
    mu1, sigma1 = rng.normal(size=dim), random_spd(rng, dim)
    mu2, sigma2 = rng.normal(size=dim) + 0.5, random_spd(rng, dim)
    module = prescribed_features(images, mu1, sigma1)
    features = module(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(features.mean(axis=0), mu1, atol=1e-10)
    np.testing.assert_allclose(np.cov(features, rowvar=False), sigma1, atol=1e-10)

    samples = write_npz(tmp_path / "samples.npz", arr_0=images)
    stats = write_npz(tmp_path / "stats.npz", mu=mu2, sigma=sigma2)
    argv = ["--samples", str(samples), "--reference_stats", str(stats), "--batch_size", "64"]
    result = evaluate.main(argv, feature_extractor=module)
    expected = closed_form_fid(mu1, sigma1, mu2, sigma2)
    assert expected > 1.0
    assert result["fid"] == pytest.approx(expected, rel=1e-9)
    assert result["num_samples"] == 200 and result["num_features"] == dim
    assert "inception_score_mean" not in result  # the module gives no logits

    same = write_npz(tmp_path / "same.npz", mu=mu1, sigma=sigma1)
    result = evaluate.main(["--samples", str(samples), "--reference_stats", str(same)], feature_extractor=module)
    assert abs(result["fid"]) < 1e-9 * np.trace(sigma1)
    result = evaluate.main(["--samples", str(samples), "--reference_images", str(samples)], feature_extractor=module)
    assert abs(result["fid"]) < 1e-9 * np.trace(sigma1)


def test_reference_statistics_enter_the_metric_states_exactly(evaluate):
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=4) * 3.0, random_spd(rng, 4)
    metrics = evaluate.FeatureMetrics()
    metrics.set_reference_statistics(mu, sigma)
    read_mu, read_sigma, count = evaluate.real_statistics(metrics.fid)
    assert count == evaluate.STATS_NUM_SAMPLES
    np.testing.assert_array_equal(read_mu, mu)
    np.testing.assert_allclose(read_sigma, sigma, rtol=0, atol=1e-13)


def test_inception_score_from_logits(evaluate, tmp_path):
    images = np.zeros((40, 4, 4, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(40) % 4  # balanced over 4 classes
    images[:, 1:] = np.random.default_rng(2).integers(0, 256, size=(40, 3, 4, 3))
    module = AffineFeatures(np.random.default_rng(3).normal(size=(3, 48)), np.zeros(3), num_classes=4)
    stats = write_npz(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    samples = write_npz(tmp_path / "balanced.npz", arr_0=images)
    argv = ["--samples", str(samples), "--reference_stats", str(stats)]
    result = evaluate.main([*argv, "--splits", "1"], feature_extractor=module)
    assert result["inception_score_mean"] == pytest.approx(4.0, rel=1e-9)
    assert result["inception_score_std"] is None
    one_class = images.copy()
    one_class[:, 0, 0, 0] = 2
    samples = write_npz(tmp_path / "one_class.npz", arr_0=one_class)
    result = evaluate.main(["--samples", str(samples), "--reference_stats", str(stats)], feature_extractor=module)
    assert result["inception_score_mean"] == pytest.approx(1.0, rel=1e-9)
    assert result["inception_score_splits"] == 10 and result["inception_score_std"] == pytest.approx(0.0, abs=1e-9)


def test_saved_reference_statistics_round_trip(evaluate, tmp_path, capsys):
    rng = np.random.default_rng(4)
    real = random_images(rng, 120)
    fake = random_images(rng, 50, low=60)
    module = AffineFeatures(rng.normal(size=(5, 48)) / 50.0, rng.normal(size=5))
    real_npz = write_npz(tmp_path / "real.npz", arr_0=real, arr_1=np.zeros(120, dtype=np.int64))
    fake_folder = write_png_folder(tmp_path / "fake", fake)
    stats = tmp_path / "stats" / "real_stats.npz"

    evaluate.main(
        ["--reference_images", str(real_npz), "--save_reference_stats", str(stats)], feature_extractor=module
    )
    assert str(stats) in capsys.readouterr().out
    real_features = module(torch.from_numpy(real).permute(0, 3, 1, 2)).numpy()
    with np.load(stats) as saved:
        np.testing.assert_allclose(saved["mu"], real_features.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(saved["sigma"], np.cov(real_features, rowvar=False), rtol=1e-9, atol=1e-12)
        assert int(saved["num_samples"]) == 120

    from_stats = evaluate.main(
        ["--samples", str(fake_folder), "--reference_stats", str(stats)], feature_extractor=module
    )
    output = tmp_path / "result.json"
    from_images = evaluate.main(
        ["--samples", str(fake_folder), "--reference_images", str(real_npz), "--kid", "--json", str(output)],
        feature_extractor=module,
    )
    fake_features = module(torch.from_numpy(fake).permute(0, 3, 1, 2)).numpy()
    expected = closed_form_fid(
        fake_features.mean(axis=0),
        np.cov(fake_features, rowvar=False),
        real_features.mean(axis=0),
        np.cov(real_features, rowvar=False),
    )
    assert from_stats["fid"] == pytest.approx(expected, rel=1e-8)
    assert from_images["fid"] == pytest.approx(from_stats["fid"], rel=1e-10)
    assert from_images["kid_subset_size"] == 50 and from_images["kid_mean"] > 0
    assert json.loads(output.read_text()) == from_images
    printed = capsys.readouterr().out
    assert f"FID: {from_images['fid']:.4f}" in printed and "KID:" in printed

    again = tmp_path / "again.npz"
    argv = ["--samples", str(fake_folder), "--reference_images", str(real_npz), "--save_reference_stats", str(again)]
    evaluate.main(argv, feature_extractor=module)
    with np.load(stats) as first, np.load(again) as second:
        np.testing.assert_array_equal(first["mu"], second["mu"])
        np.testing.assert_array_equal(first["sigma"], second["sigma"])


def _no_image_reading(evaluate, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("inputs were read before the Inception setup was checked")

    for name in ("open_images", "load_reference_stats", "compute_metrics", "compute_reference_stats"):
        monkeypatch.setattr(evaluate, name, fail)


def test_missing_inception_weights_fail_before_any_image_is_read(evaluate, tmp_path, monkeypatch):
    _no_image_reading(evaluate, monkeypatch)
    samples = write_npz(tmp_path / "samples.npz", arr_0=random_images(np.random.default_rng(5), 4))
    argv = ["--samples", str(samples), "--reference_stats", str(tmp_path / "stats.npz")]
    with pytest.raises(SystemExit, match="--inception_weights is required") as error:
        evaluate.main(argv)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(error.value)
    assert "github.com/toshas/torch-fidelity/releases" in str(error.value)
    for missing in (tmp_path / "nowhere.pth", tmp_path):
        with pytest.raises(SystemExit, match=r"--inception_weights .* is not a file: download"):
            evaluate.main([*argv, "--inception_weights", str(missing)])


def test_missing_torch_fidelity_fails_before_any_image_is_read(evaluate, tmp_path, monkeypatch):
    _no_image_reading(evaluate, monkeypatch)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setattr(evaluate, "torch_fidelity_import_error", lambda: "ModuleNotFoundError: no torch_fidelity")
    argv = ["--samples", str(tmp_path / "s.npz"), "--reference_stats", str(tmp_path / "r.npz")]
    with pytest.raises(SystemExit, match=r'pip install "torchmetrics\[image\]"') as error:
        evaluate.main([*argv, "--inception_weights", str(weights)])
    assert "no torch_fidelity" in str(error.value)
    reason = evaluate.torch_fidelity_import_error()  # the real check: None when torch-fidelity imports
    assert reason is None or isinstance(reason, str)


def test_inception_features_wrap_torchmetrics_inception(evaluate, tmp_path, monkeypatch):
    """Without torch-fidelity, a stand-in for torchmetrics' NoTrainInceptionV3 checks the wiring: the local weights
    path, the 2048 pool features, and the unbiased logits (features @ fc.weight^T) for the Inception Score."""
    import torchmetrics.image.fid

    created = {}

    class FakeInception(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            created.update(kwargs)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, images):
            return images.flatten(1).float()[:, :1].repeat(1, 2048)

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(evaluate, "torch_fidelity_import_error", lambda: None)
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeInception)
    module = evaluate.InceptionFeatures(weights, antialias=True)
    assert created == {
        "name": "inception-v3-compat",
        "features_list": ["2048"],
        "feature_extractor_weights_path": str(weights),
        "antialias": True,
    }
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    features, logits = module(images)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    torch.testing.assert_close(logits, features @ module.network.fc.weight.t())


@pytest.fixture
def bad_inputs(tmp_path):
    rng = np.random.default_rng(6)
    good = write_npz(tmp_path / "good.npz", arr_0=random_images(rng, 8))
    stats = write_npz(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    mixed = write_png_folder(tmp_path / "mixed", random_images(rng, 2))
    Image.fromarray(random_images(rng, 1, size=5)[0]).save(mixed / "99999.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.npz").write_text("not an archive")
    return {
        "good": good,
        "stats": stats,
        "no_arr_0": write_npz(tmp_path / "no_arr_0.npz", images=random_images(rng, 2)),
        "float": write_npz(tmp_path / "float.npz", arr_0=random_images(rng, 2).astype(np.float32)),
        "nchw": write_npz(tmp_path / "nchw.npz", arr_0=random_images(rng, 2).transpose(0, 3, 1, 2).copy()),
        "grey": write_npz(tmp_path / "grey.npz", arr_0=random_images(rng, 2)[..., 0]),
        "text": tmp_path / "text.npz",
        "missing": tmp_path / "missing.npz",
        "empty": tmp_path / "empty",
        "mixed": mixed,
        "shape_mismatch": write_npz(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4)),
        "no_sigma": write_npz(tmp_path / "no_sigma.npz", mu=np.zeros(3)),
        "wide": write_npz(tmp_path / "wide.npz", mu=np.zeros(5), sigma=np.eye(5)),
        "nan": write_npz(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3)),
        "asymmetric": write_npz(tmp_path / "asymmetric.npz", mu=np.zeros(3), sigma=np.eye(3) + np.eye(3, k=1)),
        "not_psd": write_npz(tmp_path / "not_psd.npz", mu=np.zeros(3), sigma=np.diag([1.0, 1.0, -0.5])),
        "truncated": _truncated_png_folder(tmp_path / "truncated", random_images(rng, 3)),
    }


def _truncated_png_folder(folder: Path, images: np.ndarray) -> Path:
    write_png_folder(folder, images)
    damaged = folder / "00001.png"
    damaged.write_bytes(damaged.read_bytes()[:60])
    return folder


@pytest.mark.parametrize(
    ("samples", "reference", "message"),
    [
        ("no_arr_0", "stats", r"has no `arr_0` array \(it holds: images\)"),
        ("float", "stats", "must hold uint8 images .* got dtype float32"),
        ("nchw", "stats", r"\(N, H, W, 3\) \(NHWC, RGB\), got shape \(2, 3, 4, 4\) \(NCHW\?"),
        ("grey", "stats", r"got shape \(2, 4, 4\)"),
        ("text", "stats", "is not an .npz archive"),
        ("missing", "stats", "missing.npz does not exist"),
        ("empty", "stats", "holds no PNG/JPEG images"),
        ("mixed", "stats", "is 5x5 but .* is 4x4: bring the images to one size"),
        ("good", "shape_mismatch", r"`mu` must be \(d,\) and `sigma` \(d, d\), got mu \(3,\) and sigma \(4, 4\)"),
        ("good", "no_sigma", r"has no `sigma` array \(it holds: mu\)"),
        ("good", "nan", "NaN or infinite"),
        ("good", "wide", "the feature extractor gives 3 features but the reference has 5"),
        ("good", "text", "is not an npz file with `mu` and `sigma`"),
        ("good", "asymmetric", r"asymmetric.npz: `sigma` is not symmetric .* so it is no covariance matrix"),
        ("good", "not_psd", r"`sigma` is not positive semi-definite \(smallest eigenvalue -0.5, largest 1\)"),
        ("truncated", "stats", r"truncated/00001.png cannot be read as an image"),
    ],
)
def test_bad_inputs_fail_clearly(evaluate, bad_inputs, samples, reference, message):
    module = AffineFeatures(np.ones((3, 48)) / 48.0, np.zeros(3))
    argv = ["--samples", str(bad_inputs[samples]), "--reference_stats", str(bad_inputs[reference])]
    with pytest.raises(SystemExit, match=message):
        evaluate.main(argv, feature_extractor=module)


def test_feature_count_is_checked_before_reading_images(evaluate, bad_inputs, monkeypatch):
    module = AffineFeatures(np.ones((3, 48)), np.zeros(3))
    module.num_features = 3
    monkeypatch.setattr(evaluate, "compute_metrics", lambda *args, **kwargs: pytest.fail("images were read"))
    argv = ["--samples", str(bad_inputs["good"]), "--reference_stats", str(bad_inputs["wide"])]
    with pytest.raises(SystemExit, match="wide.npz has 5 features, AffineFeatures gives 3"):
        evaluate.main(argv, feature_extractor=module)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "s.npz"], "--samples needs --reference_stats"),
        (["--samples", "s.npz", "--reference_stats", "r.npz", "--reference_images", "i"], "not both"),
        (["--reference_stats", "r.npz"], "pass --samples"),
        (
            ["--samples", "s.npz", "--reference_stats", "r.npz", "--kid"],
            "--kid needs --samples and --reference_images",
        ),
        (
            ["--samples", "s.npz", "--reference_stats", "r.npz", "--save_reference_stats", "o.npz"],
            "needs --reference_images",
        ),
        (["--digits_demo"], "the digits check moved to its own script: python examples/evaluate_demo_digits.py"),
        (["--samples", "s.npz", "--reference_stats", "r.npz", "--batch_size", "0"], "--batch_size must be a positive"),
    ],
)
def test_bad_command_lines_fail_clearly(evaluate, capsys, argv, message):
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    assert message in capsys.readouterr().err


class LogitFeatures(AffineFeatures):
    """An extractor known to give logits (as Inception), so the split count is checked before any feature."""

    returns_logits = True


@pytest.fixture
def no_features(evaluate, monkeypatch):
    monkeypatch.setattr(evaluate, "_feed", lambda *args, **kwargs: pytest.fail("features were computed"))


def test_more_splits_than_samples_allow_are_refused(evaluate, bad_inputs, no_features):
    module = LogitFeatures(np.ones((3, 48)) / 48.0, np.zeros(3), num_classes=4)
    argv = ["--samples", str(bad_inputs["good"]), "--reference_stats", str(bad_inputs["stats"]), "--splits", "5"]
    with pytest.raises(SystemExit, match="--splits 5 needs at least 10 samples .* got 8: lower --splits to at most 4"):
        evaluate.main(argv, feature_extractor=module)


def test_more_splits_than_samples_allow_are_refused_for_any_extractor_with_logits(evaluate, bad_inputs):
    module = AffineFeatures(np.ones((3, 48)) / 48.0, np.zeros(3), num_classes=4)  # logits found with the features
    argv = ["--samples", str(bad_inputs["good"]), "--reference_stats", str(bad_inputs["stats"]), "--splits", "8"]
    with pytest.raises(SystemExit, match="--splits 8 needs at least 16 samples"):
        evaluate.main(argv, feature_extractor=module)


def test_a_single_reference_image_is_refused_before_any_feature(evaluate, bad_inputs, tmp_path, no_features):
    one = write_png_folder(tmp_path / "one", random_images(np.random.default_rng(0), 1))
    module = AffineFeatures(np.ones((3, 48)) / 48.0, np.zeros(3))
    argv = ["--samples", str(bad_inputs["good"]), "--reference_images", str(one)]
    with pytest.raises(SystemExit, match="a covariance needs at least 2 reference images, got 1"):
        evaluate.main(argv, feature_extractor=module)
    with pytest.raises(SystemExit, match="at least 2 reference images"):
        evaluate.main(["--reference_images", str(one), "--save_reference_stats", str(tmp_path / "s.npz")], module)


def test_result_files_that_cannot_be_written_are_refused_before_any_feature(evaluate, bad_inputs, tmp_path, capsys):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("x")
    base = ["--samples", str(bad_inputs["good"]), "--reference_stats", str(bad_inputs["stats"])]
    for flag, path, message in [
        ("--json", tmp_path, "is a folder"),
        ("--json", in_the_way / "results.json", "is a file"),
        ("--save_reference_stats", in_the_way / "stats.npz", "is a file"),
    ]:
        argv = [*base, flag, str(path)] if flag == "--json" else ["--reference_images", "r", flag, str(path)]
        with pytest.raises(SystemExit):
            evaluate.parse_args(argv)
        error = capsys.readouterr().err
        assert f"{flag}: " in error and message in error, (flag, error)


def test_missing_torchmetrics_gives_the_pip_command(evaluate, bad_inputs, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # import fails as if not installed
    module = AffineFeatures(np.ones((3, 48)) / 48.0, np.zeros(3))
    argv = ["--samples", str(bad_inputs["good"]), "--reference_stats", str(bad_inputs["stats"])]
    with pytest.raises(
        SystemExit, match=r'needs the optional package .torchmetrics.: pip install "enat-diffusers\[eval\]"'
    ):
        evaluate.main(argv, feature_extractor=module)
