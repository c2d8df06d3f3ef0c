"""The samplers beyond the reference: Halton token order, ReMDM-style remasking (with feature reuse) and guidance
schedules, in the scheduler alone and inside the class, text and editing pipelines."""

import math

import pytest
import torch
from diffusers import AmusedScheduler

from enat_diffusers import ENATImg2ImgPipeline, ENATInpaintPipeline
from enat_diffusers.models.transformer_enat import ENATReuseState
from enat_diffusers.schedulers import ENATScheduler, GuidanceSchedule, guidance_weight, halton_ranks

from .example_scripts import load_example
from .tiny_components import CODEBOOK_SIZE as MASK
from .tiny_components import tiny_pipeline, tiny_text_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(scheduler, sample, steps, seed=0, region_mask=None):
    """A whole run on random logits; returns the step outputs."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, sample.shape[0], MASK, *sample.shape[1:], generator=generator) * 3
    scheduler.set_timesteps(steps)
    outputs = []
    for k, timestep in enumerate(scheduler.timesteps):
        out = scheduler.step(logits[k], timestep, sample, generator=generator, region_mask=region_mask)
        outputs.append(out)
        sample = out.prev_sample
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Halton order


@pytest.mark.parametrize("shape", [(4, 4), (16, 16), (3, 5), (1, 7)])
def test_halton_ranks_are_a_permutation(shape):
    ranks = halton_ranks(*shape)
    assert sorted(ranks.tolist()) == list(range(shape[0] * shape[1]))


def _min_distance(positions: torch.Tensor) -> float:
    distances = torch.cdist(positions.float(), positions.float())
    return float(distances.fill_diagonal_(math.inf).min())


def test_halton_order_spreads_the_first_tokens_over_the_grid():
    """Low discrepancy: the first 16 revealed tokens of a 16 x 16 grid are farther apart than those of any of 200
    random orders (at most 2 cells there) and of the raster order (1 cell)."""
    ranks = halton_ranks(16, 16).view(16, 16)
    assert _min_distance(torch.nonzero(ranks < 16)) > 2.2
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        order = torch.randperm(256, generator=generator)[:16]
        assert _min_distance(torch.stack([order // 16, order % 16], dim=1)) <= 2.0


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_halton_steps_reveal_the_planned_number_in_halton_order_whatever_the_logits(steps):
    scheduler = ENATScheduler(mask_token_id=MASK, token_order="halton")
    sample = torch.full((2, 4, 4), MASK)
    ranks = halton_ranks(4, 4).view(4, 4)
    first = _run(scheduler, sample, steps, seed=0)
    other = _run(scheduler, sample, steps, seed=1)
    for k, (a, b) in enumerate(zip(first, other, strict=True)):
        num_masked = scheduler.num_masked_after_step(k, 16)
        visible = ranks < 16 - num_masked  # the first ranks are revealed, the same in every row and run
        assert torch.equal(a.mask, ~visible.expand(2, 4, 4))
        assert torch.equal(b.mask, a.mask)
    assert not first[-1].mask.any()


# ---------------------------------------------------------------------------------------------------------------
# Remasking


def test_remasking_keeps_the_schedule_masks_revealed_tokens_again_and_ends_revealed():
    steps, batch = 8, 3
    scheduler = ENATScheduler(mask_token_id=MASK, remasking=1.0)
    sample = torch.full((batch, 16), MASK)
    outputs = _run(scheduler, sample, steps)
    remasked_total = 0
    previous = sample
    for k, out in enumerate(outputs):
        was_masked = previous == MASK
        assert out.mask.sum(1).tolist() == [scheduler.num_masked_after_step(k, 16)] * batch
        assert torch.equal(out.critical_tokens, was_masked & ~out.mask)
        remasked = out.mask & ~was_masked
        # ReMDM's cap: as many as min(visible before, masked after), all of them at strength 1
        cap = torch.minimum((~was_masked).sum(1), out.mask.sum(1))
        assert remasked.sum(1).tolist() == cap.tolist()
        remasked_total += int(remasked.sum())
        previous = out.prev_sample
    assert remasked_total > 0
    assert not outputs[-1].mask.any()
    # strength 0.5 remasks half the cap (floored); strength 0 is the reference sampler, draw for draw
    half = _run(ENATScheduler(mask_token_id=MASK, remasking=0.5), sample, steps)
    assert sum(
        int((o.mask & (p != MASK)).sum()) for o, p in zip(half[1:], [h.prev_sample for h in half], strict=False)
    )
    for a, b in zip(_run(ENATScheduler(mask_token_id=MASK), sample, steps),
                    _run(ENATScheduler(mask_token_id=MASK, remasking=0.0), sample, steps), strict=True):  # fmt: skip
        assert torch.equal(a.prev_sample, b.prev_sample)


def test_remasking_never_touches_tokens_outside_the_region():
    scheduler = ENATScheduler(mask_token_id=MASK, remasking=1.0)
    kept = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(0))
    region = torch.zeros(2, 16, dtype=torch.bool)
    region[:, 8:] = True
    sample = torch.where(region, MASK, kept)
    outputs = _run(scheduler, sample, 6, region_mask=region)
    for out in outputs:
        assert torch.equal(out.prev_sample[~region], kept[~region])
    assert any(bool((out.mask & region & (prev != MASK)).any())
               for out, prev in zip(outputs[1:], [o.prev_sample for o in outputs], strict=False))  # fmt: skip
    with pytest.raises(ValueError, match="region_mask"):
        scheduler.set_timesteps(4)
        scheduler.step(torch.randn(2, MASK, 16), 3, sample, starting_mask_ratio=0.5)


class _Recorder:
    """Every transformer call of a pipeline run: its keyword arguments and its output."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs, output):
        self.calls.append((args[0] if args else kwargs["input_ids"], dict(kwargs), output))


@pytest.mark.parametrize("kind", ["class", "text"])
def test_remasked_tokens_are_reencoded_and_every_step_equals_a_forward_from_the_token_history(kind, tmp_path):
    """With remasking and feature reuse, each step's logits equal a transformer call whose reuse state is built
    independently from the token history: features are reused only for tokens visible, and unchanged, since the
    previous call; a token masked again and revealed later is encoded (critical) again."""
    pipe = tiny_pipeline() if kind == "class" else tiny_text_pipeline(tmp_path / "clip")
    pipe.scheduler = ENATScheduler.from_config(pipe.scheduler.config, remasking=1.0)
    condition = {"class_labels": [0, 3]} if kind == "class" else {"prompt": ["a cat", "a dog"]}
    recorder = _Recorder(pipe.transformer)
    pipe(**condition, num_inference_steps=8, guidance_scale=3.0, output_type="latent",
         generator=torch.manual_seed(0))  # fmt: skip
    recorder.handle.remove()
    calls = recorder.calls
    assert len(calls) == 8
    revealed_again = 0
    for k in range(1, len(calls)):
        previous_ids, _, previous_output = calls[k - 1]
        ids, kwargs, output = calls[k]
        previous_ids, ids = previous_ids.flatten(1), ids.flatten(1)
        reusable = (previous_ids != MASK) & (ids != MASK) & (previous_ids == ids)
        state = ENATReuseState(features=previous_output.reuse_state.features, masking=~reusable)
        with torch.no_grad():
            expected = pipe.transformer(ids, **{**kwargs, "reuse_state": state}).logits
        assert torch.equal(output.logits, expected)
        if k >= 2:
            before = calls[k - 2][0].flatten(1)
            revealed_again += int(((before != MASK) & (previous_ids == MASK) & (ids != MASK)).sum())
    assert revealed_again > 0  # the run did remask and reveal again


def test_remasking_in_editing_keeps_the_tokens_outside_the_mask():
    pipe = ENATInpaintPipeline.from_pipe(tiny_pipeline())
    pipe.scheduler = ENATScheduler.from_config(pipe.scheduler.config, remasking=1.0, token_order="halton")
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 8, 8)
    mask[:, 4:] = 1
    tokens = pipe.vqvae.encode(pipe.preprocess_image(pixels)).token_ids
    out = pipe(image=pixels, mask_image=mask, class_labels=[1, 2], num_inference_steps=6, guidance_scale=3.0,
               output_type="latent", generator=torch.manual_seed(0)).images  # fmt: skip
    assert torch.equal(out[:, :2], tokens[:, :2])
    assert (out != MASK).all()


# ---------------------------------------------------------------------------------------------------------------
# Guidance schedules


def test_guidance_schedule_values():
    s, T = 4.0, 8
    assert [guidance_weight("linear", s, k, T) for k in range(T)] == [3.0 * k / 8 for k in range(T)]
    assert [guidance_weight("constant", s, k, T) for k in range(T)] == [3.0] * T
    cosine = GuidanceSchedule("power-cosine", power=1.0)
    assert guidance_weight(cosine, s, 0, T) == 0.0
    assert guidance_weight(cosine, s, 4, T) == pytest.approx(1.5)
    steep = GuidanceSchedule("power-cosine", power=3.0)
    assert guidance_weight(steep, s, 4, T) == pytest.approx(3.0 * (1 - math.cos(math.pi / 8)) / 2)
    interval = GuidanceSchedule("interval", interval=(0.25, 0.75))
    assert [guidance_weight(interval, s, k, T) for k in range(T)] == [0, 0, 3, 3, 3, 3, 0, 0]


def test_pipeline_applies_the_guidance_schedule_to_the_logits_it_samples_from():
    pipe = tiny_pipeline()
    recorder = _Recorder(pipe.transformer)
    sampled = []
    original_step = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        sampled.append(model_output)
        return original_step(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    schedule = GuidanceSchedule("interval", interval=(0.5, 1.0))
    pipe(class_labels=[1], num_inference_steps=4, guidance_scale=5.0, guidance_schedule=schedule,
         output_type="latent", generator=torch.manual_seed(0))  # fmt: skip
    for k, (logits, (_, _, output)) in enumerate(zip(sampled, recorder.calls, strict=True)):
        conditional, unconditional = output.logits.chunk(2)
        weight = 0.0 if k < 2 else 4.0
        assert torch.equal(logits, conditional + weight * (conditional - unconditional))
    with pytest.raises(ValueError, match="guidance_schedule"):
        pipe(class_labels=[1], num_inference_steps=4, guidance_schedule="cosine")
    with pytest.raises(ValueError, match="interval"):
        pipe(class_labels=[1], num_inference_steps=4, guidance_schedule=GuidanceSchedule("interval", interval=(1, 0)))


# ---------------------------------------------------------------------------------------------------------------
# Swapping


def test_sampler_options_swap_with_from_config_and_survive_saving(tmp_path):
    pipe = tiny_pipeline()
    reference = pipe(class_labels=[2], num_inference_steps=4, output_type="latent", generator=torch.manual_seed(0))
    pipe.scheduler = ENATScheduler.from_config(pipe.scheduler.config, token_order="halton", remasking=0.5)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = ENATScheduler.from_pretrained(tmp_path / "saved", subfolder="scheduler")
    assert (loaded.config.token_order, loaded.config.remasking, loaded.config.mask_token_id) == ("halton", 0.5, MASK)
    halton = pipe(class_labels=[2], num_inference_steps=4, output_type="latent", generator=torch.manual_seed(0))
    assert not torch.equal(halton.images, reference.images)
    # back to the reference: the same images as before the swap; aMUSEd's scheduler takes the config too
    pipe.scheduler = ENATScheduler.from_config(pipe.scheduler.config, token_order="confidence", remasking=0.0)
    again = pipe(class_labels=[2], num_inference_steps=4, output_type="latent", generator=torch.manual_seed(0))
    assert torch.equal(again.images, reference.images)
    assert AmusedScheduler.from_config(loaded.config).config.mask_token_id == MASK
    with pytest.raises(ValueError, match="token_order"):
        ENATScheduler(token_order="random")
    with pytest.raises(ValueError, match="remasking"):
        ENATScheduler(remasking=1.5)


def test_remasking_in_image_to_image_keeps_the_tokens_the_run_started_with():
    """Image-to-image starts later in the schedule from a partly masked grid: the tokens visible then are kept
    context for the later steps, so remasking must leave them alone (else the kept context would not fit)."""
    pipe = ENATImg2ImgPipeline.from_pipe(tiny_pipeline())
    pipe.scheduler = ENATScheduler.from_config(pipe.scheduler.config, remasking=1.0)
    recorder = _Recorder(pipe.transformer)
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(image=pixels, class_labels=[1, 2], strength=0.75, num_inference_steps=8, guidance_scale=3.0,
               output_type="latent", generator=torch.manual_seed(0)).images  # fmt: skip
    recorder.handle.remove()
    start = recorder.calls[0][0][:2]  # the conditional stream's rows at the first step
    visible = start != MASK
    assert visible.any() and (~visible).any()
    assert torch.equal(out[visible], start[visible])
    assert (out != MASK).all()


def test_comparison_summary_gives_mean_and_spread_over_seeds():
    compare = load_example("compare_samplers")
    runs = [
        {"sampler": name, "steps": steps, "seed": seed, "accuracy": accuracy, "fid": fid}
        for name, steps, seed, accuracy, fid in [
            ("reference", 4, 0, 0.9, 0.2), ("reference", 4, 1, 1.0, 0.4), ("halton", 4, 0, 0.5, 1.0),
            ("halton", 4, 1, 0.7, 1.0), ("reference", 8, 0, 0.8, 0.3), ("reference", 8, 1, 0.8, 0.5),
        ]
    ]  # fmt: skip
    summary = {(row["sampler"], row["steps"]): row for row in compare.summarise(runs)}
    assert summary["reference", 4]["accuracy"] == pytest.approx(0.95)
    assert summary["reference", 4]["fid_std"] == pytest.approx(0.1 * 2**0.5)  # sample stdev of (0.2, 0.4)
    assert summary["halton", 4]["fid_std"] == 0.0
    table = compare.markdown_tables({"digits": {"summary": list(summary.values())}}).splitlines()
    assert table[2] == "| reference | 0.950 ± 0.071 / 0.300 ± 0.141 | 0.800 ± 0.000 / 0.400 ± 0.141 |"
    assert table[3] == "| halton | 0.600 ± 0.141 / 1.000 ± 0.000 |  |"  # not run at 8 steps
