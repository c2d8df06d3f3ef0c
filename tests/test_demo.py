"""The packaged handwritten-digit demo pipelines: loading, recognisable samples, the generate script, the
reproducibility of the demo training (examples/train_demo_digits.py), and FID/IS of the demo with a digit classifier's
features (examples/evaluate_demo_digits.py)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from enat_diffusers import ENATPipeline, ENATText2ImagePipeline, load_demo_pipeline
from enat_diffusers.demo import DEMO_NAMES, demo_path

from .example_scripts import load_example

pytest.importorskip("sklearn", reason="the demo checks classify digits with scikit-learn")

SAMPLES_PER_CLASS = 10
MIN_ACCURACY = 0.9
MAX_DEMO_MEGABYTES = 15


@pytest.fixture(scope="module")
def demo_script():
    return load_example("train_demo_digits")


@pytest.fixture(scope="module")
def classifier(demo_script):
    classifier, held_out_accuracy = demo_script.fit_digit_classifier()
    assert held_out_accuracy > 0.95
    return classifier


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def class_pipeline():
    return quiet(load_demo_pipeline("digits"))


@pytest.fixture(scope="module")
def text_pipeline():
    return quiet(load_demo_pipeline("digits-text"))


def assert_recognised(table: dict) -> None:
    low = {name: accuracy for name, accuracy in table["per_class"].items() if accuracy < MIN_ACCURACY}
    assert not low, f"classes recognised in < {MIN_ACCURACY:.0%} of samples: {low} (table: {table})"
    assert table["overall"] >= MIN_ACCURACY, table


@pytest.mark.parametrize(
    ("name", "pipeline_class"), [("digits", ENATPipeline), ("digits-text", ENATText2ImagePipeline)]
)
def test_demo_folders_load_with_diffusers(name, pipeline_class):
    pipeline = DiffusionPipeline.from_pretrained(demo_path(name))
    assert type(pipeline) is pipeline_class
    assert pipeline.transformer.dtype == torch.float32
    assert pipeline.vqvae.config.sample_size == 16
    assert type(load_demo_pipeline(name)) is pipeline_class


def test_load_demo_pipeline_names_the_available_demos():
    with pytest.raises(ValueError, match="available: digits, digits-text"):
        load_demo_pipeline("mnist")
    assert DEMO_NAMES == ("digits", "digits-text")


def test_demo_folders_are_small():
    size = sum(path.stat().st_size for name in DEMO_NAMES for path in demo_path(name).rglob("*") if path.is_file())
    assert size < MAX_DEMO_MEGABYTES * 2**20


def test_class_names_select_classes(class_pipeline):
    assert class_pipeline.get_label_ids(["seven", "7", "digit seven"]) == [7, 7, 7]
    by_name = class_pipeline(class_labels=["three"], generator=torch.manual_seed(1), output_type="np").images
    by_id = class_pipeline(class_labels=[3], generator=torch.manual_seed(1), output_type="np").images
    assert (by_name == by_id).all()


def test_class_demo_draws_the_requested_digits(class_pipeline, demo_script, classifier):
    pixels, labels = demo_script.generate_class_samples(class_pipeline, SAMPLES_PER_CLASS, seed=1000)
    assert class_pipeline.config.default_num_inference_steps == 8
    assert_recognised(demo_script.accuracy_table(classifier, pixels, labels))


def test_text_demo_draws_the_prompted_digits(text_pipeline, demo_script, classifier):
    pixels, labels = demo_script.generate_text_samples(text_pipeline, SAMPLES_PER_CLASS, seed=1000)
    assert_recognised(demo_script.accuracy_table(classifier, pixels, labels))


def test_text_demo_understands_words_and_numerals(text_pipeline, demo_script, classifier):
    prompts = ["a handwritten seven", "the digit 7", "a handwritten two", "the digit 2"]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts) * 5)]
    images = text_pipeline(prompt=prompts, num_images_per_prompt=5, generator=generators, output_type="np").images
    predicted = classifier.predict(demo_script.images_to_digits(images))
    expected = [7] * 10 + [2] * 10
    assert (predicted == expected).mean() >= MIN_ACCURACY, predicted


def test_text_demo_ships_a_pruned_encoder(text_pipeline):
    tokenizer = text_pipeline.tokenizer
    assert len(tokenizer) < 200
    assert text_pipeline.text_encoder.config.vocab_size == len(tokenizer)
    tokens = tokenizer("a handwritten seven, the digit 7").input_ids
    assert tokenizer.unk_token_id not in tokens


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_evaluation_is_recorded_next_to_the_model(name):
    report = json.loads((demo_path(name) / "evaluation.json").read_text())
    assert report["num_inference_steps"] == 8
    assert report["overall"] >= MIN_ACCURACY
    assert min(report["per_class"].values()) >= MIN_ACCURACY


def test_generate_script_writes_a_labelled_grid(tmp_path, capsys):
    generate = load_example("generate")
    output = tmp_path / "grid.png"
    assert generate.main(["--output", str(output)]) == str(output)
    side = 16 * generate.DEMO_UPSCALE
    with Image.open(output) as grid:
        assert grid.size == (10 * side, side + generate.LABEL_HEIGHT)
        label_strip = grid.crop((0, side, side, side + generate.LABEL_HEIGHT)).convert("L")
        assert np.asarray(label_strip).min() < 128  # the class name is written under the image
    assert str(output) in capsys.readouterr().out


def test_generate_script_with_prompts_and_class_ids(tmp_path):
    generate = load_example("generate")
    output = tmp_path / "text.png"
    argv = ["--prompt", "the digit 3", "--num_images_per_prompt", "2", "--upscale", "2", "--output", str(output)]
    generate.main(argv)
    with Image.open(output) as grid:
        assert grid.size == (32, 2 * (32 + generate.LABEL_HEIGHT))
    generate.main(
        ["--class_labels", "1", "4", "--upscale", "1", "--num_inference_steps", "4", "--output", str(output)]
    )
    with Image.open(output) as grid:
        assert grid.size == (2 * 16, 16 + generate.LABEL_HEIGHT)
    with pytest.raises(ValueError, match="class-conditional"):
        generate.main(["--model", str(demo_path("digits")), "--prompt", "a seven", "--output", str(output)])


def test_vq_training_is_reproducible(demo_script):
    pixels, _ = demo_script.load_digit_data()
    images = demo_script.digits_to_images(pixels[:64])
    settings = {"warmup_steps": 2, "steps": 3, "batch_size": 16}
    first = demo_script.train_vq(images, seed=0, **settings).state_dict()
    second = demo_script.train_vq(images, seed=0, **settings).state_dict()
    other = demo_script.train_vq(images, seed=1, **settings).state_dict()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other["quantize.embedding.weight"], first["quantize.embedding.weight"])


def test_digit_images_round_trip_to_the_classifier_pixels(demo_script):
    pixels, _ = demo_script.load_digit_data()
    images = demo_script.digits_to_images(pixels[:20])
    assert images.shape == (20, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(demo_script.images_to_digits(images), torch.from_numpy(pixels[:20].reshape(20, -1)))


def test_demo_prefix_resolves_to_the_packaged_folder_and_leaves_other_names_alone():
    from enat_diffusers.demo import demo_path, resolve_pretrained_location

    assert resolve_pretrained_location("demo:digits-text") == str(demo_path("digits-text"))
    assert resolve_pretrained_location("org/enat-l-256") == "org/enat-l-256"
    with pytest.raises(ValueError, match="available: digits, digits-text"):
        resolve_pretrained_location("demo:cats")


def test_digits_check_separates_the_trained_demo_from_an_untrained_transformer(tmp_path, capsys):
    """Feature-space FID to held-out real digits (a small digit classifier's penultimate layer replaces Inception):
    the packaged demo is far closer to real digits than the same pipeline with a random transformer, and not far
    from the real-vs-real floor. Measured (seeds 0 / 1 / 2, 10 per class, 2 IS splits): FID trained 0.21 / 0.21 /
    0.20, untrained 1.81 / 1.43 / 1.28, real 0.10 / 0.19 / 0.16; IS trained 9.3 / 9.4 / 9.0, untrained 4.8 / 4.8 /
    4.8 (`python examples/evaluate_demo_digits.py` uses 20 per class)."""
    output = tmp_path / "digits.json"
    argv = ["--samples_per_class", "10", "--splits", "2", "--json", str(output)]
    report = load_example("evaluate_demo_digits").main(argv)
    assert json.loads(output.read_text()) == report
    results = report["results"]
    assert report["classifier_accuracy_on_reference"] > 0.9
    assert {name: result["num_samples"] for name, result in results.items()} == {
        "trained": 100,
        "untrained": 100,
        "real_held_out": 100,
    }
    trained, untrained, real = (results[name]["fid"] for name in ("trained", "untrained", "real_held_out"))
    assert 3 * trained < untrained, results
    assert 3 * real < untrained, results
    assert trained < 4 * real + 0.1, results
    assert results["trained"]["inception_score_mean"] > results["untrained"]["inception_score_mean"] + 2.0
    printed = capsys.readouterr().out
    assert "trained" in printed and "untrained" in printed and f"{untrained:.3f}" in printed
