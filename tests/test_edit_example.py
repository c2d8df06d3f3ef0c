"""examples/edit.py refuses bad files and outputs with one sentence before the model is loaded or the edit runs."""

import inspect

import PIL.Image
import pytest

from .example_scripts import load_example

edit = load_example("edit")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def nothing_loaded(monkeypatch):
    monkeypatch.setattr(edit, "load_pipeline", lambda *args, **kwargs: pytest.fail("the model was loaded"))


@pytest.fixture
def digit(tmp_path):
    path = tmp_path / "digit.png"
    PIL.Image.effect_noise((16, 16), 60).convert("RGB").save(path)
    return path


def bad_file(folder, kind):
    if kind == "corrupt":
        path = folder / "corrupt.png"
        PIL.Image.effect_noise((64, 64), 60).save(path)
        path.write_bytes(path.read_bytes()[:150])
    elif kind == "bomb":  # 20000x20000 one-bit pixels: 40 kB on disk, 400 million pixels decoded
        path = folder / "bomb.png"
        PIL.Image.new("1", (20000, 20000)).save(path)
    else:
        path = folder / "notes.png"
        path.write_text("not an image")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt", "--image: 'corrupt.png' could not be decoded"),
        ("bomb", "--image: 'bomb.png' declares more pixels than Pillow opens (a decompression bomb)"),
        ("text", "--image: 'notes.png' is not an image file"),
    ],
)
def test_bad_image_files_are_refused_before_loading(tmp_path, capsys, nothing_loaded, kind, message):
    with pytest.raises(SystemExit) as stopped:
        edit.main(
            ["--image", str(bad_file(tmp_path, kind)), "--class_labels", "7", "--output", str(tmp_path / "o.png")]
        )
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output", "edited.txt"], "--output 'edited.txt': the extension .txt is no image format PIL writes"),
        (["--upscale", "100000"], "--upscale must be at most 64, got 100000"),
        (["--mask_image", "missing.png"], "--mask_image: 'missing.png' does not exist or is not a file"),
        (["--strength", "0"], "--strength: `strength` must be a number in (0, 1], got 0.0"),
        (["--strength", "0.1", "--num_inference_steps", "4"], "--strength: `strength` 0.1 runs no step"),
        # the step count is checked first: its own error, not a strength that "runs no step of 0 steps"
        (["--strength", "0.5", "--num_inference_steps", "0"], "--num_inference_steps must be a positive integer"),
    ],
)
def test_bad_outputs_sizes_and_masks_are_refused_before_loading(digit, capsys, nothing_loaded, flags, message):
    with pytest.raises(SystemExit) as stopped:
        edit.main(["--image", str(digit), "--class_labels", "7", *flags])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_output_folder_is_created(digit, tmp_path):
    output = tmp_path / "new" / "folder" / "edited.png"
    edit.main(["--image", str(digit), "--class_labels", "7", "--num_inference_steps", "2", "--output", str(output)])
    assert PIL.Image.open(output).size == (2 * (16 * 8 + 2), 16 * 8 + 2)


def test_a_grid_too_large_is_refused_before_the_edit_runs(digit, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(edit.ENATImg2ImgPipeline, "__call__", lambda *args, **kwargs: calls.append(1))
    argv = ["--image", str(digit), "--class_labels", "7", "--upscale", "64", "--num_images_per_prompt", "100"]
    with pytest.raises(SystemExit, match=r"the grid would be \d+x\d+ pixels, more than 100,000,000"):
        edit.main([*argv, "--output", str(tmp_path / "o.png")])
    assert not calls


def test_a_strength_that_runs_no_step_of_the_models_default_steps_is_one_sentence(digit, tmp_path):
    # Without --num_inference_steps the step count is the model's: the pipeline's check answers, before any model call.
    with pytest.raises(SystemExit, match=r"^edit.py: error: `strength` 0.01 runs no step of `num_inference_steps`"):
        edit.main(
            ["--image", str(digit), "--class_labels", "7", "--strength", "0.01", "--output", str(tmp_path / "o.png")]
        )


def test_inpainting_takes_strength(digit, tmp_path, monkeypatch):
    seen = []  # the strength each call runs with: the one passed, else the pipeline's default
    original = edit.ENATInpaintPipeline.__call__
    default = inspect.signature(original).parameters["strength"].default
    monkeypatch.setattr(
        edit.ENATInpaintPipeline,
        "__call__",
        lambda self, **kwargs: seen.append(kwargs.get("strength", default)) or original(self, **kwargs),
    )
    mask = tmp_path / "mask.png"
    PIL.Image.new("L", (16, 16), 255).save(mask)
    argv = ["--image", str(digit), "--mask_image", str(mask), "--class_labels", "7", "--num_inference_steps", "4"]
    edit.main([*argv, "--output", str(tmp_path / "default.png")])
    edit.main([*argv, "--strength", "0.5", "--output", str(tmp_path / "half.png")])
    assert seen == [1.0, 0.5]
