"""ENATInpaintPipeline: the token mask, kept tokens, the region's schedule, strength, padding_mask_crop, shared first
step, ragged batches, outpainting, paste-back, bad input, AutoPipelines, and the digits demo."""

import functools

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler, AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

from enat_diffusers import (
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    ENATText2ImagePipeline,
    outpainting_canvas,
)
from enat_diffusers.pipelines import pipeline_enat_editing
from enat_diffusers.pipelines.pipeline_enat_inpaint import mask_crop_box
from enat_diffusers.sampling import ENATEditState

from .example_scripts import load_example
from .tiny_components import CODEBOOK_SIZE as MASK
from .tiny_components import GRID, StartRecorder, TransformerCalls, tiny_pipeline, tiny_text_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE = 8  # pixels: the tiny VQ downsamples by 2
COMMON = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "latent"}


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def bottom_half(count: int = 1) -> torch.Tensor:
    mask = torch.zeros(count, SIDE, SIDE)
    mask[:, SIDE // 2 :] = 1
    return mask


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.fixture
def pipe():
    return ENATInpaintPipeline.from_pipe(tiny_pipeline())


@pytest.fixture
def text_pipe(tmp_path):
    pipe = ENATInpaintPipeline.from_pipe(tiny_text_pipeline(tmp_path / "clip"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(pipe, count: int) -> dict:
    if pipe.is_class_conditional:
        return {"class_labels": list(range(count))}
    return {"prompt": ["abc", "de", "fgh", "ij"][:count]}


def encoded(pipe, pixels: torch.Tensor) -> torch.LongTensor:
    return pipe.vqvae.encode(pixels * 2 - 1).token_ids


# ---------------------------------------------------------------------------------------------------------------------
# The region


def test_a_token_is_regenerated_when_more_than_the_threshold_of_its_pixels_is_masked(pipe):
    mask = torch.zeros(1, SIDE, SIDE)
    mask[0, 0, 0] = 1  # one pixel of token (0, 0)
    mask[0, 2:4, 2:4] = 1  # all four pixels of token (1, 1)
    mask[0, 4, 4:6] = 1  # half of token (2, 2)
    _, any_pixel = pipe.prepare_token_mask(mask, 0.0)
    _, over_half = pipe.prepare_token_mask(mask, 0.5)
    _, over_quarter = pipe.prepare_token_mask(mask, 0.25)
    assert any_pixel[0].nonzero().tolist() == [[0, 0], [1, 1], [2, 2]]
    assert over_quarter[0].nonzero().tolist() == [[1, 1], [2, 2]]
    assert over_half[0].nonzero().tolist() == [[1, 1]]


def test_mask_formats_give_the_same_token_mask(pipe):
    tensor = bottom_half()
    pil = PIL.Image.fromarray((tensor[0].numpy() * 255).astype(np.uint8), mode="L")
    expected = pipe.prepare_token_mask(tensor)[1]
    for mask in (pil, tensor[0].numpy(), tensor[0].bool(), tensor[:, None], [pil], tensor[0].numpy() > 0.5):
        assert torch.equal(pipe.prepare_token_mask(mask)[1], expected)
    assert expected[0, GRID // 2 :].all() and not expected[0, : GRID // 2].any()


@pytest.mark.parametrize("kind", ["class", "text"])
def test_tokens_outside_the_mask_are_the_input_tokens_and_the_region_is_generated(kind, pipe, text_pipe):
    pipe = pipe if kind == "class" else text_pipe
    pixels = images(2)
    out = pipe(image=pixels, mask_image=bottom_half(), **condition(pipe, 2), generator=torch.manual_seed(0), **COMMON)
    tokens = encoded(pipe, pixels)
    assert torch.equal(out.images[:, : GRID // 2], tokens[:, : GRID // 2])
    assert not (out.images == MASK).any()
    assert not torch.equal(out.images[:, GRID // 2 :], tokens[:, GRID // 2 :])


def test_the_masking_schedule_runs_over_the_region_without_idle_steps(pipe):
    mask = torch.zeros(3, SIDE, SIDE)
    mask[0, :2] = 1  # 4 tokens
    mask[1, :6] = 1  # 12 tokens
    mask[2] = 1  # 16 tokens
    counts = []

    def record(_pipe, _step, _timestep, callback_kwargs):
        counts.append((callback_kwargs["latents"] == MASK).flatten(1).sum(1).tolist())
        return {}

    pipe(image=images(3), mask_image=mask, class_labels=[0, 1, 2], callback_on_step_end=record, **COMMON)
    scheduler = pipe.scheduler
    assert counts == [[scheduler.num_masked_after_step(k, n) for n in (4, 12, 16)] for k in range(4)]
    assert all(0 < count < start for count, start in zip(counts[0], (4, 12, 16), strict=True))


@pytest.mark.parametrize("strength", [{}, {"strength": 1.0}], ids=["default", "strength_1"])
@pytest.mark.parametrize("kind", ["class", "text"])
def test_an_all_white_mask_is_generation(kind, strength, tmp_path):
    generation = tiny_pipeline() if kind == "class" else tiny_text_pipeline(tmp_path / "clip")
    pipe = ENATInpaintPipeline.from_pipe(generation)
    inputs = condition(pipe, 2)
    seeds = generators(range(4))
    inpainted = pipe(image=images(2), mask_image=torch.ones(SIDE, SIDE), **inputs, num_images_per_prompt=2,
                     generator=seeds, **strength, **COMMON).images  # fmt: skip
    generated = generation(**inputs, num_images_per_prompt=2, generator=generators(range(4)), **COMMON).images
    assert torch.equal(inpainted, generated)


def test_an_all_black_mask_returns_the_input_without_running_the_transformer(pipe):
    calls = TransformerCalls(pipe.transformer)
    pixels = images(2)
    tokens = pipe(image=pixels, mask_image=torch.zeros(SIDE, SIDE), class_labels=[0, 1], **COMMON).images
    assert calls.calls == []
    assert torch.equal(tokens, encoded(pipe, pixels))
    pasted = pipe(image=pixels, mask_image=torch.zeros(SIDE, SIDE), class_labels=[0, 1], paste_back=True,
                  output_type="np").images  # fmt: skip
    assert np.abs(pasted - pixels.permute(0, 2, 3, 1).numpy()).max() <= 1 / 255 + 1e-6


def test_paste_back_keeps_the_original_pixels_outside_the_mask(pipe):
    pixels = images(1)
    mask = bottom_half()
    kwargs = {"image": pixels, "mask_image": mask, "class_labels": [2], "num_inference_steps": 4}
    plain = pipe(**kwargs, generator=torch.manual_seed(0), output_type="np").images
    pasted = pipe(**kwargs, generator=torch.manual_seed(0), output_type="np", paste_back=True).images
    original = pixels.permute(0, 2, 3, 1).numpy()
    top, bottom = slice(0, SIDE // 2), slice(SIDE // 2, SIDE)
    assert np.abs(pasted[:, top] - original[:, top]).max() <= 1 / 255 + 1e-6
    assert np.abs(plain[:, top] - original[:, top]).max() > 0.05  # the VQ reconstruction differs
    assert np.abs(pasted[:, bottom] - plain[:, bottom]).max() <= 1 / 255 + 1e-6
    as_pil = pipe(**kwargs, generator=torch.manual_seed(0), paste_back=True).images[0]
    assert np.array_equal(np.asarray(as_pil), np.round(pasted[0] * 255).astype(np.uint8))


def test_interrupting_returns_the_prediction_with_the_kept_tokens(pipe):
    steps = []

    def stop(pipeline, step_index, _timestep, _callback_kwargs):
        steps.append(step_index)
        pipeline._interrupt = True
        return {}

    pixels = images(2)
    out = pipe(image=pixels, mask_image=bottom_half(), class_labels=[0, 1], callback_on_step_end=stop, **COMMON).images
    assert steps == [0]
    assert not (out == MASK).any()
    assert torch.equal(out[:, : GRID // 2], encoded(pipe, pixels)[:, : GRID // 2])


def test_class_conditional_editing_redraws_the_region_as_the_given_class(pipe):
    pixels = images(1)
    results = [
        pipe(image=pixels, mask_image=bottom_half(), class_labels=[label], generator=torch.manual_seed(0), **COMMON)
        .images for label in range(3)
    ]  # fmt: skip
    for result in results:
        assert torch.equal(result[:, : GRID // 2], results[0][:, : GRID // 2])
    assert len({tuple(result[:, GRID // 2 :].flatten().tolist()) for result in results}) == 3


def test_outpainting_keeps_the_image_tokens_and_fills_the_canvas(pipe):
    small = PIL.Image.fromarray((images(1)[0, :, :4, :4].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    canvas, mask = pipe.outpainting_inputs(small)
    assert canvas.size == mask.size == (SIDE, SIDE)
    mask_array = np.asarray(mask)
    assert (mask_array[2:6, 2:6] == 0).all() and mask_array.sum() == 255 * (SIDE * SIDE - 16)
    out = pipe(image=canvas, mask_image=mask, class_labels=[1], generator=torch.manual_seed(0), **COMMON).images
    canvas_tokens = encoded(pipe, torch.from_numpy(np.asarray(canvas) / 255.0).float().permute(2, 0, 1)[None])
    assert torch.equal(out[:, 1:3, 1:3], canvas_tokens[:, 1:3, 1:3])
    assert not (out == MASK).any()
    with pytest.raises(ValueError, match="larger than the canvas"):
        outpainting_canvas(PIL.Image.new("RGB", (9, 9)), SIDE)
    _, unaligned = outpainting_canvas(small, SIDE, offset=(1, 3))
    assert (np.asarray(unaligned)[1:5, 3:7] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# strength


def test_strength_one_masks_the_whole_region_and_runs_every_step(pipe):
    recorder = StartRecorder(pipe)
    inputs = {"image": images(2), "mask_image": bottom_half(), "class_labels": [0, 1], "num_images_per_prompt": 2}
    explicit = pipe(**inputs, strength=1.0, generator=generators(range(4)), callback_on_step_end=recorder.callback,
                    **COMMON).images  # fmt: skip
    default = pipe(**inputs, generator=generators(range(4)), **COMMON).images
    assert torch.equal(explicit, default)
    assert recorder.steps == [0, 1, 2, 3]
    assert recorder.first_input.shape[0] == 2 * 2  # the samples of one image still share the first step
    start = recorder.first_input.flatten(1)
    assert (start[:, GRID * GRID // 2 :] == MASK).all() and not (start[:, : GRID * GRID // 2] == MASK).any()


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_strength_below_one_starts_from_the_input_tokens_on_the_regions_schedule(pipe, strength):
    recorder = StartRecorder(pipe)
    pixels = images(2)
    out = pipe(image=pixels, mask_image=bottom_half(), class_labels=[0, 1], strength=strength,
               generator=generators([0, 1]), callback_on_step_end=recorder.callback, **COMMON).images  # fmt: skip
    steps = COMMON["num_inference_steps"]
    start, region_size = steps - int(steps * strength), GRID * GRID // 2
    scheduler, tokens = pipe.scheduler, encoded(pipe, pixels)
    assert recorder.steps == list(range(start, steps))
    first = recorder.first_input[:2]  # conditional stream
    masked_at_start = scheduler.num_masked_after_step(start - 1, region_size)
    assert 0 < masked_at_start < region_size
    assert (first == MASK).flatten(1).sum(1).tolist() == [masked_at_start] * 2
    assert not (first[:, : GRID // 2] == MASK).any()  # only the region is masked
    assert recorder.counts == [[scheduler.num_masked_after_step(k, region_size)] * 2 for k in range(start, steps)]
    visible = first != MASK
    assert torch.equal(first[visible], tokens[visible])
    assert torch.equal(out[visible], tokens[visible])  # outside the mask and the region's unmasked tokens
    assert not (out == MASK).any()


def test_a_lower_strength_keeps_more_of_the_regions_input_tokens_and_nothing_outside_changes(pipe):
    pixels = images(2)
    tokens = encoded(pipe, pixels).repeat_interleave(4, dim=0)
    kept = {}
    for strength in (1.0, 0.5):
        out = pipe(image=pixels, mask_image=bottom_half(), class_labels=[0, 1], strength=strength,
                   num_images_per_prompt=4, generator=generators(range(8)), **COMMON).images  # fmt: skip
        assert torch.equal(out[:, : GRID // 2], tokens[:, : GRID // 2])
        kept[strength] = int((out[:, GRID // 2 :] == tokens[:, GRID // 2 :]).sum())
    unmasked_at_start = GRID * GRID // 2 - pipe.scheduler.num_masked_after_step(1, GRID * GRID // 2)
    assert kept[0.5] >= 8 * unmasked_at_start > kept[1.0]


def test_strength_below_one_needs_a_scheduler_with_a_region_schedule(pipe):
    pipe.scheduler = AmusedScheduler.from_config(pipe.scheduler.config)
    calls = TransformerCalls(pipe.transformer)
    with pytest.raises(ValueError, match="`strength` below 1 needs a scheduler .* AmusedScheduler does not"):
        pipe(image=images(1), mask_image=bottom_half(), class_labels=[0], strength=0.5, **COMMON)
    assert calls.calls == []


# ---------------------------------------------------------------------------------------------------------------------
# padding_mask_crop


def test_mask_crop_box_is_the_masks_square_with_its_margin_inside_the_image():
    mask = torch.zeros(20, 30)
    mask[5:8, 10:16] = 1  # 3 x 6 pixels
    assert mask_crop_box(mask, 0) == (4, 10, 10, 16)  # grown to 6 x 6 about its centre
    assert mask_crop_box(mask, 2) == (2, 8, 12, 18)  # 7 x 10 with the margin, then 10 x 10
    corner = torch.zeros(20, 30)
    corner[0:2, 27:30] = 1
    assert mask_crop_box(corner[None], 3) == (0, 24, 6, 30)  # moved inside the image, not clipped
    tall = torch.zeros(20, 30)
    tall[:, 0] = 1
    assert mask_crop_box(tall, 0) == (0, 0, 20, 20)
    wide = torch.zeros(20, 30)
    wide[0] = 1
    assert mask_crop_box(wide, 0) == (0, 0, 20, 30)  # no square fits: all of both sides
    assert mask_crop_box(torch.zeros(20, 30), 4) == (0, 0, 20, 30)


def test_padding_mask_crop_edits_the_crop_and_pastes_it_into_the_image_inside_the_mask(pipe):
    big = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(24, 20)
    mask[6:10, 12:16] = 1
    top, left, bottom, right = mask_crop_box(mask, 1)
    assert (top, left, bottom, right) == (5, 11, 11, 17)
    kwargs = {"class_labels": [1], "num_inference_steps": 4, "guidance_scale": 3.0}
    out = pipe(image=big, mask_image=mask, padding_mask_crop=1, generator=torch.manual_seed(0), output_type="np",
               **kwargs).images  # fmt: skip
    assert out.shape == (1, 24, 20, 3)
    original, inside = big[0].permute(1, 2, 0).numpy(), mask.bool().numpy()
    assert np.array_equal(out[0][~inside], original[~inside])  # outside the crop and, inside it, outside the mask
    assert np.abs(out[0][inside] - original[inside]).max() > 0.05
    # Inside the mask: the crop edited alone at the model's resolution, resized back to the crop.
    crop_mask = mask[top:bottom, left:right]
    alone = pipe(image=big[:, :, top:bottom, left:right], mask_image=crop_mask, generator=torch.manual_seed(0),
                 output_type="pt", **kwargs).images  # fmt: skip
    assert alone.shape[-1] == SIDE
    back = F.interpolate(alone, size=(bottom - top, right - left), mode="bicubic", antialias=True, align_corners=False)
    back = back.clamp(0, 1)[0].permute(1, 2, 0).numpy()
    crop_inside = crop_mask.bool().numpy()
    assert np.allclose(out[0, top:bottom, left:right][crop_inside], back[crop_inside], atol=1e-6)
    as_pt = pipe(image=big, mask_image=mask, padding_mask_crop=1, generator=torch.manual_seed(0), output_type="pt",
                 **kwargs).images  # fmt: skip
    assert torch.allclose(as_pt[0].permute(1, 2, 0), torch.from_numpy(out[0]))


def test_padding_mask_crop_returns_pil_images_of_the_input_sizes(pipe):
    sizes = [(20, 24), (13, 9)]  # PIL's (width, height)
    inputs, masks = [], []
    for index, (width, height) in enumerate(sizes):
        pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
        inputs.append(PIL.Image.fromarray(pixels))
        mask = PIL.Image.new("L", (width, height), 0)
        mask.paste(255, (2, 3, 6, 5))
        masks.append(mask)
    out = pipe(image=inputs, mask_image=masks, class_labels=[0, 1], padding_mask_crop=2, num_inference_steps=4,
               generator=generators([0, 1])).images  # fmt: skip
    for result, original, mask in zip(out, inputs, masks, strict=True):
        assert result.size == original.size
        outside = np.asarray(mask) == 0
        assert np.array_equal(np.asarray(result)[outside], np.asarray(original)[outside])
        assert not np.array_equal(np.asarray(result)[~outside], np.asarray(original)[~outside])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mask_image": torch.ones(8, 8)}, "each mask must have its image's size .* image 0 is 12x10, its mask 8x8"),
        ({"image": [torch.rand(3, 12, 10), torch.rand(3, 10, 12)], "mask_image": [torch.ones(12, 10), torch.ones(10, 12)],
          "class_labels": [0, 1]}, "only `output_type='pil'` returns images of several sizes"),
    ],
)  # fmt: skip
def test_padding_mask_crop_is_refused_where_it_cannot_apply(pipe, arguments, message):
    calls = TransformerCalls(pipe.transformer)
    call = {"image": torch.rand(3, 12, 10), "mask_image": torch.ones(12, 10), "class_labels": [0], **arguments}
    with pytest.raises(ValueError, match=message):
        pipe(**call, padding_mask_crop=2, num_inference_steps=4, output_type="np")
    assert calls.calls == []


# ---------------------------------------------------------------------------------------------------------------------
# Shared first step, ragged batches, conditions


@pytest.mark.parametrize("kind", ["class", "text"])
def test_samples_of_one_image_share_the_first_step_and_equal_the_unshared_run(kind, pipe, text_pipe, monkeypatch):
    pipe = pipe if kind == "class" else text_pipe
    inputs = {"image": images(2), "mask_image": bottom_half(), **condition(pipe, 2), "num_images_per_prompt": 3}
    calls = TransformerCalls(pipe.transformer)
    shared = pipe(**inputs, generator=generators(range(6)), **COMMON).images
    calls.remove()
    assert calls.calls[0] == (2 * 2, False)  # 2 images x 2 guidance streams at the first step
    assert all(rows == 6 * 2 for rows, _ in calls.calls[1:])

    # Unshared: every row runs its own first step and gets its own kept context.
    monkeypatch.setattr(
        pipeline_enat_editing, "ENATEditState", functools.partial(ENATEditState, share_first_step=False)
    )
    unshared = pipe(**inputs, generator=generators(range(6)), **COMMON).images
    assert torch.equal(shared, unshared)
    assert len({tuple(row.flatten().tolist()) for row in shared[:3]}) > 1  # samples still differ


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["class", "text"])
def test_a_row_of_a_ragged_batch_equals_the_row_alone(kind, strength, pipe, text_pipe):
    pipe = pipe if kind == "class" else text_pipe
    masks = torch.zeros(3, SIDE, SIDE)
    masks[0, :2] = 1
    masks[1, :, :3] = 1
    masks[2, 3:, 1:] = 1
    pixels, inputs = images(3), condition(pipe, 3)
    batch = pipe(image=pixels, mask_image=masks, **inputs, strength=strength, generator=generators([5, 6, 7]),
                 **COMMON).images  # fmt: skip
    for row in range(3):
        alone = {name: value[row : row + 1] for name, value in inputs.items()}
        single = pipe(image=pixels[row : row + 1], mask_image=masks[row], **alone, strength=strength,
                      generator=generators([5 + row]), **COMMON).images  # fmt: skip
        assert torch.equal(batch[row : row + 1], single), f"row {row}"


def test_one_image_for_several_classes_and_one_class_for_several_images(pipe):
    pixels = images(2)
    one_image = pipe(
        image=pixels[:1],
        mask_image=bottom_half(),
        class_labels=[0, "goldfish"],
        generator=generators([1, 2]),
        **COMMON,
    ).images
    assert torch.equal(one_image[:, :2], encoded(pipe, pixels[:1]).expand(2, -1, -1)[:, :2])
    one_class = pipe(
        image=pixels, mask_image=bottom_half(), class_labels="goldfish", generator=generators([1, 2]), **COMMON
    ).images
    second = pipe(
        image=pixels[1:], mask_image=bottom_half(), class_labels=1, generator=generators([2]), **COMMON
    ).images
    assert torch.equal(one_class[1:], second)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any model runs


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"mask_image": torch.ones(2, SIDE, SIDE)}, ValueError, "2 masks for 3 images"),
        ({"class_labels": [0, 1]}, ValueError, "2 `class_labels` for 3 images"),
        ({"mask_image": torch.full((SIDE, SIDE), float("nan"))}, ValueError, "`mask_image` holds NaN"),
        (
            {"image": torch.rand(3, 3, SIDE, SIDE) * 255},
            ValueError,
            r"`image` must hold values in \[0, 1\].*divide by 255",
        ),
        ({"image": torch.full((3, 3, SIDE, SIDE), float("nan"))}, ValueError, "`image` holds NaN"),
        ({"height": 2 * SIDE}, ValueError, "`height` must be 8"),
        ({"image": "cat.png"}, TypeError, "`image` must be a PIL image, a float numpy array"),
        ({"image": np.zeros((SIDE, SIDE, 3), dtype=np.uint8)}, TypeError, "floats in \\[0, 1\\]"),
        ({"image": None}, ValueError, "`image` is required"),
        ({"mask_image": None}, ValueError, "`mask_image` is required"),
        ({"mask_image": [object()]}, TypeError, "`mask_image` must be"),
        ({"mask_threshold": 1.0}, ValueError, r"`mask_threshold` must be a number in \[0, 1\)"),
        ({"generator": generators(range(2))}, ValueError, "one generator per image"),
        ({"prompt": "a cat"}, ValueError, "class-conditional"),
        ({"strength": 0.2}, ValueError, r"`strength` 0.2 runs no step of `num_inference_steps` 4 .*at least 1/4"),
        ({"strength": 0}, ValueError, r"`strength` must be a number in \(0, 1\]"),
        ({"strength": 1.5}, ValueError, r"`strength` must be a number in \(0, 1\]"),
        ({"strength": float("nan")}, ValueError, r"`strength` must be a number in \(0, 1\]"),
        ({"padding_mask_crop": -1}, ValueError, "`padding_mask_crop` must be an integer >= 0"),
        ({"padding_mask_crop": 2.5}, ValueError, "`padding_mask_crop` must be an integer >= 0"),
        ({"padding_mask_crop": 2}, ValueError, "`padding_mask_crop` returns the input images .* 'pil', 'np' or 'pt'"),
    ],
)
def test_bad_input_is_refused_before_any_model_runs(pipe, monkeypatch, arguments, error, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(pipe.vqvae, "encode", no_model)
    calls = TransformerCalls(pipe.transformer)
    call = {"image": images(3), "mask_image": bottom_half(), "class_labels": [0, 1, 2], **arguments}
    with pytest.raises(error, match=message):
        pipe(**call, **COMMON)
    assert calls.calls == []


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines around it


def test_from_pipe_shares_the_components_and_the_defaults():
    generation = tiny_pipeline(default_num_inference_steps=5, default_guidance_scale=2.0)
    inpaint = ENATInpaintPipeline.from_pipe(generation)
    assert inpaint.transformer is generation.transformer and inpaint.vqvae is generation.vqvae
    assert inpaint.config.default_num_inference_steps == 5 and inpaint.config.default_guidance_scale == 2.0
    assert inpaint.get_label_ids("goldfish") == [1]
    back = ENATPipeline.from_pipe(inpaint)
    assert back.transformer is generation.transformer and back.labels == generation.labels


def test_auto_pipelines_map_between_generation_and_editing(tmp_path):
    generation = tiny_pipeline()
    inpaint = AutoPipelineForInpainting.from_pipe(generation)
    img2img = AutoPipelineForImage2Image.from_pipe(inpaint)
    assert type(inpaint) is ENATInpaintPipeline and type(img2img) is ENATImg2ImgPipeline
    assert type(AutoPipelineForInpainting.from_pipe(img2img)) is ENATInpaintPipeline
    assert img2img.transformer is generation.transformer
    generation.save_pretrained(tmp_path / "class")
    assert type(AutoPipelineForInpainting.from_pretrained(tmp_path / "class")) is ENATInpaintPipeline
    assert type(AutoPipelineForImage2Image.from_pretrained(tmp_path / "class")) is ENATImg2ImgPipeline
    assert type(AutoPipelineForText2Image.from_pretrained(tmp_path / "class")) is ENATPipeline
    text = tiny_text_pipeline(tmp_path / "clip")
    text_inpaint = AutoPipelineForInpainting.from_pipe(text)
    assert type(text_inpaint) is ENATInpaintPipeline and text_inpaint.text_encoder is text.text_encoder
    back = AutoPipelineForText2Image.from_pipe(AutoPipelineForImage2Image.from_pipe(text_inpaint))
    assert type(back) is ENATText2ImagePipeline and back.text_encoder is text.text_encoder


def test_saved_editing_pipelines_load_back_with_their_class(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "inpaint")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "inpaint")
    assert type(loaded) is ENATInpaintPipeline and loaded.text_encoder is None
    assert loaded.labels == pipe.labels


# ---------------------------------------------------------------------------------------------------------------------
# The digits demo


@pytest.fixture(scope="module")
def edit_script():
    pytest.importorskip("sklearn", reason="the demo checks classify digits with scikit-learn")
    return load_example("edit")


def test_digits_demo_completes_real_digits_with_their_class(edit_script):
    report = edit_script.inpainting_demo(num_images=100, seed=0)
    assert report["unchanged_outside_mask"] == 1.0
    assert report["accuracy"] >= 0.95, report


def test_edit_script_inpaints_outpaints_and_varies_image_files(edit_script, tmp_path):
    digit = PIL.Image.fromarray((images(1, seed=3)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    digit.resize((16, 16)).save(tmp_path / "digit.png")
    digit.save(tmp_path / "small.png")  # 8x8: outpainted to 16x16
    PIL.Image.fromarray(np.repeat(np.array([0, 255], dtype=np.uint8), 8)[:, None].repeat(16, 1)).save(
        tmp_path / "m.png"
    )
    common = ["--class_labels", "seven", "--num_images_per_prompt", "2", "--upscale", "1"]
    runs = {
        "inpaint": ["--mask_image", str(tmp_path / "m.png")],
        "img2img": ["--strength", "0.5", "--masking_schedule", "linear"],
    }
    for name, flags in runs.items():
        output = tmp_path / f"{name}.png"
        edit_script.main(["--image", str(tmp_path / "digit.png"), *flags, *common, "--output", str(output)])
        columns = 4 if name == "inpaint" else 3  # input, (mask,) two samples
        assert PIL.Image.open(output).size == (columns * 18, 18)
    output = tmp_path / "outpaint.png"
    edit_script.main(["--image", str(tmp_path / "small.png"), "--outpaint", *common, "--output", str(output)])
    assert PIL.Image.open(output).size == (4 * 18, 18)
    with pytest.raises(SystemExit):
        edit_script.parse_args(["--image", "x.png", "--class_labels", "1", "--strength", "1.5"])
