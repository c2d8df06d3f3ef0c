#!/usr/bin/env python
"""FID and IS on the packaged handwritten-digit demo, with examples/evaluate.py's metrics and no downloads.

    pip install -e ".[eval]"   # torchmetrics and scikit-learn
    python examples/evaluate_demo_digits.py                              # generates the samples itself
    python examples/sample_at_scale.py --model demo:digits --num_images_per_prompt 4 --output_dir digit-samples
    python examples/evaluate_demo_digits.py --samples digit-samples/samples.npz   # or a folder of PNGs

A small digit classifier stands in for Inception: it is trained on one part of scikit-learn's digits, its
`DIGIT_FEATURES`-d penultimate layer gives the FID features and its 10 logits the IS. The reference statistics come
from a second, held-out part. The script reports the distance to them of the demo's samples (generated here, or
`--samples`, e.g. written by examples/sample_at_scale.py), of the same pipeline with an untrained transformer, and of
held-out real digits (the finite-sample floor): the trained demo lands far closer to real digits than the untrained
one. The FID and IS themselves are examples/evaluate.py's (`compute_metrics`, torchmetrics underneath).
"""

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from enat_diffusers.image_utils import digits_to_uint8, images_to_digits, to_uint8
from enat_diffusers.script_utils import require_optional

DIGIT_FEATURES = 16
DIGIT_SPLIT_SEED = 0
DIGIT_REFERENCE_FRACTION = 0.3
DIGIT_BASELINE_FRACTION = 0.2
EVALUATE = Path(__file__).resolve().parent / "evaluate.py"


def load_evaluate():
    """examples/evaluate.py as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("evaluate", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DigitFeatures(nn.Module):
    """A small digit classifier standing in for Inception: uint8 `(B, 3, H, W)` images -> grey 8x8 pixels
    (`images_to_digits`, as the demo's own classifier check) -> MLP. Returns the penultimate layer
    (`DIGIT_FEATURES` features) and the 10 class logits."""

    num_features = DIGIT_FEATURES
    returns_logits = True

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, DIGIT_FEATURES), nn.Tanh())
        self.head = nn.Linear(DIGIT_FEATURES, 10)

    @staticmethod
    def pixels(images: torch.Tensor) -> torch.Tensor:
        return images_to_digits(images) / 16.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(self.pixels(images))
        return features, self.head(features)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def train_digit_features(
    images: np.ndarray, labels: np.ndarray, steps: int = 400, seed: int = DIGIT_SPLIT_SEED
) -> DigitFeatures:
    """`DigitFeatures` trained (full-batch Adam, cross-entropy) on uint8 NHWC digit images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitFeatures()
    inputs = model.pixels(_nchw(images))
    targets = torch.from_numpy(labels).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: on a busy machine, a thread pool costs more than it gains
    try:
        for _ in range(steps):
            loss = F.cross_entropy(model.head(model.body(inputs)), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def generate_digits(pipeline, samples_per_class: int, seed: int) -> np.ndarray:
    """`samples_per_class` images of each digit, image `i` from generator seed `seed + i`, as uint8 NHWC."""
    labels = np.repeat(np.arange(10), samples_per_class).tolist()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    return to_uint8(pipeline(class_labels=labels, generator=generators, output_type="np").images)


def untrained_digits_pipeline(trained, seed: int):
    """The demo pipeline with a randomly initialised transformer of the same config (same VQ and scheduler)."""
    from enat_diffusers import ENATPipeline, ENATTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ENATTransformer2DModel.from_config(trained.transformer.config).eval()
    pipeline = ENATPipeline(
        transformer=transformer.to(trained.device),
        vqvae=trained.vqvae,
        scheduler=trained.scheduler,
        id2label=trained.config.get("id2label"),
        default_num_inference_steps=trained.config["default_num_inference_steps"],
        default_guidance_scale=trained.config["default_guidance_scale"],
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _read_samples(evaluate, path: Path) -> np.ndarray:
    source = evaluate.open_images(path)
    return np.concatenate([batch.permute(0, 2, 3, 1).numpy() for batch in source.batches(1000)])


@dataclass
class DigitFeatureSpace:
    """The digit classifier standing in for Inception, the statistics of the held-out real digits in its feature
    space, and a second held-out part of real digits (for the real-vs-real floor)."""

    extractor: DigitFeatures
    reference_stats: tuple[np.ndarray, np.ndarray]
    num_reference: int
    classifier_accuracy: float
    baseline_images: np.ndarray
    num_train: int


def digit_feature_space(batch_size: int = 100, device: str | torch.device = "cpu") -> DigitFeatureSpace:
    """Splits scikit-learn's digits (fixed seed) into a part the classifier trains on, a reference part (FID
    statistics) and a baseline part; trains the classifier."""
    require_optional("torchmetrics", "eval", "The digits check (FID and IS)")
    datasets = require_optional("sklearn.datasets", "eval", "The digits check (scikit-learn's digits)")
    model_selection = require_optional("sklearn.model_selection", "eval", "The digits check")
    evaluate = load_evaluate()
    digits = datasets.load_digits()
    images, labels = digits_to_uint8(digits.images), digits.target
    indices = np.arange(len(labels))
    train, rest = model_selection.train_test_split(
        indices,
        test_size=DIGIT_REFERENCE_FRACTION + DIGIT_BASELINE_FRACTION,
        random_state=DIGIT_SPLIT_SEED,
        stratify=labels,
    )
    reference, baseline = model_selection.train_test_split(
        rest,
        test_size=DIGIT_BASELINE_FRACTION / (DIGIT_REFERENCE_FRACTION + DIGIT_BASELINE_FRACTION),
        random_state=DIGIT_SPLIT_SEED,
        stratify=labels[rest],
    )
    extractor = train_digit_features(images[train], labels[train]).to(device)
    with torch.no_grad():
        _, logits = extractor(_nchw(images[reference]).to(device))
    accuracy = float((logits.argmax(dim=1).cpu().numpy() == labels[reference]).mean())
    mu, sigma, num_reference = evaluate.compute_reference_stats(
        evaluate.ArrayImages(images[reference], "real digits"), extractor, batch_size, device
    )
    return DigitFeatureSpace(extractor, (mu, sigma), num_reference, accuracy, images[baseline], len(train))


def run_digits_check(
    samples_per_class: int = 20,
    seed: int = 0,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    splits: int = 10,
    samples: Path | None = None,
) -> dict:
    """Feature-space FID (and digit-classifier IS) to held-out real digits of the packaged `digits` demo (or of
    `samples`), of the same pipeline with an untrained transformer, and of real digits (the finite-sample floor)."""
    space = digit_feature_space(batch_size, device)
    evaluate = load_evaluate()
    from enat_diffusers import load_demo_pipeline

    trained = load_demo_pipeline("digits").to(device)
    trained.set_progress_bar_config(disable=True)
    demo_samples = (
        generate_digits(trained, samples_per_class, seed) if samples is None else _read_samples(evaluate, samples)
    )
    num_samples = len(demo_samples)
    untrained_per_class = max(1, num_samples // 10)
    # the real-vs-real floor: as many held-out real digits as generated samples (at most the baseline split)
    baseline = space.baseline_images[np.random.default_rng(seed).permutation(len(space.baseline_images))]
    sets = {
        "trained": demo_samples,
        "untrained": generate_digits(untrained_digits_pipeline(trained, seed), untrained_per_class, seed),
        "real_held_out": baseline[:num_samples],
    }
    results = {
        name: evaluate.compute_metrics(
            evaluate.ArrayImages(array, name),
            space.extractor,
            reference_stats=space.reference_stats,
            batch_size=batch_size,
            device=device,
            splits=splits,
            seed=seed,
        )
        for name, array in sets.items()
    }
    return {
        "feature_extractor": (
            f"MLP digit classifier (64-64-{DIGIT_FEATURES}-10) trained on {space.num_train} real digits; "
            f"features: its {DIGIT_FEATURES}-d penultimate layer, logits for the IS"
        ),
        "classifier_accuracy_on_reference": space.classifier_accuracy,
        "num_reference": space.num_reference,
        "samples": str(samples) if samples is not None else f"generated here, {samples_per_class} per class",
        "num_inference_steps": trained.config["default_num_inference_steps"],
        "results": results,
    }


def format_report(report: dict) -> str:
    lines = [
        f"digits check: {report['feature_extractor']}",
        f"reference: {report['num_reference']} held-out real digits "
        f"(classifier accuracy on them {report['classifier_accuracy_on_reference']:.3f})",
        f"{'images':<16}{'count':>6}{'FID (digit features)':>22}{'IS (digit classes)':>22}",
    ]
    for name, result in report["results"].items():
        std = result.get("inception_score_std")
        score = f"{result['inception_score_mean']:.3f}" + ("" if std is None else f" ± {std:.3f}")
        lines.append(f"{name:<16}{result['num_samples']:>6}{result['fid']:>22.3f}{score:>22}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=Path, default=None, help="Demo samples (npz or folder); default: generate.")
    parser.add_argument("--samples_per_class", type=int, default=20, help="Samples per digit when generating.")
    parser.add_argument("--splits", type=int, default=10, help="IS splits.")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report to this json file.")
    args = parser.parse_args(argv)
    for flag in ("samples_per_class", "splits", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.samples is not None and not args.samples.exists():
        parser.error(f"--samples: {args.samples} does not exist")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    evaluate = load_evaluate()
    if args.json is not None and (problem := evaluate.output_file_problem(args.json)):
        raise SystemExit(f"--json: {problem}")
    try:
        report = run_digits_check(
            args.samples_per_class, args.seed, args.batch_size, args.device, args.splits, args.samples
        )
    except evaluate.EvaluationError as error:
        raise SystemExit(f"evaluate_demo_digits.py: error: {error}") from None
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
