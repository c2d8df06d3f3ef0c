"""The browser app's functions called directly (enat_diffusers.app): images, the step view, errors and concurrency.
The page itself, in a real browser, is tested by test_app_browser.py."""

import re
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AmusedScheduler

from enat_diffusers import ENATImg2ImgPipeline, ENATInpaintPipeline, ENATScheduler, load_demo_pipeline
from enat_diffusers.app import (
    DEFAULT_HOST,
    MASKED_FADE,
    MASKED_GREY,
    REVEALED_COLOR,
    AppInputError,
    ENATApp,
    ResultFiles,
    display_scale,
    edit_page_handlers,
    editor_mask,
    load_pipeline,
    parse_args,
    sample_editor_value,
    upscale,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_TOKENS = 16  # the digits demo: 4x4 tokens, 16x16 pixels


@pytest.fixture(scope="module")
def app():
    return ENATApp(load_demo_pipeline("digits"), model_name="demo:digits")


def alone(app: ENATApp, class_id: int, seed: int, steps: int, guidance_scale: float, masking_schedule: str):
    """The image the pipeline makes by itself for one class and seed, with that masking schedule."""
    scheduler = ENATScheduler.from_config(app.pipeline.scheduler.config, masking_schedule=masking_schedule)
    pipeline = type(app.pipeline).from_pipe(app.pipeline, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    output = pipeline(
        class_labels=[class_id],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="np",
    )
    return output.images[0]


def test_each_image_is_the_pipelines_image_for_its_class_and_the_seed_in_its_caption(app):
    result = app.generate(
        ["seven", "2"], num_images=2, num_inference_steps=6, guidance_scale=2.0, masking_schedule="linear", seed=11
    )
    assert result.seeds == [11, 12, 13, 14]
    assert result.captions == ["seven · seed 11", "seven · seed 12", "two · seed 13", "two · seed 14"]
    for image, class_id, seed in zip(result.images, [7, 7, 2, 2], result.seeds, strict=True):
        expected = alone(app, class_id, seed, steps=6, guidance_scale=2.0, masking_schedule="linear")
        np.testing.assert_allclose(np.asarray(image, dtype=np.float32) / 255, expected, atol=1 / 255)


def test_a_request_leaves_the_shared_pipeline_as_it_was(app):
    schedule, guidance = app.pipeline.scheduler.config.masking_schedule, app.pipeline.guidance_scale
    app.generate(["3"], num_images=1, num_inference_steps=4, guidance_scale=7.5, masking_schedule="arccos", seed=0)
    assert app.pipeline.scheduler.config.masking_schedule == schedule == "cosine"
    assert app.pipeline.guidance_scale == guidance
    assert app.pipeline.scheduler.num_inference_steps is None


def test_class_names_synonyms_and_ids_select_the_same_class(app):
    assert app.parse_class_labels(["seven"]) == app.parse_class_labels("7") == app.parse_class_labels(["digit 7"])
    assert app.parse_class_labels(["3, nine"]) == [3, 9]
    assert ("seven (7)", "7") in app.class_choices()
    assert len(app.class_choices()) == 10


def test_gallery_images_are_enlarged_by_a_whole_factor_without_blending(app):
    image = app.generate(["seven"], num_images=1, seed=3).images[0]
    assert image.size == (16, 16)
    large = upscale(image)
    assert large.size == (256, 256) and display_scale(16) == 16
    pixels = np.asarray(large)
    np.testing.assert_array_equal(pixels[::16, ::16], np.asarray(image))
    np.testing.assert_array_equal(pixels[15::16, 15::16], np.asarray(image))


@pytest.mark.parametrize("masking_schedule", ["cosine", "linear"])
def test_step_view_has_one_frame_per_step_revealing_every_token_once(app, masking_schedule):
    steps = 6
    result = app.generate(["four"], num_images=2, num_inference_steps=steps, masking_schedule=masking_schedule, seed=5)
    frames = app.step_frames(result, image_index=1)
    assert len(frames) == steps
    schedule = ENATScheduler.from_config(app.pipeline.scheduler.config, masking_schedule=masking_schedule)
    schedule.set_timesteps(steps)
    seen = torch.zeros(4, 4, dtype=torch.bool)
    for step_index, frame in enumerate(frames):
        # revealed: masked before this step and visible after it; reused: visible before it
        assert not (frame.revealed & seen).any()
        assert torch.equal(frame.reused, seen)
        seen |= frame.revealed
        assert torch.equal(frame.masked, ~seen)
        assert int(frame.masked.sum()) == schedule.num_masked_after_step(step_index, NUM_TOKENS)
        assert frame.caption.startswith(f"step {step_index + 1}/{steps}: {int(frame.revealed.sum())} revealed")
    assert seen.all()


def test_step_frames_frame_revealed_tokens_and_fade_masked_ones(app):
    result = app.generate(["eight"], num_images=1, num_inference_steps=8, seed=2)
    frames = app.step_frames(result)
    cell = 256 // 4
    # The last step's prediction is the final image: a reused token's inside shows its final pixels.
    last = frames[-1]
    final = np.asarray(upscale(result.images[0]))
    row, column = last.reused.nonzero()[0].tolist()
    inside = (slice(row * cell + 8, (row + 1) * cell - 8), slice(column * cell + 8, (column + 1) * cell - 8))
    np.testing.assert_array_equal(np.asarray(last.image)[inside], final[inside])
    # A revealed token is framed in the revealed colour.
    row, column = last.revealed.nonzero()[0].tolist()
    assert np.asarray(last.image)[row * cell, column * cell + cell // 2].tolist() == list(REVEALED_COLOR)
    # A still-masked token after the first step shows the prediction mixed with grey.
    first = frames[0]
    row, column = first.masked.nonzero()[0].tolist()
    prediction = app.pipeline.decode_latents(result.steps[0].prediction[:1])[0]
    predicted_pixel = np.asarray(upscale(prediction), dtype=np.float32)[
        row * cell + cell // 2, column * cell + cell // 2
    ]
    shown = np.asarray(first.image, dtype=np.float32)[row * cell + cell // 2, column * cell + cell // 2]
    expected = (1 - MASKED_FADE) * predicted_pixel + MASKED_FADE * np.array(MASKED_GREY)
    np.testing.assert_allclose(shown, expected, atol=1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"condition": ["sevn"]}, r"Class: unknown class name 'sevn'. Did you mean 'seven'"),
        ({"condition": ["12"]}, r"Class: 12 is not a class id of this model \(0 to 9\)"),
        ({"condition": []}, r"Class: choose at least one class"),
        ({"num_inference_steps": 40}, r"Steps: this model has 16 tokens per image, so choose 1 to 16 steps, got 40"),
        ({"num_inference_steps": 2.5}, r"Steps: enter a whole number"),
        ({"num_images": 9}, r"Images per class: choose 1 to 8"),
        ({"condition": ["1", "2", "3"], "num_images": 6}, r"3 classes x 6 images is more than 16"),
        ({"guidance_scale": 0.5}, r"Guidance scale: choose a number from 1 \(no guidance\)"),
        ({"masking_schedule": "zigzag"}, r"Masking schedule: choose one of cosine, linear, arccos, pow"),
        ({"seed": -3}, r"Seed: choose a whole number from 0"),
    ],
)
def test_bad_requests_are_refused_with_a_sentence_naming_the_input_before_sampling(app, overrides, message):
    request = {
        "condition": ["seven"],
        "num_images": 1,
        "num_inference_steps": 8,
        "guidance_scale": 2.5,
        "masking_schedule": "cosine",
        "seed": 0,
    }
    steps_run = []
    with pytest.raises(AppInputError, match=message):
        app.generate(**{**request, **overrides}, on_step=lambda step, total: steps_run.append(step))
    assert steps_run == []


def test_two_concurrent_requests_give_the_images_each_gives_alone(app):
    # Different seeds, step counts, guidance and schedules: a shared scheduler or shared `_guidance_scale` would mix
    # them up. A barrier makes both requests sample in lockstep for their first steps.
    requests = [
        {"condition": ["seven"], "num_images": 2, "num_inference_steps": 8, "guidance_scale": 3.0, "seed": 1},
        {
            "condition": ["two"],
            "num_images": 2,
            "num_inference_steps": 6,
            "guidance_scale": 1.0,
            "masking_schedule": "linear",
            "seed": 2,
        },
    ]
    expected = [app.generate(**request) for request in requests]
    barrier = threading.Barrier(2, timeout=60)
    results, errors = [None, None], []

    def in_lockstep(step_index: int, num_steps: int) -> None:
        if step_index < 5:
            barrier.wait()

    def run(index: int) -> None:
        try:
            results[index] = app.generate(**requests[index], on_step=in_lockstep)
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for result, reference in zip(results, expected, strict=True):
        assert result.seeds == reference.seeds
        for image, reference_image in zip(result.images, reference.images, strict=True):
            np.testing.assert_array_equal(np.asarray(image), np.asarray(reference_image))
        for record, reference_record in zip(result.steps, reference.steps, strict=True):
            assert torch.equal(record.after, reference_record.after)


def test_page_reports_progress_per_step_shows_errors_as_messages_and_keeps_serving(app, tmp_path):
    gr = pytest.importorskip("gradio", reason="the page handlers need the app extra: pip install -e '.[app]'")
    from enat_diffusers.app import page_handlers

    generate, _ = page_handlers(app, ResultFiles(tmp_path))
    with pytest.raises(gr.Error) as error:
        generate(["sevn"], 1, 8, 2.5, "cosine", 0)
    assert "Class:" in error.value.message and "seven" in error.value.message
    assert "Traceback" not in error.value.message
    with pytest.raises(gr.Error, match="Steps:"):
        generate(["seven"], 1, 99, 2.5, "cosine", 0)

    progress_updates = []
    gallery, step_view, status, result = generate(
        ["seven"], 3, 5, 2.5, "cosine", 0, progress=lambda done, **details: progress_updates.append(done)
    )
    assert progress_updates == [(step, 5) for step in range(1, 6)]
    assert [caption for _, caption in gallery] == ["seven · seed 0", "seven · seed 1", "seven · seed 2"]
    assert all(PIL.Image.open(path).size == (256, 256) for path, _ in gallery)
    assert len(step_view) == 5
    assert status == "3 image(s), 5 steps each."
    assert len(result.images) == 3


def test_text_pipeline_takes_a_prompt():
    text_app = ENATApp(load_demo_pipeline("digits-text"), model_name="demo:digits-text")
    assert text_app.is_text_to_image
    result = text_app.generate("a handwritten seven", num_images=2, num_inference_steps=4, seed=7)
    assert result.captions == ["a handwritten seven · seed 7", "a handwritten seven · seed 8"]
    assert len(text_app.step_frames(result, 1)) == 4
    with pytest.raises(AppInputError, match="Prompt: enter a prompt"):
        text_app.generate("   ", num_images=1)

    # The Edit tab with a prompt: the inpainting pipeline of the text transformer, called with that prompt.
    edited = text_app.edit(result.images[0], bottom_half_mask(), "a handwritten two", num_inference_steps=4, seed=3)
    assert edited.captions == ["a handwritten two · seed 3"]
    _, expected = direct(
        ENATInpaintPipeline,
        text_app,
        [3],
        image=result.images[0],
        mask_image=bottom_half_mask(),
        prompt="a handwritten two",
        num_inference_steps=4,
    )
    assert torch.equal(edited.tokens, expected)
    with pytest.raises(AppInputError, match="Prompt: enter a prompt"):
        text_app.edit(result.images[0], bottom_half_mask(), "", num_inference_steps=4)


def test_the_page_starts_with_a_class_that_draws(app):
    assert app.default_condition == "0"
    assert app.generate([app.default_condition], num_images=1).captions == ["zero · seed 0"]


def test_a_port_in_use_or_a_missing_cuda_device_stops_the_app_with_one_sentence(monkeypatch):
    import socket

    from enat_diffusers.app import check_device, check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"--port {port} is already in use on 127.0.0.1"):
            check_port("127.0.0.1", port)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"--device 'cuda': torch sees no CUDA GPU on this machine"):
        check_device("cuda")
    with pytest.raises(SystemExit, match=r"--device 'gpu' is not a torch device"):
        check_device("gpu")
    assert check_device(None) == "cpu"


def test_the_step_view_gets_predictions_from_the_step_callback_not_the_scheduler(app, monkeypatch):
    # The app reads each step's prediction from the step callback and leaves the scheduler's `step` alone.
    from enat_diffusers.app import PREDICTION_TENSOR

    pipeline_class = type(app.pipeline)
    scheduler_step = type(app.pipeline.scheduler).step
    tensors_asked = []
    call = pipeline_class.__call__

    def recording_call(self, *args, **kwargs):
        tensors_asked.append(kwargs.get("callback_on_step_end_tensor_inputs"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recording_call)
    result = app.generate(["seven"], num_images=1, num_inference_steps=4, seed=1)
    assert tensors_asked == [["latents", PREDICTION_TENSOR]]
    assert "step" not in vars(app.pipeline.scheduler) and type(app.pipeline.scheduler).step is scheduler_step
    assert len(result.steps) == 4 and torch.equal(result.steps[-1].prediction, result.steps[-1].after)


def test_command_line_serves_the_digits_demo_on_this_machine_only_by_default():
    args = parse_args([])
    assert (args.model, args.host) == ("demo:digits", DEFAULT_HOST) and DEFAULT_HOST == "127.0.0.1"
    args = parse_args(["--model", "demo:digits-text", "--host", "0.0.0.0", "--port", "8000"])
    assert (args.model, args.host, args.port) == ("demo:digits-text", "0.0.0.0", 8000)
    with pytest.raises(SystemExit):
        parse_args(["--port", "70000"])


@pytest.mark.parametrize("model", ["demo:nope", "empty folder"])
def test_a_model_that_cannot_be_loaded_stops_the_app_with_one_sentence(model, tmp_path):
    model = str(tmp_path) if model == "empty folder" else model
    with pytest.raises(SystemExit, match=rf"--model '{re.escape(model)}' could not be loaded as a pipeline: "):
        load_pipeline(model)


def test_a_pipeline_with_diffusers_amused_scheduler_works_with_one_seed_per_request():
    pipeline = load_demo_pipeline("digits")
    pipeline.scheduler = AmusedScheduler.from_config(pipeline.scheduler.config)
    amused_app = ENATApp(pipeline)
    assert amused_app.masking_schedules == ("cosine", "linear") and not amused_app.per_image_seeds
    result = amused_app.generate(["seven"], num_images=2, num_inference_steps=5, masking_schedule="linear", seed=4)
    assert result.captions == ["seven · seed 4 #1", "seven · seed 4 #2"]
    again = amused_app.generate(["seven"], num_images=2, num_inference_steps=5, masking_schedule="linear", seed=4)
    for image, same in zip(result.images, again.images, strict=True):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(same))
    frames = amused_app.step_frames(result, 1)
    assert len(frames) == 5 and not frames[-1].masked.any()
    with pytest.raises(AppInputError, match="Masking schedule: choose one of cosine, linear, got 'arccos'"):
        amused_app.generate(["seven"], masking_schedule="arccos")


# ----------------------------------------------------------------------------------------------------------------------
# the Edit tab


@pytest.fixture(scope="module")
def digit(app):
    """A 16x16 seven drawn by the demo, the image the edit tests start from."""
    return app.generate(["seven"], num_images=1, seed=0).images[0]


def bottom_half_mask() -> PIL.Image.Image:
    mask = PIL.Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 8, 16, 16))
    return mask


def direct(pipeline_class, app, seeds, **call):
    """The editing pipeline called directly on the app's modules: token ids for one generator per seed."""
    pipeline = pipeline_class.from_pipe(app.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline, pipeline(**call, generator=generator, output_type="latent").images


def test_inpaint_edit_of_the_enlarged_sample_is_the_pipelines_inpainting_and_keeps_tokens_outside_the_mask(app, digit):
    # What the page sends: the sample enlarged for painting, its bottom half painted as a brush layer.
    editor_value = sample_editor_value(digit)
    assert editor_value["background"].size == (256, 256)
    shared_pipeline, shared_scheduler = type(app.pipeline), app.pipeline.scheduler
    steps_seen = []
    result = app.edit(
        editor_value["background"],
        editor_mask(editor_value),
        "two",
        "inpaint",
        num_images=2,
        num_inference_steps=6,
        guidance_scale=2.0,
        seed=5,
        on_step=lambda step, total: steps_seen.append((step, total)),
    )
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(digit.convert("RGB")))
    np.testing.assert_array_equal(np.asarray(result.mask), np.asarray(bottom_half_mask()))
    assert result.seeds == [5, 6] and result.captions == ["two · seed 5", "two · seed 6"]
    assert steps_seen and all(total == 6 for _, total in steps_seen)

    pipeline, expected = direct(
        ENATInpaintPipeline,
        app,
        [5, 6],
        image=digit,
        mask_image=bottom_half_mask(),
        class_labels=[2],
        num_images_per_prompt=2,
        num_inference_steps=6,
        guidance_scale=2.0,
    )
    assert torch.equal(result.tokens, expected)
    for image, tokens in zip(result.images, expected, strict=True):
        decoded = pipeline.decode_latents(tokens[None], output_type="np")[0]
        np.testing.assert_allclose(np.asarray(image, dtype=np.float32) / 255, decoded, atol=1 / 255)
    # The top two token rows are outside the mask: exactly the input's tokens; the bottom rows were regenerated.
    input_tokens = pipeline.encode_image(pipeline.preprocess_image(digit))
    assert torch.equal(result.tokens[:, :2], input_tokens.expand(2, -1, -1)[:, :2])
    assert not torch.equal(result.tokens[:, 2:], input_tokens.expand(2, -1, -1)[:, 2:])
    # The request ran on its own copy: the app's pipeline is still the generation pipeline with its scheduler.
    assert type(app.pipeline) is shared_pipeline and app.pipeline.scheduler is shared_scheduler


def test_outpaint_edit_centres_the_shrunken_image_and_draws_the_rest(app, digit):
    result = app.edit(digit, None, "seven", "outpaint", num_images=1, num_inference_steps=8, seed=2)
    pipeline = ENATInpaintPipeline.from_pipe(app.pipeline)
    canvas, canvas_mask = pipeline.outpainting_inputs(digit.resize((8, 8), PIL.Image.Resampling.BOX))
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(canvas))
    np.testing.assert_array_equal(np.asarray(result.mask), np.asarray(canvas_mask))
    _, expected = direct(
        ENATInpaintPipeline, app, [2], image=canvas, mask_image=canvas_mask, class_labels=[7], num_inference_steps=8
    )
    assert torch.equal(result.tokens, expected)
    canvas_tokens = pipeline.encode_image(pipeline.preprocess_image(canvas))
    assert torch.equal(result.tokens[:, 1:3, 1:3], canvas_tokens[:, 1:3, 1:3])


def test_image_to_image_edit_is_the_pipelines_result_for_the_strength(app, digit):
    result = app.edit(digit, None, "3", "image-to-image", strength=0.5, num_images=2, num_inference_steps=8, seed=3)
    assert result.mask is None
    _, expected = direct(
        ENATImg2ImgPipeline,
        app,
        [3, 4],
        image=digit,
        strength=0.5,
        class_labels=[3],
        num_images_per_prompt=2,
        num_inference_steps=8,
    )
    assert torch.equal(result.tokens, expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": "text file"}, r"Image: 'notes.png' is not an image file"),
        ({"image": "empty file"}, r"Image: 'empty.png' is empty \(0 bytes\), not an image"),
        ({"image": "truncated file"}, r"Image: 'cut.png' could not be decoded \(.*\); it is damaged or not an image"),
        ({"image": "huge file"}, r"Image: 'huge.png' is 13000x13000 pixels; images up to 16,777,216 pixels"),
        (
            {"image": np.full((16, 16, 3), np.nan, dtype=np.float32)},
            r"Image: the image has NaN or infinite pixel values",
        ),
        (
            {"image": PIL.Image.new("RGB", (16, 20))},
            r"Image: this model edits square images of 16x16 pixels .* got 16x20",
        ),
        ({"image": None}, r"Image: upload an image to edit"),
        ({"mask": PIL.Image.new("L", (16, 16), 0)}, r"Mask: nothing is painted"),
        ({"mask": None}, r"Mask: paint the region to regenerate"),
        ({"condition": "sevn"}, r"Class: unknown class name 'sevn'. Did you mean 'seven'"),
        ({"condition": ["1", "2"]}, r"Class: choose one class to edit with"),
        (
            {"mode": "image-to-image", "strength": 0.1},
            r"Strength: `strength` 0.1 runs no step of `num_inference_steps` 8 .*at least 1/8",
        ),
        ({"mode": "image-to-image", "strength": 1.5}, r"Strength: `strength` must be a number in \(0, 1\], got 1.5"),
        ({"mode": "recolour"}, r"Mode: choose one of inpaint, outpaint, image-to-image"),
        ({"num_inference_steps": 99}, r"Steps: this model has 16 tokens per image"),
    ],
)
def test_bad_edit_requests_are_refused_with_a_sentence_naming_the_input_before_sampling(
    app, digit, tmp_path, overrides, message
):
    if isinstance(overrides.get("image"), str):
        overrides = {**overrides, "image": str(bad_image_file(tmp_path, overrides["image"]))}
    request = {
        "image": digit,
        "mask": bottom_half_mask(),
        "condition": "seven",
        "mode": "inpaint",
        "num_inference_steps": 8,
        "seed": 0,
    }
    steps_run = []
    with pytest.raises(AppInputError, match=message):
        app.edit(**{**request, **overrides}, on_step=lambda step, total: steps_run.append(step))
    assert steps_run == []


def bad_image_file(folder, kind: str):
    """Upload files that fail: text, empty, cut off after its header, and a 13000x13000 PNG of a few kilobytes."""
    if kind == "text file":
        path = folder / "notes.png"
        path.write_text("not a picture")
    elif kind == "empty file":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif kind == "truncated file":
        path = folder / "cut.png"
        PIL.Image.effect_noise((64, 64), 50).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path = folder / "huge.png"
        PIL.Image.new("1", (13000, 13000)).save(path)  # 1-bit: small file, 169 million pixels decoded
    return path


def test_sixteen_bit_and_float_images_are_scaled_by_their_range_not_clipped(app, tmp_path):
    grey = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "sixteen.png"
    PIL.Image.fromarray(grey * 257).save(path)  # a 16-bit greyscale PNG
    with PIL.Image.open(path) as opened:
        assert opened.mode.startswith("I")  # what a plain convert("RGB") clips to white
    image = app.prepare_edit_image(str(path))
    np.testing.assert_array_equal(np.asarray(image)[..., 0], grey)
    floats = PIL.Image.fromarray(grey.astype(np.float32) / 255, mode="F")
    np.testing.assert_array_equal(np.asarray(app.prepare_edit_image(floats))[..., 0], grey)


def test_a_mask_painted_only_in_alpha_regenerates_the_painted_part_only(app):
    mask = PIL.Image.new("RGBA", (16, 16), (255, 255, 255, 0))  # white everywhere, painted nowhere
    mask.paste((255, 255, 255, 255), (0, 8, 16, 16))
    np.testing.assert_array_equal(np.asarray(app.prepare_edit_mask(mask)), np.asarray(bottom_half_mask()))
    opaque = bottom_half_mask().convert("RGBA")  # an opaque black-and-white mask: its grey level counts
    np.testing.assert_array_equal(np.asarray(app.prepare_edit_mask(opaque)), np.asarray(bottom_half_mask()))


def test_edit_page_shows_errors_as_messages_and_keeps_serving(app, tmp_path):
    gr = pytest.importorskip("gradio", reason="the page handlers need the app extra: pip install -e '.[app]'")

    edit, draw_sample = edit_page_handlers(app, ResultFiles(tmp_path))
    with pytest.raises(gr.Error) as error:
        edit(None, "seven", "inpaint", 0.5, 1, 8, 2.5, 0)
    assert error.value.message.startswith("Image: upload an image") and "Traceback" not in error.value.message
    sample, sample_status = draw_sample("seven", 0)
    assert sample_status.startswith("Sample drawn (seven · seed 0)")
    blank = {**sample, "layers": []}
    with pytest.raises(gr.Error, match="Mask: paint the region"):
        edit(blank, "seven", "inpaint", 0.5, 1, 8, 2.5, 0)

    progress_updates = []
    inputs, gallery, status = edit(
        sample, "two", "inpaint", 0.5, 2, 8, 2.5, 0, progress=lambda done, **details: progress_updates.append(done)
    )
    assert [caption for _, caption in inputs] == ["input", "mask (white: regenerated)"]
    assert [caption for _, caption in gallery] == ["two · seed 0", "two · seed 1"]
    assert all(PIL.Image.open(path).size == (256, 256) for path, _ in inputs + gallery)
    assert progress_updates and progress_updates[-1] == (8, 8)
    assert status == "inpaint: 2 image(s)."
