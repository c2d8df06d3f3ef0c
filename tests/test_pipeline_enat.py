"""ENATPipeline: sampling behaviour, guidance with reuse, generators, callbacks, errors, scheduler swaps."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AmusedScheduler

from enat_diffusers import ENATScheduler

from .tiny_components import CODEBOOK_SIZE, GRID, NUM_CLASSES, TransformerCalls, tiny_pipeline


@pytest.fixture
def pipe():
    return tiny_pipeline()


def _latents(pipe, labels, seed, **kwargs):
    generator = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))] if seed is not None else None
    return pipe(labels, generator=generator, output_type="latent", **kwargs).images


def test_output_types(pipe):
    generator = torch.Generator().manual_seed(0)
    pil = pipe([1, 2], generator=generator, num_inference_steps=4).images
    assert len(pil) == 2 and all(isinstance(image, PIL.Image.Image) and image.size == (8, 8) for image in pil)
    array = pipe([1], output_type="np", num_inference_steps=4).images
    assert array.shape == (1, 8, 8, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    tensor = pipe([1], output_type="pt", num_inference_steps=4).images
    assert tensor.shape == (1, 3, 8, 8)
    latents = pipe([1, 2, 3], output_type="latent", num_inference_steps=4).images
    assert latents.shape == (3, GRID, GRID) and latents.dtype == torch.long
    assert latents.min() >= 0 and latents.max() < CODEBOOK_SIZE
    (images,) = pipe([1], output_type="np", num_inference_steps=4, return_dict=False)
    assert images.shape == (1, 8, 8, 3)


def test_same_seed_same_image_and_other_seed_other_image(pipe):
    first = _latents(pipe, [1, 2], seed=0)
    assert torch.equal(first, _latents(pipe, [1, 2], seed=0))
    assert not torch.equal(first, _latents(pipe, [1, 2], seed=100))


def test_generator_list_gives_per_image_reproducibility(pipe):
    batch = _latents(pipe, [1, 3, 4], seed=10)
    for index, label in enumerate([1, 3, 4]):
        alone = pipe([label], generator=[torch.Generator().manual_seed(10 + index)], output_type="latent").images
        assert torch.equal(batch[index], alone[0])


def test_guidance_runs_both_streams_in_one_forward_with_reuse(pipe):
    recorder = TransformerCalls(pipe.transformer)
    pipe([1, 2], num_inference_steps=5, output_type="latent")
    recorder.remove()
    assert recorder.calls == [(4, False)] + [(4, True)] * 4
    assert pipe.num_timesteps == 5 and pipe.do_classifier_free_guidance and pipe.guidance_scale == 2.5


def test_the_condition_is_prepared_once_per_call(pipe):
    projections = []
    block = pipe.transformer.encoder_blocks[0]
    hook = block.adaln_modulation.register_forward_hook(lambda *_: projections.append(1))
    pipe([1, 2], num_inference_steps=4, output_type="latent")
    hook.remove()
    assert projections == [1]


def test_without_guidance_a_single_stream_runs(pipe):
    recorder = TransformerCalls(pipe.transformer)
    pipe([1, 2], num_inference_steps=3, guidance_scale=0.0, output_type="latent")
    recorder.remove()
    assert recorder.calls == [(2, False), (2, True), (2, True)]
    assert not pipe.do_classifier_free_guidance


def test_guidance_changes_the_result_and_the_schedule_matters(pipe):
    unguided = _latents(pipe, [1, 2], seed=0, guidance_scale=0.0)
    linear = _latents(pipe, [1, 2], seed=0, guidance_scale=8.0)
    constant = _latents(pipe, [1, 2], seed=0, guidance_scale=8.0, guidance_schedule="constant")
    assert not torch.equal(unguided, linear) and not torch.equal(linear, constant)


def test_reuse_matches_the_guided_logits_of_the_reference_formula(pipe, monkeypatch):
    """The first step is unguided and step k uses weight scale * k / T (the reference's linear ramp)."""
    seen = []
    original_step = pipe.scheduler.step

    def spy(model_output, timestep, sample, **kwargs):
        seen.append(model_output.clone())
        return original_step(model_output, timestep, sample, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy)
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda _m, _a, output: outputs.append(output.logits.clone()))
    pipe([1, 2], num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    handle.remove()
    for step, (guided, logits) in enumerate(zip(seen, outputs, strict=True)):
        conditional, unconditional = logits.chunk(2)
        expected = conditional + 3.0 * step / 4 * (conditional - unconditional)
        assert torch.allclose(guided, expected)


def test_amused_scheduler_in_enat_pipeline_recomputes_every_step(pipe):
    pipe.scheduler = AmusedScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.mask_token_id == CODEBOOK_SIZE
    recorder = TransformerCalls(pipe.transformer)
    latents = pipe([1, 2], num_inference_steps=4, output_type="latent").images
    recorder.remove()
    assert recorder.calls == [(4, False)] * 4
    assert latents.shape == (2, GRID, GRID) and (latents != CODEBOOK_SIZE).all()


def test_scheduler_swap_keeps_config_and_changes_schedule(pipe):
    pipe.scheduler = ENATScheduler.from_config(pipe.scheduler.config, masking_schedule="linear")
    assert pipe.scheduler.config.masking_schedule == "linear"
    assert pipe.scheduler.config.mask_token_id == CODEBOOK_SIZE
    masked_counts = []
    pipe(
        [1],
        num_inference_steps=4,
        output_type="latent",
        callback_on_step_end=lambda _p, _i, _t, kwargs: (
            masked_counts.append(int((kwargs["latents"] == CODEBOOK_SIZE).sum())) or {}
        ),
    )
    assert masked_counts == [12, 8, 4, 0]  # linear: 16 * (1 - k/4)


def test_class_names_and_ids(pipe):
    assert pipe.get_label_ids(["goldfish", "Tinca tinca"]) == [1, 0]
    by_name = _latents(pipe, ["goldfish", "tench"], seed=0)
    by_id = _latents(pipe, [1, 0], seed=0)
    assert torch.equal(by_name, by_id)
    latents = pipe(2, num_images_per_class=3, output_type="latent").images
    assert latents.shape == (3, GRID, GRID)


def test_unknown_class_name_lists_close_matches(pipe):
    with pytest.raises(ValueError, match=r"'goldfsh': close matches \['goldfish'\]"):
        pipe.get_label_ids(["goldfsh"])


def test_defaults_come_from_the_pipeline_config():
    pipe = tiny_pipeline(default_num_inference_steps=3, default_guidance_scale=1.5)
    recorder = TransformerCalls(pipe.transformer)
    pipe([1], output_type="latent")
    recorder.remove()
    assert len(recorder.calls) == 3 and pipe.guidance_scale == 1.5


def test_callback_sees_every_step_and_can_interrupt(pipe):
    steps = []

    def callback(pipeline, step_index, timestep, callback_kwargs):
        steps.append((step_index, int(timestep), callback_kwargs["latents"].shape))
        if step_index == 1:
            pipeline._interrupt = True
        return {}

    recorder = TransformerCalls(pipe.transformer)
    pipe([1], num_inference_steps=4, output_type="latent", callback_on_step_end=callback)
    recorder.remove()
    assert [step for step, _, _ in steps] == [0, 1] and len(recorder.calls) == 2
    assert steps[0][2] == (1, GRID, GRID)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"class_labels": [NUM_CLASSES]}, ValueError, r"class ids in \[0, 4\]"),
        ({"class_labels": [-1]}, ValueError, r"class ids in \[0, 4\]"),
        ({"class_labels": ["goldfsh"]}, ValueError, "close matches"),
        ({"class_labels": [1.5]}, TypeError, "ints or class names"),
        ({"class_labels": []}, TypeError, "non-empty"),
        ({"num_inference_steps": 0}, ValueError, r"`num_inference_steps` must be an integer in \[1, 16\]"),
        ({"num_inference_steps": 17}, ValueError, r"`num_inference_steps` must be an integer in \[1, 16\]"),
        ({"guidance_scale": -1.0}, ValueError, "`guidance_scale` must be a number >= 0"),
        ({"guidance_schedule": "cosine"}, ValueError, "`guidance_schedule` must be one of"),
        ({"generator": [torch.Generator()]}, ValueError, "list of 1 generators, but 2 images"),
        ({"latents": torch.zeros(2, 3, 3, dtype=torch.long)}, ValueError, r"`latents` must have shape \(2, 4, 4\)"),
        ({"latents": torch.full((2, GRID, GRID), CODEBOOK_SIZE + 1)}, ValueError, "token ids in"),
        ({"latents": torch.zeros(2, GRID, GRID)}, TypeError, "integer torch.Tensor"),
        ({"output_type": "jpeg"}, ValueError, "`output_type` must be one of"),
        ({"num_images_per_class": 0}, ValueError, "`num_images_per_class`"),
        ({"callback_on_step_end_tensor_inputs": ["logits"]}, ValueError, "may only name"),
    ],
)
def test_bad_inputs_fail_before_any_model_runs(pipe, kwargs, error, message):
    recorder = TransformerCalls(pipe.transformer)
    arguments = {"class_labels": [1, 2], **kwargs}
    with pytest.raises(error, match=message):
        pipe(**arguments)
    recorder.remove()
    assert recorder.calls == []


def test_partially_given_latents_keep_their_visible_tokens(pipe):
    latents = torch.full((1, GRID, GRID), CODEBOOK_SIZE)
    latents[0, 0, :] = torch.tensor([1, 2, 3, 4])
    result = pipe([1], latents=latents, num_inference_steps=4, output_type="latent").images
    assert torch.equal(result[0, 0], latents[0, 0]) and (result != CODEBOOK_SIZE).all()


def test_regionally_compiled_transformer_samples_the_same_tokens_without_graph_breaks():
    """Token counts change at every step; the compiled blocks must follow them (dynamic shapes, no fallback)."""
    pipe = tiny_pipeline()
    eager = pipe([1, 2], num_inference_steps=6, generator=torch.manual_seed(0), output_type="latent").images
    torch._dynamo.reset()
    try:
        # aot_eager traces exactly what inductor would compile, without the C++ build (the benchmark uses inductor).
        pipe.transformer.compile_repeated_blocks(dynamic=True, fullgraph=True, backend="aot_eager")
        compiled = pipe([1, 2], num_inference_steps=6, generator=torch.manual_seed(0), output_type="latent").images
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sampling_keeps_every_logit_finite(dtype):
    pipe = tiny_pipeline().to(dtype=dtype)
    finite = []
    hook = pipe.transformer.register_forward_hook(
        lambda _module, _args, output: finite.append(bool(torch.isfinite(output.logits).all()))
    )
    images = pipe([1, 2], num_inference_steps=6, guidance_scale=3.0, generator=torch.manual_seed(0), output_type="np")
    hook.remove()
    assert finite == [True] * 6
    assert np.isfinite(images.images).all() and images.images.shape[0] == 2
