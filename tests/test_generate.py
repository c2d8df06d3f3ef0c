"""examples/generate.py: demo:NAME models, output folders and formats checked before sampling, flag names."""

import pytest
from PIL import Image

from enat_diffusers.cpu_memory import cpu_memory_reuse_enabled, cpu_memory_reuse_supported, disable_cpu_memory_reuse

from .example_scripts import load_example

generate = load_example("generate")

pytestmark = pytest.mark.usefixtures("single_thread")


def test_demo_model_class_names_a_new_output_folder_and_freed_memory_kept(tmp_path, capsys):
    output = tmp_path / "new" / "folder" / "grid.png"
    argv = ["--model", "demo:digits", "--class_labels", "seven", "3", "--num_images_per_prompt", "2"]
    disable_cpu_memory_reuse()
    generate.main([*argv, "--num_inference_steps", "2", "--upscale", "1", "--output", str(output)])
    assert cpu_memory_reuse_enabled() == cpu_memory_reuse_supported()  # the scripts keep freed CPU memory for reuse
    with Image.open(output) as grid:
        assert grid.size == (2 * 16, 2 * (16 + generate.LABEL_HEIGHT))
    assert f"wrote 4 images to {output}" in capsys.readouterr().out


@pytest.fixture
def nothing_loaded(monkeypatch):
    monkeypatch.setattr(generate, "load_pipeline", lambda args: pytest.fail("the model was loaded"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output", "grid.txt"], "--output 'grid.txt': the extension .txt is no image format PIL writes"),
        (["--output", "grid"], "the extension (none) is no image format"),
        (["--model", "demo:cats"], "--model: unknown demo pipeline 'cats'; available: digits, digits-text"),
        (["--num_images_per_prompt", "0"], "--num_images_per_prompt must be a positive integer, got 0"),
        (["--upscale", "100000"], "--upscale must be at most 64, got 100000"),
        (["--class_labels", "3", "--prompt", "a seven"], "either --class_labels (class-conditional) or --prompt"),
    ],
)
def test_bad_arguments_are_refused_before_loading(argv, message, capsys, nothing_loaded):
    with pytest.raises(SystemExit) as stopped:
        generate.main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_as_output_is_refused(tmp_path, capsys, nothing_loaded):
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(SystemExit):
        generate.main(["--output", str(tmp_path / "grid.png")])
    assert "is a folder; give an image file name" in capsys.readouterr().err


def test_old_flag_names_warn_and_still_work(tmp_path):
    old = ["--class_ids", "1", "seven", "--images_per_class", "3", "--steps", "4", "--output", str(tmp_path / "g.png")]
    with pytest.warns(FutureWarning) as warned:
        args = generate.parse_args(old)
    assert (args.class_labels, args.num_images_per_prompt, args.num_inference_steps) == ([1, "seven"], 3, 4)
    replaced = {str(warning.message).rsplit("use ", 1)[1] for warning in warned}
    assert replaced == {"--class_labels", "--num_images_per_prompt", "--num_inference_steps"}


def test_a_grid_larger_than_the_pixel_limit_is_refused_before_sampling(monkeypatch):
    monkeypatch.setattr(generate, "generate", lambda *args: pytest.fail("sampling ran"))
    with pytest.raises(ValueError, match=r"the grid would be 10240x\d+ pixels, more than 100,000,000"):
        generate.main(["--upscale", "64", "--num_images_per_prompt", "10"])
