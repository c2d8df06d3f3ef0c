"""ENATImg2ImgPipeline: diffusers' strength, the starting point of the masking schedule, generation at strength 1,
rows equal to rows alone, kept tokens, bad input (a strength that runs no step included)."""

import numpy as np
import pytest
import torch

from enat_diffusers import ENATImg2ImgPipeline

from .tiny_components import CODEBOOK_SIZE as MASK
from .tiny_components import GRID, StartRecorder, TransformerCalls, tiny_pipeline, tiny_text_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE = 8
STEPS = 8
COMMON = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "output_type": "latent"}


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.fixture
def pipe():
    return ENATImg2ImgPipeline.from_pipe(tiny_pipeline())


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.8])
def test_strength_runs_the_last_steps_of_the_schedule_from_its_masked_count(pipe, strength):
    recorder = StartRecorder(pipe)
    pixels = images(2)
    out = pipe(image=pixels, class_labels=[0, 1], strength=strength, generator=generators([0, 1]),
               callback_on_step_end=recorder.callback, **COMMON).images  # fmt: skip
    num_steps = int(STEPS * strength)
    start = STEPS - num_steps
    scheduler, num_tokens = pipe.scheduler, GRID * GRID
    assert recorder.steps == list(range(start, STEPS))
    start_ids = recorder.first_input[:2].flatten(1)  # conditional stream
    assert (start_ids == MASK).sum(1).tolist() == [scheduler.num_masked_after_step(start - 1, num_tokens)] * 2
    assert recorder.counts == [[scheduler.num_masked_after_step(k, num_tokens)] * 2 for k in range(start, STEPS)]
    # tokens that were not re-masked are the input's, in the output too
    tokens = pipe.vqvae.encode(pixels * 2 - 1).token_ids.flatten(1)
    visible = start_ids != MASK
    assert torch.equal(start_ids[visible], tokens[visible])
    assert torch.equal(out.flatten(1)[visible], tokens[visible])
    assert not (out == MASK).any()


@pytest.mark.parametrize("kind", ["class", "text"])
def test_strength_one_is_exactly_generation(kind, tmp_path):
    generation = tiny_pipeline() if kind == "class" else tiny_text_pipeline(tmp_path / "clip")
    pipe = ENATImg2ImgPipeline.from_pipe(generation)
    condition = {"class_labels": [3, 1]} if kind == "class" else {"prompt": ["abc", "xyz"]}
    edited = pipe(image=images(2), strength=1.0, **condition, num_images_per_prompt=2,
                  generator=generators(range(4)), **COMMON).images  # fmt: skip
    generated = generation(**condition, num_images_per_prompt=2, generator=generators(range(4)), **COMMON).images
    assert torch.equal(edited, generated)
    single = pipe(image=images(1), strength=1.0, **{k: v[:1] for k, v in condition.items()},
                  generator=torch.manual_seed(7), **COMMON).images  # fmt: skip
    alone = generation(**{k: v[:1] for k, v in condition.items()}, generator=torch.manual_seed(7), **COMMON).images
    assert torch.equal(single, alone)


def test_the_smallest_strength_that_runs_a_step_runs_the_last_one(pipe):
    recorder = StartRecorder(pipe)
    pipe(image=images(1), class_labels=[0], strength=1 / STEPS, callback_on_step_end=recorder.callback, **COMMON)
    assert recorder.steps == [STEPS - 1]


@pytest.mark.parametrize("kind", ["class", "text"])
def test_a_row_of_a_batch_equals_the_row_alone(kind, tmp_path):
    generation = tiny_pipeline() if kind == "class" else tiny_text_pipeline(tmp_path / "clip")
    pipe = ENATImg2ImgPipeline.from_pipe(generation)
    condition = {"class_labels": [0, 2, 4]} if kind == "class" else {"prompt": ["ab", "cd", "ef"]}
    pixels = images(3)
    batch = pipe(image=pixels, strength=0.6, **condition, generator=generators([3, 4, 5]), **COMMON).images
    for row in range(3):
        alone = pipe(image=pixels[row], strength=0.6, **{k: v[row : row + 1] for k, v in condition.items()},
                     generator=generators([3 + row]), **COMMON).images  # fmt: skip
        assert torch.equal(batch[row : row + 1], alone), f"row {row}"


def test_samples_of_one_image_are_re_masked_independently(pipe):
    recorder = StartRecorder(pipe)
    pipe(image=images(1), class_labels=[2], strength=0.5, num_images_per_prompt=3, generator=generators(range(3)),
         **COMMON)  # fmt: skip
    starts = recorder.first_input[:3].flatten(1)
    assert recorder.first_input.shape[0] == 6  # nothing to share: each sample starts from its own mask
    assert len({tuple(row.tolist()) for row in starts}) == 3


def test_images_of_numpy_pil_and_tensor_give_the_same_result(pipe):
    pixels = images(1)
    array = pixels[0].permute(1, 2, 0).numpy()
    results = [
        pipe(image=value, class_labels=[1], strength=0.5, generator=torch.manual_seed(0), **COMMON).images
        for value in (pixels, pixels[0], array, array[None], [array])
    ]
    for result in results[1:]:
        assert torch.equal(result, results[0])


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"strength": 1.5}, ValueError, r"`strength` must be a number in \(0, 1\]"),
        ({"strength": -0.1}, ValueError, r"`strength` must be a number in \(0, 1\]"),
        ({"strength": 0.0}, ValueError, r"`strength` must be a number in \(0, 1\]"),
        ({"strength": 0.1}, ValueError, r"`strength` 0.1 runs no step of `num_inference_steps` 8 .*at least 1/8"),
        ({"strength": True}, ValueError, "`strength` must be a number"),
        ({"strength": float("nan")}, ValueError, "`strength` must be a number"),
        ({"image": np.zeros((2, 5, 5))}, ValueError, "`image` ndarray must have shape"),
        ({"image": {"pixels": 1}}, TypeError, "`image` must be a PIL image"),
        ({"image": torch.rand(3, 3, 8, 8) * 255}, ValueError, "divide by 255"),
        ({"image": images(3)}, ValueError, "2 `class_labels` for 3 images"),
        ({"class_labels": [0, 9]}, ValueError, "class_labels"),
    ],
)
def test_bad_input_is_refused_before_any_model_runs(pipe, monkeypatch, arguments, error, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(pipe.vqvae, "encode", no_model)
    calls = TransformerCalls(pipe.transformer)
    with pytest.raises(error, match=message):
        pipe(**{"image": images(2), "class_labels": [0, 1], "strength": 0.5, **arguments}, **COMMON)
    assert calls.calls == []
