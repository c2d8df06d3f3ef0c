"""Teaching the shipped `digits` demo model new classes with examples/train_enat.py: 90-degree-rotated digits.

The new classes ("rotated one", ...) replace the ten digits (`--new_classes replace`, embeddings start from the mean
of the old ones). A scikit-learn SVC trained on upright and rotated digits (20 classes, chance 5%) must recognise the
samples of each new class as that rotated digit. Measured on a 2-core machine shared with other jobs (load 7-9), one
thread: 150 full fine-tuning steps (batch 32) take 14-35 s for the whole test, depending on the load, and reach 0.72
overall (per class 0.64-0.88; 0.08 of the samples look like upright digits); the thresholds below leave room for
other torch builds and seeds. The opt-in
variant (ENAT_RUN_SLOW=1) trains a LoRA adapter with the new class embeddings (measured numbers in its docstring).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from .example_scripts import load_example
from .training_assets import fresh_accelerate_state, train_enat

pytest.importorskip("sklearn")
demo = load_example("train_demo_digits")

NEW_DIGITS = (1, 2, 4, 7)
SAMPLES_PER_CLASS = 25

_fresh_accelerate_state = pytest.fixture(autouse=True)(fresh_accelerate_state)
pytestmark = pytest.mark.usefixtures("single_thread")


def _rotated(pixels: np.ndarray) -> np.ndarray:
    return np.rot90(pixels, k=1, axes=(1, 2)).copy()


def _name(digit: int) -> str:
    return f"rotated {demo.WORDS[digit]}"


@pytest.fixture(scope="module")
def rotated_digits(tmp_path_factory):
    """Class folders of the rotated new digits, and an SVC on upright (0..9) and rotated (10..19) digits."""
    from sklearn.svm import SVC

    root = tmp_path_factory.mktemp("rotated_digits")
    pixels, labels = demo.load_digit_data()
    rotated = _rotated(pixels)
    images = demo.digits_to_images(rotated)
    for index, label in enumerate(labels):
        if label in NEW_DIGITS:
            folder = root / _name(int(label))
            folder.mkdir(exist_ok=True)
            demo.to_pil(images[index]).save(folder / f"{index:04d}.png")
    features = np.concatenate([pixels, rotated]).reshape(2 * len(labels), -1)
    classifier = SVC(gamma=0.001, C=10.0).fit(features, np.concatenate([labels, labels + 10]))
    return root, classifier


def _fine_tune(data_dir: Path, output: Path, steps: int, *extra) -> Path:
    train_enat.main(
        [
            "--train_data_dir", str(data_dir), "--pretrained_model_name_or_path", "demo:digits",
            "--new_classes", "replace", "--resolution", "16", "--train_batch_size", "32", "--learning_rate", "3e-3",
            "--adam_beta1", "0.9", "--adam_beta2", "0.99", "--lr_warmup_steps", "20", "--max_train_steps", str(steps),
            "--ema_decay", "0.98", "--checkpointing_steps", "100000", "--mixed_precision", "no",
            "--cache_dir", str(output / "cache"), "--output_dir", str(output / "out"), *map(str, extra),
        ]
    )  # fmt: skip
    return output / "out"


def _recognised(folder: Path, classifier) -> tuple[dict[str, float], float]:
    """Per new class: the share of its samples classified as that rotated digit; and the share of upright digits."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    class_labels = [_name(digit) for digit in NEW_DIGITS for _ in range(SAMPLES_PER_CLASS)]
    generators = [torch.Generator().manual_seed(index) for index in range(len(class_labels))]
    images = pipe(class_labels=class_labels, generator=generators, output_type="np").images
    predicted = classifier.predict(demo.images_to_digits(images)).reshape(len(NEW_DIGITS), SAMPLES_PER_CLASS)
    per_class = {_name(d): float(np.mean(row == d + 10)) for d, row in zip(NEW_DIGITS, predicted, strict=True)}
    return per_class, float(np.mean(predicted < 10))


def test_fine_tuned_digits_model_draws_the_new_rotated_classes(rotated_digits, tmp_path):
    data_dir, classifier = rotated_digits
    output = _fine_tune(data_dir, tmp_path, 150)
    pipe_labels = DiffusionPipeline.load_config(output)["id2label"]
    assert sorted(pipe_labels.values()) == sorted(_name(d) for d in NEW_DIGITS)
    per_class, upright = _recognised(output, classifier)
    assert np.mean(list(per_class.values())) >= 0.45, per_class  # measured 0.72; chance 0.05
    assert min(per_class.values()) >= 0.25, per_class  # measured >= 0.64
    assert upright <= 0.25, upright  # measured 0.08: the new classes are not the old upright digits


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ENAT_RUN_SLOW") != "1", reason="opt-in: ENAT_RUN_SLOW=1")
def test_lora_on_the_digits_model_draws_the_new_rotated_classes(rotated_digits, tmp_path):
    """LoRA rank 16 on the attention, feed-forward and adaLN layers plus the new class embeddings, 300 steps (batch
    32, lr 1e-2): measured 85 s of training (same busy machine), 0.70 overall (per class 0.56-0.92), 0.08 upright.
    With the default targets (attention projections only), rank 8 and lr 3e-3 it reached only 0.23: this small
    model needs its MLPs and adaLN layers adapted to draw rotated digits."""
    pytest.importorskip("peft")
    data_dir, classifier = rotated_digits
    targets = ["to_q", "to_kv", "to_out", "ff.net.0.proj", "ff.net.2", "adaln_modulation"]
    lora = ["--lora_rank", 16, "--learning_rate", 1e-2, "--lora_target_modules", *targets]
    output = _fine_tune(data_dir, tmp_path, 300, *lora)
    assert (output / train_enat.LORA_WEIGHT_NAME).is_file()
    per_class, upright = _recognised(output, classifier)
    assert np.mean(list(per_class.values())) >= 0.45, per_class
    assert min(per_class.values()) >= 0.25, per_class
    assert upright <= 0.25, upright
