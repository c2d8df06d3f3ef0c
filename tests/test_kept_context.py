"""The kept tokens of an edit as a fixed context (`ENATKeptContext`): same logits as the generation rule where they
must agree, shared by the samples of an image, ragged rows, fewer FLOPs, bad input."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from enat_diffusers import ENATImg2ImgPipeline, ENATInpaintPipeline, ENATKeptContext, ENATReuseState

from .tiny_components import CODEBOOK_SIZE as MASK
from .tiny_components import GRID, tiny_pipeline, tiny_text_pipeline, tiny_text_transformer, tiny_transformer

pytestmark = pytest.mark.usefixtures("single_thread")

L = GRID * GRID
SIDE = 8  # pixels: the tiny VQ downsamples by 2


def condition(model, count: int) -> dict:
    if model.is_class_conditional:
        return {"class_labels": torch.arange(count) % model.config.num_classes}
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(count, 5, model.config.text_embed_dim, generator=generator)
    pooled = torch.randn(count, model.config.pooled_text_embed_dim, generator=generator)
    mask = torch.ones(count, 5, dtype=torch.long)
    mask[0, 3:] = 0  # padded text as well
    return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask, "pooled_text_embeds": pooled}


def edit_steps(regions: list[int]):
    """Token ids of three steps of an edit per row: the last `region` tokens masked, then 1 and 2 of them revealed."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MASK, (len(regions), L), generator=generator)
    steps = []
    for revealed in (0, 1, 2):
        step = ids.clone()
        for row, region in enumerate(regions):
            step[row, L - region + min(revealed, region) :] = MASK
        steps.append(step)
    return steps


@pytest.fixture(params=["class", "text"])
def model(request):
    return tiny_transformer() if request.param == "class" else tiny_text_transformer()


@torch.no_grad()
def test_the_first_reuse_step_with_a_kept_context_gives_the_generation_rules_logits(model):
    first, second, _ = edit_steps([6, 9, 4])
    output = model(first, **condition(model, 3))
    kept_context = model.prepare_kept_context(output.reuse_state, output.conditioning)
    assert kept_context.positions.shape == (3, L - 4)  # the row keeping most tokens sets the width
    generation_rule = model(second, conditioning=output.conditioning, reuse_state=output.reuse_state)
    kept = model(second, conditioning=output.conditioning, reuse_state=output.reuse_state, kept_context=kept_context)
    torch.testing.assert_close(kept.logits, generation_rule.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.reuse_state.features, generation_rule.reuse_state.features, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_later_steps_keep_the_kept_tokens_features_where_the_generation_rule_projects_them_again(model):
    first, second, third = edit_steps([6])
    output = model(first, **condition(model, 1))
    kept_context = model.prepare_kept_context(output.reuse_state, output.conditioning)
    state = model(second, conditioning=output.conditioning, reuse_state=output.reuse_state, kept_context=kept_context)
    fixed = model(third, conditioning=output.conditioning, reuse_state=state.reuse_state, kept_context=kept_context)
    refreshed = model(third, conditioning=output.conditioning, reuse_state=state.reuse_state)
    kept = slice(0, L - 6)
    assert torch.equal(fixed.reuse_state.features[:, kept], kept_context.features)
    assert torch.equal(state.reuse_state.features[:, kept], kept_context.features)
    assert not torch.allclose(refreshed.reuse_state.features[:, kept], kept_context.features, atol=1e-3)


@torch.no_grad()
def test_one_kept_context_serves_the_samples_of_an_image_like_one_per_row(model):
    first, second, _ = edit_steps([6, 9])
    output = model(first, **condition(model, 2))
    shared = model.prepare_kept_context(output.reuse_state, output.conditioning, rows_per_group=3)
    assert shared.key_values.shape[0] == 2
    rows = torch.arange(2).repeat_interleave(3)
    state = ENATReuseState(features=output.reuse_state.features[rows], masking=output.reuse_state.masking[rows])
    conditioning = type(output.conditioning)(
        **{name: None if value is None else value[rows] for name, value in output.conditioning.items()}
    )
    per_row = model.prepare_kept_context(state, conditioning)
    samples = second[rows].clone()
    samples[1, L - 9] = 3  # the samples of an image reveal different tokens
    with_shared = model(samples, conditioning=conditioning, reuse_state=state, kept_context=shared)
    with_per_row = model(samples, conditioning=conditioning, reuse_state=state, kept_context=per_row)
    torch.testing.assert_close(with_shared.logits, with_per_row.logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_row_of_a_ragged_batch_with_a_kept_context_equals_the_row_alone(model):
    regions = [3, L, 11]  # the second row keeps nothing: generation next to edits
    first, second, third = edit_steps(regions)
    inputs = condition(model, 3)
    output = model(first, **inputs)
    kept_context = model.prepare_kept_context(output.reuse_state, output.conditioning)
    batch = model(second, conditioning=output.conditioning, reuse_state=output.reuse_state, kept_context=kept_context)
    batch = model(third, conditioning=output.conditioning, reuse_state=batch.reuse_state, kept_context=kept_context)
    for row in range(3):
        alone_inputs = {name: value[row : row + 1] for name, value in inputs.items()}
        alone = model(first[row : row + 1], **alone_inputs)
        context = model.prepare_kept_context(alone.reuse_state, alone.conditioning)
        step = model(
            second[row : row + 1], conditioning=alone.conditioning, reuse_state=alone.reuse_state, kept_context=context
        )
        step = model(
            third[row : row + 1], conditioning=alone.conditioning, reuse_state=step.reuse_state, kept_context=context
        )
        torch.testing.assert_close(batch.logits[row : row + 1], step.logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_pass_without_visible_tokens_has_nothing_to_keep():
    model = tiny_transformer()
    output = model(torch.full((2, L), MASK), class_labels=torch.tensor([0, 1]))
    assert model.prepare_kept_context(output.reuse_state, output.conditioning) is None


@torch.no_grad()
def test_a_kept_context_that_does_not_fit_the_batch_is_refused():
    model = tiny_transformer()
    first, second, _ = edit_steps([6, 6])
    output = model(first, class_labels=torch.tensor([0, 1]))
    kept_context = model.prepare_kept_context(output.reuse_state, output.conditioning)
    step = {"conditioning": output.conditioning, "reuse_state": output.reuse_state}
    remasked = second.clone()
    remasked[0, 0] = MASK
    with pytest.raises(ValueError, match="some of its kept tokens are masked"):
        model(remasked, conditioning=output.conditioning, kept_context=kept_context)
    with pytest.raises(ValueError, match="serves 2 groups x 2 rows, but the batch has 2 rows"):
        model(second, **step, kept_context=ENATKeptContext(**{**kept_context, "rows_per_group": 2}))
    with pytest.raises(TypeError, match="must be the ENATKeptContext"):
        model(second, **step, kept_context=kept_context.key_values)
    with pytest.raises(ValueError, match="`rows_per_group` must be a positive integer"):
        model.prepare_kept_context(output.reuse_state, output.conditioning, rows_per_group=0)


# ---------------------------------------------------------------------------------------------------------------------
# In the editing pipelines


def transformer_flops(pipe, **inputs) -> int:
    """Matmul FLOPs of a call (weights must not require grad: FlopCounterMode's module tracking trips on them)."""
    with FlopCounterMode(display=False) as counter:
        pipe(**inputs)
    return counter.get_total_flops()


def frozen(pipe):
    pipe.transformer.requires_grad_(False)
    pipe.vqvae.requires_grad_(False)
    return pipe


@pytest.fixture(params=["class", "text"])
def inpaint_pipe(request, tmp_path):
    base = tiny_pipeline() if request.param == "class" else tiny_text_pipeline(tmp_path / "clip")
    pipe = frozen(ENATInpaintPipeline.from_pipe(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_inputs(pipe, count: int = 2, **overrides) -> dict:
    pixels = torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(count, SIDE, SIDE)
    mask[0, SIDE // 2 :] = 1
    mask[1:, :, : SIDE // 4] = 1  # another region per image
    condition = (
        {"class_labels": list(range(count))} if pipe.is_class_conditional else {"prompt": ["ab", "cde"][:count]}
    )
    return {
        "image": pixels,
        "mask_image": mask,
        **condition,
        "guidance_scale": 3.0,
        "output_type": "latent",
        **overrides,
    }


def test_two_steps_give_the_same_edit_with_a_fixed_or_refreshed_context(inpaint_pipe):
    inputs = inpaint_inputs(inpaint_pipe, num_inference_steps=2, num_images_per_prompt=2)
    seeds = [torch.Generator().manual_seed(i) for i in range(4)]
    fixed = inpaint_pipe(**inputs, generator=seeds).images
    seeds = [torch.Generator().manual_seed(i) for i in range(4)]
    refreshed = inpaint_pipe(**inputs, kept_context_mode="refreshed", generator=seeds).images
    assert torch.equal(fixed, refreshed)


def test_a_fixed_context_costs_fewer_flops_and_sharing_it_fewer_per_sample(inpaint_pipe):
    one = inpaint_inputs(inpaint_pipe, num_inference_steps=6)
    fixed = transformer_flops(inpaint_pipe, **one)
    refreshed = transformer_flops(inpaint_pipe, **one, kept_context_mode="refreshed")
    assert fixed < 0.9 * refreshed
    four = transformer_flops(inpaint_pipe, **one, num_images_per_prompt=4)
    four_refreshed = transformer_flops(inpaint_pipe, **one, num_images_per_prompt=4, kept_context_mode="refreshed")
    assert four / 4 < 0.8 * fixed
    assert four < 0.9 * four_refreshed


def test_image_to_image_keeps_the_untouched_tokens_as_a_fixed_context():
    pipe = frozen(ENATImg2ImgPipeline.from_pipe(tiny_pipeline()))
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    inputs = {"image": pixels, "class_labels": [0, 1], "strength": 0.5, "num_inference_steps": 8}
    contexts = []
    original = pipe.transformer.prepare_kept_context

    def record(*args, **kwargs):
        contexts.append(original(*args, **kwargs))
        return contexts[-1]

    pipe.transformer.prepare_kept_context = record
    try:
        tokens = pipe(**inputs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    finally:
        del pipe.transformer.prepare_kept_context
    assert len(contexts) == 1
    encoded = pipe.vqvae.encode(pixels * 2 - 1).token_ids.flatten(1)
    # Both guidance streams of both rows keep the tokens the re-masking left, and those are in the output unchanged.
    for row in range(2):
        positions = contexts[0].positions[row][contexts[0].valid[row]]
        assert len(positions) > 0
        assert torch.equal(tokens.flatten(1)[row, positions], encoded[row, positions])
    assert flops_fixed_below_refreshed(pipe, inputs)


def flops_fixed_below_refreshed(pipe, inputs) -> bool:
    fixed = transformer_flops(pipe, **inputs, generator=torch.Generator().manual_seed(0))
    refreshed = transformer_flops(
        pipe, **inputs, kept_context_mode="refreshed", generator=torch.Generator().manual_seed(0)
    )
    return fixed < refreshed


@pytest.mark.parametrize("pipeline_class", [ENATInpaintPipeline, ENATImg2ImgPipeline])
def test_an_unknown_kept_context_mode_is_refused_before_any_model_runs(pipeline_class):
    pipe = pipeline_class.from_pipe(tiny_pipeline())
    pixels = torch.rand(1, 3, SIDE, SIDE)
    extra = {"mask_image": torch.ones(SIDE, SIDE)} if pipeline_class is ENATInpaintPipeline else {}
    calls = []
    pipe.vqvae.register_forward_pre_hook(lambda *args: calls.append(1))
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"`kept_context_mode` must be one of \['fixed', 'refreshed'\].*'fixed'\?"):
        pipe(image=pixels, class_labels=0, kept_context_mode="fxed", **extra)
    assert calls == []
