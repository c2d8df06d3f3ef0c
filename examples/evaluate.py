#!/usr/bin/env python
"""FID and Inception Score of generated images, computed with torchmetrics (plus KID on request).

    # samples (uint8 NHWC `arr_0` npz, ADM format, or a folder of PNG/JPEG images) against reference statistics
    python examples/evaluate.py --samples OUT/samples.npz \\
        --reference_stats fid_stats_imagenet256_guided_diffusion.npz \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth [--batch_size 100] [--device cuda] [--json fid.json]
    # against reference images instead (a folder or an `arr_0` npz); --kid adds the Kernel Inception Distance
    python examples/evaluate.py --samples OUT/samples.npz --reference_images VIRTUAL_imagenet256_labeled.npz \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth --kid
    # save the statistics of reference images (`mu`, `sigma`) for later runs
    python examples/evaluate.py --reference_images REAL_FOLDER --save_reference_stats real_stats.npz \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth
    # the same metrics on the packaged digits demo, with a small digit classifier in place of Inception (no
    # downloads): examples/evaluate_demo_digits.py

How the numbers are computed:

- Features come from a *feature extractor*: any `torch.nn.Module` mapping a uint8 `(B, 3, H, W)` image batch to
  `(B, d)` features, or to a tuple `(features, logits)`; the logits, when given, feed the Inception Score. For real
  use it is `InceptionFeatures`: the TensorFlow FID Inception-v3 as ported by torch-fidelity and loaded by
  torchmetrics' `NoTrainInceptionV3` from a local weights file (2048 pool features and the 1008 "unbiased" logits,
  the features torchmetrics and torch-fidelity use for FID and IS), resized to 299 px with torch-fidelity's
  TensorFlow-1-compatible bilinear resize (`--antialias` switches to torchmetrics' default antialiased resize).
  Each image batch goes through the extractor once.
- The features enter torchmetrics' `FrechetInceptionDistance`, `InceptionScore` and `KernelInceptionDistance`
  (each given a pass-through "feature" module, since the features are already computed). Reference statistics
  from an npz with `mu` and `sigma` (the format of `fid_stats_imagenet256_guided_diffusion.npz` and of ADM's
  reference batches) are written into the FID metric's real-feature states (float64 sum, sum of outer products and
  count) so that the metric's own mean and covariance are `mu` and `sigma`, and the Fréchet distance is computed by
  torchmetrics in both modes.
- The Inception Score is the mean and standard deviation over `--splits` splits, as in torchmetrics (the images
  are shuffled with `--seed` first). KID needs the reference features themselves, hence `--reference_images`.
- Precision and recall (Kynkäänniemi et al.), also reported by ADM's evaluation suite, are not computed:
  torchmetrics has no precision/recall metric for generative models.

Requirements: `pip install torchmetrics` (the package's `eval` extra) for the metrics, and for Inception features
`pip install "torchmetrics[image]"` (torch-fidelity, torchvision and scipy) plus the weights file
`weights-inception-2015-12-05-6726825d.pth` from torch-fidelity's releases (`INCEPTION_WEIGHTS_URL`; pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, which the reference repository links, carries the same content hash in its
name). No download happens here: the weights path must be given.
"""

import argparse
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import numpy as np
import torch
from torch import nn

from enat_diffusers.script_utils import require_optional

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLES_KEY = "arr_0"
# The count written into the FID metric's real states for reference statistics: 2 makes the metric's mean
# (sum / 2) and the covariance numerator (divided by 2 - 1) reproduce `mu` and `sigma` up to one rounding.
STATS_NUM_SAMPLES = 2
KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100
# Reference covariances are checked for symmetry and positive semi-definiteness up to this relative tolerance (of
# the largest absolute entry / eigenvalue): float32 statistics files carry rounding of that order.
STATS_TOLERANCE = 1e-4


class EvaluationError(ValueError):
    """A bad input or a missing requirement, reported before (or instead of) computing the metrics."""


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------


class ImageSource:
    """Images read in batches as uint8 `(B, 3, H, W)` tensors; `len()` is the number of images."""

    description: str

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError


def _check_image_layout(shape: tuple, dtype: np.dtype, where: str) -> None:
    if dtype != np.uint8:
        raise EvaluationError(f"{where} must hold uint8 images (0..255), got dtype {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise EvaluationError(
            f"{where} must hold images as (N, H, W, 3) (NHWC, RGB), got shape {tuple(shape)}"
            + (" (NCHW? transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else "")
        )
    if shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
        raise EvaluationError(f"{where} holds no images (shape {tuple(shape)})")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


class ArrayImages(ImageSource):
    """Images in memory: a uint8 `(N, H, W, 3)` array."""

    def __init__(self, array: np.ndarray, description: str = "images"):
        _check_image_layout(array.shape, array.dtype, description)
        self.array = array
        self.description = f"{description} ({len(array)} images, {array.shape[1]}x{array.shape[2]})"

    def __len__(self) -> int:
        return len(self.array)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.array), batch_size):
            yield _to_tensor(self.array[start : start + batch_size])


def _read_npy_header(member) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version in ((2, 0), (3, 0)):  # 3.0 differs from 2.0 only in the encoding of field names
        return np.lib.format.read_array_header_2_0(member)
    raise EvaluationError(f"unsupported .npy format version {version}")


class NpzImages(ImageSource):
    """The `arr_0` array of an npz (uint8 NHWC, the ADM sample format), streamed batch by batch: the header is
    checked when the source is opened, and at most one batch is in memory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise EvaluationError(f"{self.path} does not exist")
        try:
            archive = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise EvaluationError(f"{self.path} is not an .npz archive") from None
        with archive:
            names = archive.namelist()
            if f"{SAMPLES_KEY}.npy" not in names:
                arrays = ", ".join(name.removesuffix(".npy") for name in names) or "nothing"
                raise EvaluationError(
                    f"{self.path} has no `{SAMPLES_KEY}` array (it holds: {arrays}); image npz files keep uint8 "
                    f"(N, H, W, 3) images in `{SAMPLES_KEY}`, as examples/sample_at_scale.py and ADM write them"
                )
            with archive.open(f"{SAMPLES_KEY}.npy") as member:
                shape, fortran_order, dtype = _read_npy_header(member)
        _check_image_layout(shape, dtype, f"`{SAMPLES_KEY}` of {self.path}")
        if fortran_order:
            raise EvaluationError(f"`{SAMPLES_KEY}` of {self.path} is stored in Fortran order; save a C-order array")
        self.shape = tuple(shape)
        self.description = f"{self.path} ({self.shape[0]} images, {self.shape[1]}x{self.shape[2]})"

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        num_images, height, width, channels = self.shape
        image_bytes = height * width * channels
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{SAMPLES_KEY}.npy") as member:
            _read_npy_header(member)
            for start in range(0, num_images, batch_size):
                count = min(batch_size, num_images - start)
                try:
                    data = bytearray(member.read(count * image_bytes))  # writable, for torch.from_numpy
                except (zipfile.BadZipFile, OSError, EOFError) as error:  # e.g. a failing CRC, a cut-off file
                    raise EvaluationError(f"{self.path} is damaged after {start} images ({error})") from None
                if len(data) != count * image_bytes:
                    raise EvaluationError(f"`{SAMPLES_KEY}` of {self.path} is truncated after {start} images")
                yield _to_tensor(np.frombuffer(data, dtype=np.uint8).reshape(count, height, width, channels))


class FolderImages(ImageSource):
    """PNG/JPEG files under a folder (subfolders included, sorted by path), converted to RGB; all of one size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EvaluationError(f"{self.path} does not exist")
        self.files = sorted(file for file in self.path.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise EvaluationError(f"{self.path} holds no PNG/JPEG images ({', '.join(IMAGE_SUFFIXES)})")
        self.description = f"{self.path} ({len(self.files)} images)"

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        from PIL import Image

        size = None
        for start in range(0, len(self.files), batch_size):
            arrays = []
            for file in self.files[start : start + batch_size]:
                try:
                    with Image.open(file) as image:
                        array = np.asarray(image.convert("RGB"))
                except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated or not an image
                    raise EvaluationError(f"{file} cannot be read as an image ({error})") from None
                if size is None:
                    size = array.shape
                elif array.shape != size:
                    raise EvaluationError(
                        f"{file} is {array.shape[1]}x{array.shape[0]} but {self.files[0]} is {size[1]}x{size[0]}: "
                        "bring the images to one size first (ADM's reference batches are center crops)"
                    )
                arrays.append(array)
            yield _to_tensor(np.stack(arrays))


def open_images(path: str | Path) -> ImageSource:
    """A folder of images or an npz with uint8 NHWC `arr_0`; the header or file list is checked here."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.exists():
        raise EvaluationError(f"{path} does not exist")
    return NpzImages(path)


# ----------------------------------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------------------------------


def load_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`mu` `(d,)` and `sigma` `(d, d)` (float64) of an npz such as `fid_stats_imagenet256_guided_diffusion.npz`."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path} is not an npz file with `mu` and `sigma`: {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{path} is not an npz file with `mu` and `sigma`")
    with archive:
        missing = [key for key in ("mu", "sigma") if key not in archive.files]
        if missing:
            raise EvaluationError(
                f"{path} has no {' / '.join(f'`{key}`' for key in missing)} array (it holds: "
                f"{', '.join(archive.files) or 'nothing'}); reference statistics are an npz with `mu` (d,) and "
                "`sigma` (d, d), as written by --save_reference_stats"
            )
        mu, sigma = archive["mu"], archive["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvaluationError(
            f"{path}: `mu` must be (d,) and `sigma` (d, d), got mu {mu.shape} and sigma {sigma.shape}"
        )
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise EvaluationError(f"{path}: `mu` and `sigma` must be floating point, got {mu.dtype} and {sigma.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    check_statistics(mu, sigma, str(path))
    return mu, sigma


def check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str = "the reference statistics") -> None:
    """Refuses statistics that no set of images has: non-finite values, or a `sigma` that is not a covariance
    (asymmetric, or with a negative eigenvalue), which would give a meaningless (even negative) FID."""
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"{where}: `mu` or `sigma` holds NaN or infinite values")
    scale = float(np.abs(sigma).max()) or 1.0
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > STATS_TOLERANCE * scale:
        raise EvaluationError(
            f"{where}: `sigma` is not symmetric (largest |sigma - sigma^T| {asymmetry:.3g}, entries up to "
            f"{scale:.3g}), so it is no covariance matrix"
        )
    eigenvalues = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eigenvalues[0] < -STATS_TOLERANCE * max(float(eigenvalues[-1]), scale):
        raise EvaluationError(
            f"{where}: `sigma` is not positive semi-definite (smallest eigenvalue {eigenvalues[0]:.3g}, largest "
            f"{eigenvalues[-1]:.3g}), so it is no covariance matrix"
        )


def output_file_problem(path: str | Path) -> str | None:
    """Why a result file cannot be written at `path` (a folder there, a file in the way of its folder, no write
    permission), in one sentence, or `None`; checked before any feature is computed."""
    path = Path(path).absolute()
    if path.is_dir():
        return f"{path} is a folder"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create a folder for {path}: {parent} is a file"
    if (path.exists() and not os.access(path, os.W_OK)) or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {path}: no write permission"
    return None


def check_split_count(num_samples: int, splits: int) -> None:
    """The Inception Score needs at least 2 images per split (one image per split gives exactly 1.0)."""
    if splits * 2 > num_samples:
        raise EvaluationError(
            f"--splits {splits} needs at least {2 * splits} samples (2 per split; a split of one image gives an "
            f"Inception Score of exactly 1), got {num_samples}: lower --splits to at most {max(1, num_samples // 2)}"
        )


def save_reference_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, num_samples: int) -> Path:
    """Writes `mu`, `sigma` (float64) and `num_samples` to an npz that --reference_stats reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:  # a file object: np.savez would otherwise append ".npz" to other names
        np.savez(handle, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), num_samples=num_samples)
    return path


def set_real_statistics(fid, mu, sigma) -> None:
    """Sets the real-feature states of a torchmetrics `FrechetInceptionDistance` so that its mean and covariance
    (sum / n and (sum of outer products - n mean mean^T) / (n - 1)) are `mu` and `sigma`."""
    state = fid.real_features_sum
    mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64, device=state.device)
    sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64, device=state.device)
    if mu.shape != state.shape:
        raise EvaluationError(f"the reference statistics have {len(mu)} features, the metric {len(state)}")
    n = STATS_NUM_SAMPLES
    row = mu.unsqueeze(0)
    fid.real_features_num_samples = torch.tensor(n, dtype=fid.real_features_num_samples.dtype, device=state.device)
    fid.real_features_sum = mu * n
    fid.real_features_cov_sum = sigma * (n - 1) + n * row.t().mm(row)


def real_statistics(fid) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean and covariance of the real features accumulated by a torchmetrics FID metric (its formulas)."""
    n = int(fid.real_features_num_samples)
    if n < 2:
        raise EvaluationError(f"reference statistics need at least 2 images, got {n}")
    mean = (fid.real_features_sum / n).unsqueeze(0)
    cov = (fid.real_features_cov_sum - n * mean.t().mm(mean)) / (n - 1)
    return mean.squeeze(0).cpu().numpy(), cov.cpu().numpy(), n


# ----------------------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------------------


def torch_fidelity_import_error() -> str | None:
    """None if torch-fidelity (torchmetrics' Inception network) imports, else the reason it does not."""
    try:
        import torch_fidelity  # noqa: F401
    except Exception as error:  # torch-fidelity imports torchvision, which may itself fail to import
        return f"{type(error).__name__}: {error}"
    return None


def check_inception_setup(weights_path: str | Path | None) -> Path:
    """Checks, without reading any image, that Inception features can be computed offline; returns the weights
    path. Raises `EvaluationError` naming what is missing and how to get it."""
    get_weights = (
        f"download {INCEPTION_WEIGHTS_URL.rsplit('/', 1)[1]} from torch-fidelity's releases "
        f"({INCEPTION_WEIGHTS_URL}; pytorch-fid's pt_inception-2015-12-05-6726825d.pth has the same hash) and pass its path"
    )
    if weights_path is None:
        raise EvaluationError(
            f"--inception_weights is required for Inception features (no download here): {get_weights}"
        )
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise EvaluationError(f"--inception_weights {weights_path} is not a file: {get_weights}")
    reason = torch_fidelity_import_error()
    if reason is not None:
        raise EvaluationError(
            "Inception features need torch-fidelity (torchmetrics' Inception-v3): "
            f'pip install "torchmetrics[image]" (installs torch-fidelity, torchvision, scipy) [{reason}]'
        )
    return weights_path


class InceptionFeatures(nn.Module):
    """uint8 `(B, 3, H, W)` images -> the FID Inception-v3's 2048 pool features and its 1008 unbiased logits
    (pool features times the classifier weight, without bias: torch-fidelity's `logits_unbiased`, the features
    torchmetrics' InceptionScore uses)."""

    num_features = 2048
    returns_logits = True

    def __init__(self, weights_path: str | Path, antialias: bool = False):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=str(check_inception_setup(weights_path)),
            antialias=antialias,
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.network(images)
        return features, features @ self.network.fc.weight.t()


class PrecomputedFeatures(nn.Module):
    """The "feature extractor" handed to the torchmetrics metrics: features are computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def extract(extractor: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features, logits or None) of a batch, checked for shape."""
    output = extractor(images)
    features, logits = (
        (output[0], output[1] if len(output) > 1 else None) if isinstance(output, tuple | list) else (output, None)
    )
    for name, value in (("features", features), ("logits", logits)):
        if value is not None and (value.ndim != 2 or value.shape[0] != images.shape[0]):
            raise EvaluationError(
                f"the feature extractor must return (batch, n) {name}, got {tuple(value.shape)} "
                f"for {images.shape[0]} images"
            )
    return features, logits


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


def _torchmetrics():
    purpose = "FID, IS and KID (torchmetrics' metrics)"
    fid = require_optional("torchmetrics.image.fid", "eval", purpose)
    inception = require_optional("torchmetrics.image.inception", "eval", purpose)
    kid = require_optional("torchmetrics.image.kid", "eval", purpose)
    return fid.FrechetInceptionDistance, inception.InceptionScore, kid.KernelInceptionDistance


class FeatureMetrics:
    """torchmetrics' FID, Inception Score and (optionally) KID fed with precomputed features."""

    def __init__(
        self, device: torch.device | str = "cpu", splits: int = 10, kid: bool = False, num_samples: int | None = None
    ):
        self.device = torch.device(device)
        self.expected_samples = num_samples
        self.splits = splits
        self.kid_enabled = kid
        self.num_features = None
        self.fid = self.inception_score = self.kid = None

    def _create(self, num_features: int) -> None:
        fid_class, _, kid_class = _torchmetrics()
        self.num_features = num_features
        self.fid = fid_class(feature=PrecomputedFeatures(num_features)).to(self.device)
        if self.kid_enabled:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                self.kid = kid_class(feature=PrecomputedFeatures(num_features), subsets=KID_SUBSETS).to(self.device)

    def set_reference_statistics(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        if self.fid is None:
            self._create(len(mu))
        set_real_statistics(self.fid, mu, sigma)

    def update(self, features: torch.Tensor, logits: torch.Tensor | None, real: bool) -> None:
        if self.fid is None:
            self._create(features.shape[1])
        if features.shape[1] != self.num_features:
            raise EvaluationError(
                f"the feature extractor gives {features.shape[1]} features but the reference has {self.num_features}"
            )
        features = features.to(self.device, torch.float64)
        self.fid.update(features, real=real)
        if self.kid is not None:
            self.kid.update(features, real=real)
        if not real and logits is not None:
            if self.inception_score is None:
                if self.expected_samples is not None:  # for extractors not known to give logits until now
                    check_split_count(self.expected_samples, self.splits)
                _, is_class, _ = _torchmetrics()
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                    metric = is_class(feature=PrecomputedFeatures(logits.shape[1]), splits=self.splits)
                self.inception_score = metric.to(self.device)
            self.inception_score.update(logits.to(self.device, torch.float64))

    def compute(self, seed: int = 0) -> dict:
        num_samples = int(self.fid.fake_features_num_samples)
        if num_samples < 2:
            raise EvaluationError(f"FID needs at least 2 samples, got {num_samples}")
        results = {"fid": float(self.fid.compute()), "num_samples": num_samples, "num_features": self.num_features}
        if self.inception_score is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of a single split
                    mean, std = self.inception_score.compute()
            results["inception_score_mean"] = float(mean)
            results["inception_score_std"] = float(std) if self.splits > 1 else None
            results["inception_score_splits"] = self.splits
        if self.kid is not None:
            real_count = sum(len(features) for features in self.kid.real_features)
            self.kid.subset_size = min(KID_SUBSET_SIZE, num_samples, real_count)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                mean, std = self.kid.compute()
            results.update(kid_mean=float(mean), kid_std=float(std), kid_subset_size=self.kid.subset_size)
        return results


def _feed(metrics: FeatureMetrics, source: ImageSource, extractor: nn.Module, real: bool, batch_size: int) -> None:
    device = metrics.device
    for images in source.batches(batch_size):
        features, logits = extract(extractor, images.to(device))
        metrics.update(features, logits, real=real)


def check_inputs(samples: ImageSource | None, reference_images: ImageSource | None, splits: int | None = None) -> None:
    """Image counts that give no meaningful statistics, refused before any feature is computed (`splits`: the
    Inception Score's, when the extractor is known to give logits)."""
    if reference_images is not None and len(reference_images) < 2:
        raise EvaluationError(
            f"{reference_images.description}: a covariance needs at least 2 reference images, got {len(reference_images)}"
        )
    if samples is not None:
        if len(samples) < 2:
            raise EvaluationError(f"{samples.description}: FID needs at least 2 samples, got {len(samples)}")
        if splits is not None:
            check_split_count(len(samples), splits)


@torch.no_grad()
def compute_reference_stats(
    source: ImageSource, extractor: nn.Module, batch_size: int = 100, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images) of the features of `source`, as the FID metric accumulates them."""
    check_inputs(None, source)
    extractor.eval()
    metrics = FeatureMetrics(device)
    _feed(metrics, source, extractor, True, batch_size)
    return real_statistics(metrics.fid)


@torch.no_grad()
def compute_metrics(
    samples: ImageSource,
    extractor: nn.Module,
    *,
    reference_stats: tuple[np.ndarray, np.ndarray] | None = None,
    reference_images: ImageSource | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    splits: int = 10,
    kid: bool = False,
    seed: int = 0,
    save_stats_to: str | Path | None = None,
) -> dict:
    """FID (and IS if the extractor gives logits, KID if `kid`) of `samples` against reference statistics
    (`mu`, `sigma`) or reference images; `save_stats_to` also writes the statistics of the reference images."""
    if (reference_stats is None) == (reference_images is None):
        raise EvaluationError("give either reference statistics or reference images")
    if (kid or save_stats_to is not None) and reference_images is None:
        raise EvaluationError("KID and saving reference statistics need reference images")
    if reference_stats is not None:
        check_statistics(*reference_stats)
    check_inputs(samples, reference_images, splits if getattr(extractor, "returns_logits", False) else None)
    extractor.eval()
    metrics = FeatureMetrics(device, splits=splits, kid=kid, num_samples=len(samples))
    if reference_stats is not None:
        metrics.set_reference_statistics(*reference_stats)
    else:
        _feed(metrics, reference_images, extractor, True, batch_size)
        if save_stats_to is not None:
            save_reference_stats(save_stats_to, *real_statistics(metrics.fid))
    _feed(metrics, samples, extractor, False, batch_size)
    return metrics.compute(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=Path, help="Generated images: an npz with uint8 NHWC `arr_0`, or a folder.")
    parser.add_argument("--reference_stats", type=Path, help="An npz with `mu` and `sigma` (reference statistics).")
    parser.add_argument("--reference_images", type=Path, help="Real images: an `arr_0` npz or a folder.")
    parser.add_argument(
        "--save_reference_stats", type=Path, help="Write the `mu`/`sigma` of --reference_images to this npz."
    )
    parser.add_argument(
        "--inception_weights", type=Path, help=f"Local Inception-v3 weights file ({INCEPTION_WEIGHTS_URL})."
    )
    parser.add_argument(
        "--antialias",
        action="store_true",
        help="Antialiased resize to 299 px (torchmetrics' default) instead of TF1's.",
    )
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--splits", type=int, default=10, help="Inception Score splits.")
    parser.add_argument("--kid", action="store_true", help="Also the Kernel Inception Distance (--reference_images).")
    parser.add_argument("--seed", type=int, default=0, help="Shuffling for the IS splits and KID subsets.")
    parser.add_argument("--json", type=Path, help="Also write the results to this json file.")
    parser.add_argument("--digits_demo", action="store_true", help=argparse.SUPPRESS)  # moved: see below
    args = parser.parse_args(argv)
    if args.digits_demo:
        parser.error("the digits check moved to its own script: python examples/evaluate_demo_digits.py")
    for flag in ("batch_size", "splits"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer")
    for flag in ("json", "save_reference_stats"):
        if getattr(args, flag) is not None and (problem := output_file_problem(getattr(args, flag))):
            parser.error(f"--{flag}: {problem}")
    if args.reference_stats is not None and args.reference_images is not None:
        parser.error("pass either --reference_stats or --reference_images, not both")
    if args.samples is None and args.save_reference_stats is None:
        parser.error("pass --samples (to evaluate) or --save_reference_stats (to store reference statistics)")
    if args.samples is not None and args.reference_stats is None and args.reference_images is None:
        parser.error("--samples needs --reference_stats (an npz with mu/sigma) or --reference_images")
    if args.save_reference_stats is not None and args.reference_images is None:
        parser.error("--save_reference_stats needs --reference_images")
    if args.kid and (args.reference_images is None or args.samples is None):
        parser.error("--kid needs --samples and --reference_images (reference statistics are not enough)")
    return args


def _format_score(results: dict) -> str:
    if "inception_score_mean" not in results:
        return "-"
    std = results["inception_score_std"]
    return f"{results['inception_score_mean']:.3f}" + ("" if std is None else f" ± {std:.3f}")


def format_results(results: dict) -> str:
    lines = [
        f"samples: {results['samples']}",
        f"reference: {results['reference']}",
        f"FID: {results['fid']:.4f}",
    ]
    if "inception_score_mean" in results:
        lines.append(f"Inception Score: {_format_score(results)} ({results['inception_score_splits']} splits)")
    if "kid_mean" in results:
        lines.append(
            f"KID: {results['kid_mean']:.6f} ± {results['kid_std']:.6f} (subsets of {results['kid_subset_size']})"
        )
    return "\n".join(lines)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace, feature_extractor: nn.Module | None = None) -> dict:
    device = torch.device(args.device or _default_device())
    # Everything that can fail is checked before any image is read: the Inception setup, then the inputs.
    weights = check_inception_setup(args.inception_weights) if feature_extractor is None else None
    reference_stats = load_reference_stats(args.reference_stats) if args.reference_stats is not None else None
    reference_images = open_images(args.reference_images) if args.reference_images is not None else None
    samples = open_images(args.samples) if args.samples is not None else None
    if reference_stats is not None:
        check_statistics(*reference_stats, str(args.reference_stats))
    if feature_extractor is None:
        feature_extractor = InceptionFeatures(weights, antialias=args.antialias)
        extractor_name = f"Inception-v3 ({weights.name}), {'antialiased' if args.antialias else 'TF1'} resize"
    else:
        extractor_name = type(feature_extractor).__name__
    num_features = getattr(feature_extractor, "num_features", None)
    if reference_stats is not None and isinstance(num_features, int) and num_features != len(reference_stats[0]):
        raise EvaluationError(
            f"{args.reference_stats} has {len(reference_stats[0])} features, {extractor_name} gives {num_features}"
        )
    check_inputs(
        samples, reference_images, args.splits if getattr(feature_extractor, "returns_logits", False) else None
    )
    feature_extractor = feature_extractor.to(device)
    if samples is None:
        mu, sigma, count = compute_reference_stats(reference_images, feature_extractor, args.batch_size, device)
        save_reference_stats(args.save_reference_stats, mu, sigma, count)
        print(
            f"wrote the statistics of {reference_images.description} ({len(mu)} features) to {args.save_reference_stats}"
        )
        return {
            "reference": reference_images.description,
            "num_reference": count,
            "saved": str(args.save_reference_stats),
        }
    results = compute_metrics(
        samples,
        feature_extractor,
        reference_stats=reference_stats,
        reference_images=reference_images,
        batch_size=args.batch_size,
        device=device,
        splits=args.splits,
        kid=args.kid,
        seed=args.seed,
        save_stats_to=args.save_reference_stats,
    )
    reference = f"{args.reference_stats} (mu/sigma)" if reference_images is None else reference_images.description
    results = {"samples": samples.description, "reference": reference, "feature_extractor": extractor_name, **results}
    if args.save_reference_stats is not None:
        results["saved"] = str(args.save_reference_stats)
    print(format_results(results))
    return results


def main(argv: list[str] | None = None, feature_extractor: nn.Module | None = None) -> dict:
    """The command line; `feature_extractor` (a module mapping uint8 `(B, 3, H, W)` images to features, or to
    `(features, logits)`) replaces Inception, e.g. for tests."""
    args = parse_args(argv)
    try:
        results = run(args, feature_extractor)
    except EvaluationError as error:
        raise SystemExit(f"evaluate.py: error: {error}") from None
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
