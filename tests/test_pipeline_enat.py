"""ENATPipeline: sampling behaviour, guidance with reuse, generators, callbacks, errors, scheduler swaps."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AmusedScheduler

from enat_diffusers import ENATPipeline, ENATScheduler

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
    assert pipe.num_timesteps == 5 and pipe.do_classifier_free_guidance and pipe.guidance_scale == 3.5


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


def _guided_and_stream_logits(pipe, monkeypatch, **kwargs):
    """The logits the scheduler got at every step, and the transformer's (conditional; unconditional) logits."""
    seen = []
    original_step = pipe.scheduler.step

    def spy(model_output, timestep, sample, **step_kwargs):
        seen.append(model_output.clone())
        return original_step(model_output, timestep, sample, **step_kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy)
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda _m, _a, output: outputs.append(output.logits.clone()))
    pipe([1, 2], output_type="latent", **kwargs)
    handle.remove()
    monkeypatch.undo()
    return seen, outputs


def test_guidance_has_diffusers_meaning_with_the_reference_linear_ramp(pipe, monkeypatch):
    """`uncond + s_k * (cond - uncond)` with `s_k = 1 + (s - 1) * k / T`; bit for bit the reference's
    `cond + cfg * k / T * (cond - uncond)` with `cfg = s - 1`."""
    seen, outputs = _guided_and_stream_logits(pipe, monkeypatch, num_inference_steps=4, guidance_scale=3.5)
    for step, (guided, logits) in enumerate(zip(seen, outputs, strict=True)):
        conditional, unconditional = logits.chunk(2)
        scale = 1 + (3.5 - 1) * step / 4
        assert torch.allclose(guided, unconditional + scale * (conditional - unconditional), atol=1e-5)
        reference_weight = (1.0 * step / 4) * 2.5  # the reference sampler's weight with its cfg = 2.5
        assert torch.equal(guided, conditional + reference_weight * (conditional - unconditional))


def test_constant_guidance_uses_the_scale_at_every_step(pipe, monkeypatch):
    seen, outputs = _guided_and_stream_logits(
        pipe, monkeypatch, num_inference_steps=3, guidance_scale=2.0, guidance_schedule="constant"
    )
    for guided, logits in zip(seen, outputs, strict=True):
        conditional, unconditional = logits.chunk(2)
        assert torch.allclose(guided, unconditional + 2.0 * (conditional - unconditional), atol=1e-5)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_guidance_scale_up_to_one_runs_a_single_unguided_stream(pipe, scale):
    recorder = TransformerCalls(pipe.transformer)
    pipe([1, 2], num_inference_steps=2, guidance_scale=scale, output_type="latent")
    recorder.remove()
    assert recorder.calls == [(2, False), (2, True)] and not pipe.do_classifier_free_guidance


def test_default_guidance_scale_is_the_reference_cfg_plus_one():
    assert tiny_pipeline().config.default_guidance_scale == 3.5


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
    latents = pipe(2, num_images_per_prompt=3, output_type="latent").images
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
        ({"guidance_scale": -1.0}, ValueError, "`guidance_scale` must be a finite number >= 0"),
        ({"guidance_schedule": "cosine"}, ValueError, "`guidance_schedule` must be one of"),
        ({"generator": [torch.Generator()]}, ValueError, "list of 1 generators, but 2 images"),
        ({"latents": torch.zeros(2, 3, 3, dtype=torch.long)}, ValueError, r"`latents` must have shape \(2, 4, 4\)"),
        ({"latents": torch.full((2, GRID, GRID), CODEBOOK_SIZE + 1)}, ValueError, "token ids in"),
        ({"latents": torch.zeros(2, GRID, GRID)}, TypeError, "integer torch.Tensor"),
        ({"output_type": "jpeg"}, ValueError, "`output_type` must be one of"),
        ({"num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt`"),
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


# --- images per class label: diffusers' name, the old one deprecated ---------------------------------------------


def test_num_images_per_prompt_repeats_each_class_label(pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    latents = pipe([1, 3], num_images_per_prompt=2, generator=generators, output_type="latent").images
    alone = pipe([3], generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    assert latents.shape == (4, GRID, GRID) and torch.equal(latents[2], alone[0])


def test_num_images_per_class_still_works_with_a_deprecation_warning(pipe):
    with pytest.warns(FutureWarning, match="`num_images_per_class` is deprecated.*use `num_images_per_prompt`"):
        old = pipe([1], num_images_per_class=2, generator=torch.manual_seed(0), output_type="latent").images
    new = pipe([1], num_images_per_prompt=2, generator=torch.manual_seed(0), output_type="latent").images
    assert torch.equal(old, new)


# --- interruption ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["latent", "pt", "np", "pil"])
def test_interrupt_returns_the_last_prediction_in_every_output_type(pipe, monkeypatch, output_type):
    predictions = []
    original_step = pipe.scheduler.step

    def spy(*args, **kwargs):
        output = original_step(*args, **kwargs)
        predictions.append(output.pred_original_sample.clone())
        return output

    monkeypatch.setattr(pipe.scheduler, "step", spy)

    def interrupt_after_step_1(pipeline, step_index, _timestep, _kwargs):
        pipeline._interrupt = step_index == 1
        return {}

    recorder = TransformerCalls(pipe.transformer)
    arguments = {"num_inference_steps": 6, "generator": torch.manual_seed(0)}
    images = pipe([1, 2], output_type=output_type, callback_on_step_end=interrupt_after_step_1, **arguments).images
    recorder.remove()
    assert len(recorder.calls) == 2 and pipe.interrupt
    expected = pipe.decode_latents(predictions[-1], output_type)
    if output_type == "latent":
        assert torch.equal(images, predictions[-1]) and (images != CODEBOOK_SIZE).all()
    elif output_type == "pil":
        assert [np.asarray(image).tolist() for image in images] == [np.asarray(image).tolist() for image in expected]
    else:
        assert np.array_equal(np.asarray(images), np.asarray(expected))


def test_a_new_call_after_an_interrupted_one_runs_every_step(pipe):
    pipe([1], num_inference_steps=4, callback_on_step_end=lambda p, *_: setattr(p, "_interrupt", True) or {})
    recorder = TransformerCalls(pipe.transformer)
    pipe([1], num_inference_steps=4, output_type="latent")
    recorder.remove()
    assert len(recorder.calls) == 4


# --- argument checks (issue 14) ----------------------------------------------------------------------------------


def test_numpy_and_torch_integer_scalars_are_accepted_where_ints_are(pipe):
    arguments = {"generator": torch.manual_seed(0), "output_type": "latent"}
    expected = pipe([1, 2], num_inference_steps=4, num_images_per_prompt=2, **arguments).images
    arguments["generator"] = torch.manual_seed(0)
    actual = pipe(
        [np.int64(1), torch.tensor(2)],
        num_inference_steps=np.int64(4),
        num_images_per_prompt=torch.tensor(2),
        **arguments,
    ).images
    assert torch.equal(expected, actual)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_images_per_prompt": True}, ValueError, "`num_images_per_prompt` must be a positive integer"),
        ({"num_inference_steps": True}, ValueError, "`num_inference_steps` must be an integer"),
        ({"guidance_scale": True}, ValueError, "`guidance_scale` must be a finite number"),
        ({"guidance_scale": float("nan")}, ValueError, "`guidance_scale` must be a finite number"),
        ({"guidance_scale": float("inf")}, ValueError, "`guidance_scale` must be a finite number"),
        ({"class_labels": [True]}, TypeError, "ints or class names"),
        ({"generator": [torch.Generator(), 3]}, TypeError, r"only hold torch.Generator objects, got \['int'\]"),
        ({"generator": "seed"}, TypeError, "`generator` must be a torch.Generator"),
        ({"callback_on_step_end": "print"}, TypeError, "`callback_on_step_end` must be callable"),
        ({"num_images_per_prompt": 10**6}, ValueError, "one call makes at most 4096"),
    ],
)
def test_hostile_arguments_are_refused_before_any_model_runs(pipe, kwargs, error, message):
    recorder = TransformerCalls(pipe.transformer)
    with pytest.raises(error, match=message):
        pipe(**{"class_labels": [1, 2], **kwargs})
    recorder.remove()
    assert recorder.calls == []


def test_non_finite_default_guidance_scale_in_the_config_is_refused():
    pipe = tiny_pipeline(default_guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number"):
        pipe([1])


def test_a_callback_returning_none_gets_a_clear_error(pipe):
    with pytest.raises(TypeError, match="`callback_on_step_end` must return a dict"):
        pipe([1], num_inference_steps=2, callback_on_step_end=lambda *_: None)


def test_non_finite_logits_stop_sampling_naming_the_likely_cause(pipe):
    with torch.no_grad():
        for parameter in pipe.transformer.decoder_blocks[-1].parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite.*NaN/inf.*float16"):
        pipe([1], num_inference_steps=2, output_type="latent")


def test_a_class_name_listed_for_two_classes_is_refused_at_load(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["id2label"] = {"0": "tench, fish", "1": "goldfish, fish"}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists the name 'fish' for classes 0 and 1"):
        ENATPipeline.from_pretrained(tmp_path)


# --- the pipeline layer: public, keyword-only seams shared by every ENAT pipeline ---------------------------------


def test_check_inputs_is_public_and_returns_the_number_of_images(pipe):
    assert pipe.check_inputs(class_labels=[1, "goldfish"], num_images_per_prompt=3, num_inference_steps=4,
                             guidance_scale=3.5) == 6  # fmt: skip
    with pytest.raises(ValueError, match="class-conditional: pass `class_labels`, not prompt"):
        pipe.check_inputs(class_labels=[1], prompt="a cat", num_inference_steps=4, guidance_scale=3.5)
    with pytest.raises(TypeError):
        pipe.check_inputs([1], 4, 3.5)  # keyword-only


def test_prepare_condition_kwargs_gives_both_streams_of_class_labels(pipe):
    pipe.start_call(guidance_scale=3.5, guidance_schedule="linear")
    guided = pipe.prepare_condition_kwargs(class_labels=[1, "goldfish"], num_images_per_prompt=2)
    assert guided["class_labels"].tolist() == [1, 1, 1, 1] + [NUM_CLASSES] * 4
    pipe.start_call(guidance_scale=1.0, guidance_schedule="linear")
    assert pipe.prepare_condition_kwargs(class_labels=[2])["class_labels"].tolist() == [2]


def test_prepare_latents_is_a_fully_masked_grid_or_the_given_tokens(pipe):
    assert torch.equal(pipe.prepare_latents(2), torch.full((2, GRID, GRID), CODEBOOK_SIZE))
    given = torch.zeros(1, GRID, GRID, dtype=torch.int32)
    assert pipe.prepare_latents(1, latents=given).dtype == torch.long
