"""Tests of `ENATScheduler`: parity with the reference sampler, schedule, randomness, errors and aMUSEd interop.

The parity data (`fixtures/scheduler_reference.safetensors`) comes from `conversion/make_scheduler_fixtures.py`,
which runs the reference `NATSchedule.generate` with a stand-in network and records every random draw.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AmusedScheduler
from safetensors import safe_open

from enat_diffusers.schedulers import scheduling_enat
from enat_diffusers.schedulers.scheduling_enat import ENATScheduler, ENATSchedulerOutput

from .tiny_components import public_config, tiny_clip

FIXTURE = Path(__file__).parent / "fixtures" / "scheduler_reference.safetensors"
SCHEDULES = ("cosine", "linear", "arccos", "pow")


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(FIXTURE), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        cases = json.loads(f.metadata()["cases"])
    return tensors, cases


def _run(scheduler, logits_fn, sample, steps, generator=None, step_kwargs=None, **set_kwargs):
    """Run a whole generation; `logits_fn(k, ids)` gives the step's logits. Returns the list of step outputs."""
    scheduler.set_timesteps(steps, **set_kwargs)
    outputs = []
    for k, t in enumerate(scheduler.timesteps):
        out = scheduler.step(logits_fn(k, sample), t, sample, generator=generator, **(step_kwargs or {}))
        outputs.append(out)
        sample = out.prev_sample
    return outputs


def _random_logits(steps, batch, classes, seq_len, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, batch, classes, seq_len, generator=g) * scale


# ---------------------------------------------------------------------------------------------------------------
# parity with the reference sampler


@pytest.mark.parametrize(("case", "layout"), [("case_a", "2d"), ("case_b", "flat")])
def test_replays_reference_sampler(reference, monkeypatch, case, layout):
    tensors, cases = reference
    cfg = cases[case]
    steps, batch, side, classes = cfg["steps"], cfg["batch"], cfg["latent"], cfg["codebook"]
    t = {name: tensors[f"{case}.{name}"] for name in ("ids_in", "cond", "uncond", "cat_logits", "samples", "gumbel")}
    ids_out = tensors[f"{case}.ids_out"]

    scheduler = ENATScheduler(
        mask_token_id=cfg["mask_token_id"], mask_temperature=cfg["mask_temp"], sample_temperature=cfg["samp_temp"]
    )
    scheduler.set_timesteps(steps)
    current = {}

    def fake_samples(logits, generator=None):
        k = current["k"]
        assert logits.shape == (batch, side * side, classes)
        # the reference's Categorical saw the same distribution (sampling temperature and log_softmax agree)
        torch.testing.assert_close(torch.log_softmax(logits, -1), t["cat_logits"][k], atol=2e-5, rtol=1e-5)
        return t["samples"][k].clone()

    def fake_gumbel(shape, generator=None, device=None):
        assert tuple(shape) == (batch, side * side)
        return t["gumbel"][current["k"]].clone()

    monkeypatch.setattr(scheduler, "draw_token_samples", fake_samples)
    monkeypatch.setattr(scheduler, "draw_gumbel_noise", fake_gumbel)

    def to_layout(x, is_logits):
        if layout == "flat":
            return x.transpose(1, 2) if is_logits else x
        return x.transpose(1, 2).reshape(batch, classes, side, side) if is_logits else x.reshape(batch, side, side)

    sample = to_layout(torch.full((batch, side * side), cfg["mask_token_id"]), False)
    for k, timestep in enumerate(scheduler.timesteps):
        current["k"] = k
        assert torch.equal(sample.reshape(batch, -1), t["ids_in"][k])
        weight = (1.0 * k / steps) * cfg["cfg"]  # the reference's guidance weight at step k
        guided = t["cond"][k] + weight * (t["cond"][k] - t["uncond"][k])
        out = scheduler.step(to_layout(guided, True), timestep, sample)
        assert out.prev_sample.shape == sample.shape
        assert torch.equal(out.prev_sample.reshape(batch, -1), ids_out[k]), f"step {k} differs from the reference"
        sample = out.prev_sample
    assert torch.equal(out.pred_original_sample.reshape(batch, -1), ids_out[-1])
    assert not (sample == cfg["mask_token_id"]).any()


@pytest.mark.parametrize("steps", [4, 8, 12, 16])
@pytest.mark.parametrize("seq_len", [256, 1024])
def test_masked_counts_match_reference(reference, steps, seq_len):
    expected = reference[0][f"counts.T{steps}.L{seq_len}"].tolist()
    scheduler = ENATScheduler(mask_token_id=4)
    logits = _random_logits(steps, 2, 4, seq_len, seed=steps + seq_len, scale=1.0)
    sample = torch.full((2, seq_len), 4)
    outputs = _run(scheduler, lambda k, ids: logits[k], sample, steps, generator=torch.Generator().manual_seed(0))
    for k, out in enumerate(outputs):
        assert out.mask.sum(dim=1).tolist() == [expected[k]] * 2
        assert scheduler.num_masked_after_step(k, seq_len) == expected[k]


def test_model_output_dtype_does_not_matter():
    logits = torch.randn(2, 16, 4, 4).to(torch.bfloat16)
    sample = torch.full((2, 4, 4), 16)
    results = []
    for x in (logits, logits.float()):
        scheduler = ENATScheduler(mask_token_id=16)
        scheduler.set_timesteps(4)
        results.append(scheduler.step(x, scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(results[0].prev_sample, results[1].prev_sample)


# ---------------------------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_are_monotone_and_end_fully_revealed(schedule):
    scheduler = ENATScheduler(masking_schedule=schedule, masking_schedule_power=3.0)
    for steps in (1, 2, 5, 8, 13):
        scheduler.set_timesteps(steps)
        for seq_len in (1, 7, 256):
            counts = [seq_len] + [scheduler.num_masked_after_step(k, seq_len) for k in range(steps)]
            assert all(a >= b for a, b in zip(counts, counts[1:], strict=False)), (schedule, steps, seq_len, counts)
            assert counts[-1] == 0


def test_schedule_formulas():
    seq_len, steps = 1000, 4
    ratios = [(k + 1) / steps for k in range(steps)]
    expected = {
        "linear": [1 - r for r in ratios],
        "arccos": [math.acos(r) * 2 / math.pi for r in ratios],
        "pow": [1 - r**3.0 for r in ratios],
    }
    for schedule, fractions in expected.items():
        scheduler = ENATScheduler(masking_schedule=schedule, masking_schedule_power=3.0)
        scheduler.set_timesteps(steps)
        got = [scheduler.num_masked_after_step(k, seq_len) for k in range(steps)]
        assert got == [math.floor(seq_len * f + 1e-9) for f in fractions], schedule
    # the schedules are really different from each other
    assert len({tuple(expected[s]) for s in expected}) == 3


def test_timesteps_like_amused():
    ours, amused = ENATScheduler(mask_token_id=31), AmusedScheduler(mask_token_id=31)
    ours.set_timesteps(7)
    amused.set_timesteps(7)
    assert torch.equal(ours.timesteps, amused.timesteps)
    assert ours.init_noise_sigma == 1.0
    x = torch.zeros(1, 4, dtype=torch.long)
    assert ours.scale_model_input(x, 3) is x


# ---------------------------------------------------------------------------------------------------------------
# step semantics


def test_outputs_are_consistent_over_a_generation():
    mask_id, batch, classes, side, steps = 40, 3, 40, 6, 6
    logits = _random_logits(steps, batch, classes, side * side, seed=5).reshape(steps, batch, classes, side, side)
    scheduler = ENATScheduler(mask_token_id=mask_id)
    sample = torch.full((batch, side, side), mask_id)
    outputs = _run(scheduler, lambda k, ids: logits[k], sample, steps, generator=torch.Generator().manual_seed(1))
    before = sample
    for out in outputs:
        assert isinstance(out, ENATSchedulerOutput)
        was_masked = before == mask_id
        for field in (out.prev_sample, out.pred_original_sample, out.mask, out.critical_tokens):
            assert field.shape == sample.shape
        assert out.mask.dtype == torch.bool and out.critical_tokens.dtype == torch.bool
        assert torch.equal(out.mask, out.prev_sample == mask_id)
        assert torch.equal(out.critical_tokens, was_masked & ~out.mask)
        assert not (out.mask & ~was_masked).any()
        assert not (out.pred_original_sample == mask_id).any()
        assert torch.equal(out.pred_original_sample[~was_masked], before[~was_masked])
        assert torch.equal(torch.where(out.mask, mask_id, out.pred_original_sample), out.prev_sample)
        counts = out.mask.flatten(1).sum(1)
        assert (counts == counts[0]).all()
        assert torch.equal(
            out.critical_tokens.flatten(1).sum(1), was_masked.flatten(1).sum(1) - counts
        )  # revealed = masked before - masked after
        before = out.prev_sample
    assert not outputs[-1].mask.any()
    as_tuple = ENATScheduler(mask_token_id=mask_id)
    as_tuple.set_timesteps(steps)
    tup = as_tuple.step(logits[0], 5, sample, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 4
    assert torch.equal(tup[0], outputs[0].prev_sample)


def test_visible_tokens_never_change():
    mask_id, seq_len = 16, 64
    g = torch.Generator().manual_seed(0)
    sample = torch.randint(0, 16, (2, seq_len), generator=g)
    masked = torch.zeros(2, seq_len, dtype=torch.bool)
    masked[:, torch.randperm(seq_len, generator=g)[:10]] = True
    sample[masked] = mask_id
    # logits that strongly prefer a token no visible position holds
    logits = torch.full((2, 16, seq_len), -20.0)
    logits[:, 15] = 20.0
    sample[sample == 15] = 14
    scheduler = ENATScheduler(mask_token_id=mask_id)
    scheduler.set_timesteps(8)
    for t in scheduler.timesteps[:3]:  # the schedule asks for more masked tokens than there are
        out = scheduler.step(logits, t, sample, generator=torch.Generator().manual_seed(int(t)))
        assert torch.equal(out.prev_sample[~masked], sample[~masked])
        assert torch.equal(out.pred_original_sample[~masked], sample[~masked])
        assert not (out.mask & ~masked).any()
    last = scheduler.step(logits, scheduler.timesteps[-1], sample)
    assert torch.equal(last.prev_sample[masked], torch.full((20,), 15))


def test_temperatures_follow_set_timesteps():
    scheduler = ENATScheduler(mask_temperature=1.5)
    ratios = torch.arange(1, 9, dtype=torch.float64) / 8
    scheduler.set_timesteps(8)
    torch.testing.assert_close(scheduler.temperatures, 1.5 * (1 - ratios))
    scheduler.set_timesteps(8, 0.5)
    torch.testing.assert_close(scheduler.temperatures, 0.5 * (1 - ratios))
    scheduler.set_timesteps(5, (3, 1))
    torch.testing.assert_close(scheduler.temperatures, torch.linspace(3, 1, 5, dtype=torch.float64))
    scheduler.set_timesteps(1, [2.0, 0.0])
    assert scheduler.temperatures.tolist() == [2.0]
    assert scheduler.config.mask_temperature == 1.5  # a per-run override does not touch the config


def test_temperature_controls_which_tokens_are_masked(monkeypatch):
    """With zero Gumbel scale the least likely samples are masked; with a huge one the noise decides."""
    seq_len, classes, mask_id = 32, 8, 8
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, classes, seq_len, generator=g) * 4
    noise = torch.randn(1, seq_len, generator=g)
    scheduler = ENATScheduler(mask_token_id=mask_id)
    monkeypatch.setattr(scheduler, "draw_token_samples", lambda x, generator=None: x.argmax(-1))
    monkeypatch.setattr(scheduler, "draw_gumbel_noise", lambda shape, generator=None, device=None: noise.clone())
    sample = torch.full((1, seq_len), mask_id)
    log_probs = torch.log_softmax(logits, 1).max(1).values[0]

    for temperature, score in (((0.0, 0.0), log_probs), ((1e6, 1e6), noise[0]), (1e6, noise[0])):
        scheduler.set_timesteps(4, temperature)
        out = scheduler.step(logits, 3, sample)
        n = scheduler.num_masked_after_step(0, seq_len)
        expected = torch.zeros(seq_len, dtype=torch.bool)
        expected[score.argsort()[:n]] = True
        assert torch.equal(out.mask[0], expected), temperature


# ---------------------------------------------------------------------------------------------------------------
# randomness


def test_generator_list_reproduces_each_row_alone():
    mask_id, batch, classes, seq_len, steps = 20, 2, 20, 49, 5
    logits = _random_logits(steps, batch, classes, seq_len, seed=9)
    seeds = (11, 12)
    scheduler = ENATScheduler(mask_token_id=mask_id)
    full = _run(
        scheduler,
        lambda k, ids: logits[k],
        torch.full((batch, seq_len), mask_id),
        steps,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    for i, seed in enumerate(seeds):
        alone = _run(
            scheduler,
            lambda k, ids, i=i: logits[k, i : i + 1],
            torch.full((1, seq_len), mask_id),
            steps,
            generator=torch.Generator().manual_seed(seed),
        )
        for a, b in zip(full, alone, strict=True):
            assert torch.equal(a.prev_sample[i : i + 1], b.prev_sample)
            assert torch.equal(a.pred_original_sample[i : i + 1], b.pred_original_sample)
    noise = scheduler.draw_gumbel_noise((2, 7), [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(noise[1:], scheduler.draw_gumbel_noise((1, 7), torch.Generator().manual_seed(12)))


def test_same_seed_same_output_other_seed_differs():
    mask_id, seq_len, steps = 64, 100, 4
    logits = _random_logits(steps, 2, 64, seq_len, seed=4, scale=0.5)

    def generate(seed):
        scheduler = ENATScheduler(mask_token_id=mask_id)
        outs = _run(
            scheduler,
            lambda k, ids: logits[k],
            torch.full((2, seq_len), mask_id),
            steps,
            generator=torch.Generator().manual_seed(seed),
        )
        return torch.stack([o.prev_sample for o in outs[:-1]] + [outs[-1].pred_original_sample])

    assert torch.equal(generate(0), generate(0))
    assert not torch.equal(generate(0), generate(1))
    # generator=None draws from the global random state
    scheduler = ENATScheduler(mask_token_id=mask_id)
    scheduler.set_timesteps(steps)
    torch.manual_seed(5)
    a = scheduler.step(logits[0], 3, torch.full((2, seq_len), mask_id)).prev_sample
    torch.manual_seed(5)
    b = scheduler.step(logits[0], 3, torch.full((2, seq_len), mask_id)).prev_sample
    assert torch.equal(a, b)


def test_default_draws_have_the_right_distribution():
    scheduler = ENATScheduler()
    g = torch.Generator().manual_seed(0)
    noise = scheduler.draw_gumbel_noise((200, 500), g)
    assert noise.dtype == torch.float32 and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni constant
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log().expand(4, 5000, 3)
    drawn = scheduler.draw_token_samples(logits, g)
    assert drawn.shape == (4, 5000) and drawn.dtype == torch.long
    freq = torch.bincount(drawn.flatten(), minlength=3).float() / drawn.numel()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# masked regions: the schedule applies to each row's own region


def _masked_rows(num_masked, seq_len=16, seed=0, mask_id=16):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randint(0, mask_id, (len(num_masked), seq_len), generator=g)
    order = torch.rand(len(num_masked), seq_len, generator=g).argsort(1).argsort(1)
    return torch.where(order < torch.tensor(num_masked)[:, None], mask_id, sample)


def test_partly_masked_row_reveals_its_region_over_all_steps():
    """6 of 16 tokens masked, 8 steps: the region follows the cosine schedule instead of waiting for the grid's."""
    steps = 8
    logits = _random_logits(steps, 1, 16, 16, seed=1)
    scheduler = ENATScheduler(mask_token_id=16)
    sample = _masked_rows([6])
    region = {"region_mask": sample == 16}
    outputs = _run(scheduler, lambda k, ids: logits[k], sample, steps, torch.Generator().manual_seed(0), region)
    counts = [int(out.mask.sum()) for out in outputs]
    assert counts == [math.floor(6 * math.cos(math.pi / 2 * (k + 1) / steps)) for k in range(steps)]
    assert counts == [5, 5, 4, 4, 3, 2, 1, 0]
    # the region is explicit per-call state: without it the schedule is the whole grid's (aMUSEd's convention)
    outputs = _run(scheduler, lambda k, ids: logits[k], sample, steps, torch.Generator().manual_seed(0))
    assert [int(out.mask.sum()) for out in outputs] == [6, 6, 6, 6, 6, 6, 3, 0]
    assert not hasattr(scheduler, "region_sizes")


def test_rows_with_different_regions_each_follow_their_own_schedule_and_equal_the_row_alone():
    steps, num_masked, seeds = 5, [16, 6, 0, 11], (3, 4, 5, 6)
    logits = _random_logits(steps, 4, 16, 16, seed=2)
    sample = _masked_rows(num_masked)
    scheduler = ENATScheduler(mask_token_id=16)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    batched = _run(scheduler, lambda k, ids: logits[k], sample, steps, generators, {"region_mask": sample == 16})
    for row, (region, seed) in enumerate(zip(num_masked, seeds, strict=True)):
        expected = [scheduler.num_masked_after_step(k, region) for k in range(steps)]
        assert [int(out.mask[row].sum()) for out in batched] == expected
        alone = _run(
            ENATScheduler(mask_token_id=16),
            lambda k, ids, row=row: logits[k, row : row + 1],
            sample[row : row + 1],
            steps,
            torch.Generator().manual_seed(seed),
            {"region_mask": sample[row : row + 1] == 16},
        )
        for a, b in zip(batched, alone, strict=True):
            assert torch.equal(a.prev_sample[row : row + 1], b.prev_sample)
            assert torch.equal(a.pred_original_sample[row : row + 1], b.pred_original_sample)
    assert not batched[-1].mask.any()


def test_region_comes_from_starting_mask_ratio_then_region_mask_else_is_the_grid():
    scheduler = ENATScheduler(mask_token_id=16)
    scheduler.set_timesteps(4)
    logits = _random_logits(1, 2, 16, 16, seed=3)[0]
    # a run that starts at step 1 (image-to-image after add_noise): the region is the whole grid
    noisy = scheduler.add_noise(torch.zeros(2, 16, dtype=torch.long), scheduler.timesteps[0])
    out = scheduler.step(logits, scheduler.timesteps[1], noisy)
    assert out.mask.sum(1).tolist() == [scheduler.num_masked_after_step(1, 16)] * 2
    # an explicit ratio per row (aMUSEd's argument) wins over what the first step sees
    sample = _masked_rows([8, 8])
    out = scheduler.step(logits, scheduler.timesteps[0], sample, starting_mask_ratio=torch.tensor([0.5, 0.25]))
    assert out.mask.sum(1).tolist() == [scheduler.num_masked_after_step(0, 8), scheduler.num_masked_after_step(0, 4)]
    out = scheduler.step(logits, scheduler.timesteps[0], sample, starting_mask_ratio=0.25)
    assert out.mask.sum(1).tolist() == [scheduler.num_masked_after_step(0, 4)] * 2
    # region_mask sizes each row's region; the ratio wins over it (image-to-image passes 1.0: the whole grid)
    out = scheduler.step(logits, scheduler.timesteps[1], sample, region_mask=sample == 16)
    assert out.mask.sum(1).tolist() == [scheduler.num_masked_after_step(1, 8)] * 2
    out = scheduler.step(logits, scheduler.timesteps[1], sample, region_mask=sample == 16, starting_mask_ratio=1.0)
    assert out.mask.sum(1).tolist() == [min(8, scheduler.num_masked_after_step(1, 16))] * 2
    for bad in ("half", 1.5, torch.tensor([0.1, 0.2, 0.3])):
        with pytest.raises(ValueError, match="starting_mask_ratio"):
            scheduler.step(logits, scheduler.timesteps[0], sample, starting_mask_ratio=bad)
    with pytest.raises(ValueError, match="region_mask"):
        scheduler.step(logits, scheduler.timesteps[0], sample, region_mask=(sample == 16).long())


# ---------------------------------------------------------------------------------------------------------------
# training noise


def test_add_noise_masks_the_schedule_count(reference):
    expected = reference[0]["counts.T8.L256"].tolist()
    scheduler = ENATScheduler(mask_token_id=1024)
    scheduler.set_timesteps(8)
    clean = torch.randint(0, 1024, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(scheduler.timesteps):
        noisy = scheduler.add_noise(clean, t, generator=torch.Generator().manual_seed(k))
        is_masked = noisy == 1024
        assert noisy.shape == clean.shape
        assert is_masked.flatten(1).sum(1).tolist() == [expected[k]] * 3
        assert torch.equal(noisy[~is_masked], clean[~is_masked])
    # rows are masked at different positions, reproducibly, and a list of generators works row by row
    noisy = scheduler.add_noise(clean, torch.tensor(5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, scheduler.add_noise(clean, 5, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(noisy[0] == 1024, noisy[1] == 1024)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    per_row = scheduler.add_noise(clean, 5, generator=gens)
    assert torch.equal(per_row[2:], scheduler.add_noise(clean[2:], 5, generator=torch.Generator().manual_seed(5)))
    # one timestep per batch only
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.add_noise(clean, torch.tensor([5, 4, 5]))


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="masking_schedule.*cosine.*linear.*arccos.*pow"):
        ENATScheduler(masking_schedule="sigmoid")
    with pytest.raises(ValueError, match="masking_schedule_power"):
        ENATScheduler(masking_schedule_power=0)
    with pytest.raises(ValueError, match="sample_temperature_floor"):
        ENATScheduler(sample_temperature_floor=0.0)
    with pytest.raises(ValueError, match="mask_token_id"):
        ENATScheduler(mask_token_id=-1)

    scheduler = ENATScheduler(mask_token_id=16)
    logits, sample = torch.randn(1, 16, 4, 4), torch.full((1, 4, 4), 16)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(logits, 0, sample)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(2.5)
    with pytest.raises(ValueError, match="temperature"):
        scheduler.set_timesteps(4, "hot")
    with pytest.raises(ValueError, match="temperature"):
        scheduler.set_timesteps(4, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="temperature"):
        scheduler.set_timesteps(4, -1.0)

    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(logits, 4, sample)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(1, 16, 4, 5), 3, sample)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(1, 16, 16), 3, sample)
    with pytest.raises(ValueError, match="mask_token_id"):
        scheduler.step(torch.randn(1, 17, 4, 4), 3, sample)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.ones(1, 16, 4, 4, dtype=torch.long), 3, sample)
    with pytest.raises(ValueError, match="sample"):
        scheduler.step(logits, 3, sample.float())
    with pytest.raises(ValueError, match="generator"):
        scheduler.step(logits, 3, sample, generator=[torch.Generator(), torch.Generator()])


# ---------------------------------------------------------------------------------------------------------------
# interop with diffusers' aMUSEd


def test_module_exposes_scheduler_mixin_for_diffusers_loader():
    from diffusers import SchedulerMixin

    assert getattr(scheduling_enat, "SchedulerMixin") is SchedulerMixin  # noqa: B009
    assert issubclass(ENATScheduler, SchedulerMixin)


def test_from_config_swaps_both_ways(tmp_path):
    amused = AmusedScheduler(mask_token_id=8255)
    ours = ENATScheduler.from_config(amused.config, masking_schedule="linear")
    assert isinstance(ours, ENATScheduler)
    assert ours.config.mask_token_id == 8255 and ours.config.masking_schedule == "linear"
    assert ours.config.mask_temperature == 1.5

    ours = ENATScheduler(mask_token_id=77, masking_schedule="linear", mask_temperature=2.0)
    back = AmusedScheduler.from_config(ours.config)
    assert isinstance(back, AmusedScheduler)
    assert back.config.mask_token_id == 77 and back.config.masking_schedule == "linear"
    back.set_timesteps(3)
    out = back.step(torch.randn(1, 8, 4, 4), back.timesteps[0], torch.full((1, 4, 4), 77))
    assert out.prev_sample.shape == (1, 4, 4)

    ours.save_pretrained(tmp_path)
    loaded = ENATScheduler.from_pretrained(tmp_path)
    assert public_config(loaded.config) == public_config(ours.config)


def _tiny_amused_pipeline(tmp_path, scheduler, pipeline_class=None):
    from diffusers import AmusedPipeline, UVit2DModel, VQModel

    pipeline_class = pipeline_class or AmusedPipeline

    text_encoder, tokenizer = tiny_clip(tmp_path)
    transformer = UVit2DModel(
        hidden_size=8,
        cond_embed_dim=8,
        micro_cond_encode_dim=2,
        micro_cond_embed_dim=10,
        encoder_hidden_size=8,
        vocab_size=32,
        codebook_size=31,  # the mask id (31) is not a codebook entry
        in_channels=8,
        block_out_channels=8,
        num_res_blocks=1,
        downsample=True,
        upsample=True,
        block_num_heads=1,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
    )
    vqvae = VQModel(
        block_out_channels=[8],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=8,
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=32,
        sample_size=8,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
    )
    pipe = pipeline_class(
        vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_runs_inside_amused_pipeline(tmp_path):
    scheduler = ENATScheduler(mask_token_id=31)
    pipe = _tiny_amused_pipeline(tmp_path, scheduler)
    steps = []
    original_step = scheduler.step

    def spy(*args, **kwargs):
        out = original_step(*args, **kwargs)
        steps.append(out)
        return out

    scheduler.step = spy
    common = {"prompt": "a cat", "height": 8, "width": 8, "num_inference_steps": 4, "guidance_scale": 2.0}
    image = pipe(**common, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 8, 8, 3) and image.min() >= 0 and image.max() <= 1
    assert len(steps) == 4
    assert [int(o.mask.sum()) for o in steps] == [scheduler.num_masked_after_step(k, 64) for k in range(4)]
    # AmusedPipeline passes its default temperature (2, 0): the pair form, a linear anneal
    torch.testing.assert_close(scheduler.temperatures, torch.linspace(2, 0, 4, dtype=torch.float64))

    latents = pipe(**common, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latents.shape == (1, 8, 8)  # vae_scale_factor 1
    assert not (latents == 31).any() and latents.max() < 31
    pil = pipe(**common, temperature=(3.0, 1.0), generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (8, 8)
    torch.testing.assert_close(scheduler.temperatures, torch.tensor([3.0, 7 / 3, 5 / 3, 1.0], dtype=torch.float64))


def _spy_steps(scheduler):
    steps = []
    original_step = scheduler.step

    def spy(*args, **kwargs):
        out = original_step(*args, **kwargs)
        steps.append((kwargs, out))
        return out

    scheduler.step = spy
    return steps


def _image_and_mask():
    from PIL import Image

    pixels = (torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[:, :3] = 255  # regenerate the three left columns: 24 of 64 tokens
    return Image.fromarray(pixels), Image.fromarray(mask.numpy())


def test_runs_inside_amused_inpaint_pipeline(tmp_path):
    from diffusers import AmusedInpaintPipeline

    scheduler = ENATScheduler(mask_token_id=31)
    pipe = _tiny_amused_pipeline(tmp_path, scheduler, AmusedInpaintPipeline)
    steps = _spy_steps(scheduler)
    image, mask = _image_and_mask()
    common = {"prompt": "a cat", "image": image, "mask_image": mask, "num_inference_steps": 4, "guidance_scale": 2.0}
    latents = pipe(**common, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert len(steps) == 4 and all("starting_mask_ratio" in kwargs for kwargs, _ in steps)
    # the pipeline switches the schedule to linear; the 24 masked tokens follow it, not the grid's 64
    assert scheduler.config.masking_schedule == "linear"
    assert [int(out.mask.sum()) for _, out in steps] == [18, 12, 6, 0]
    encoded = pipe.vqvae.quantize(pipe.vqvae.encode(pipe.image_processor.preprocess(image)).latents)[2][2]
    encoded = encoded.reshape(1, 8, 8)
    assert torch.equal(latents[..., 3:], encoded[..., 3:])  # tokens outside the mask are the input's
    assert not (latents == 31).any()


def test_runs_inside_amused_img2img_pipeline(tmp_path):
    from diffusers import AmusedImg2ImgPipeline

    scheduler = ENATScheduler(mask_token_id=31)
    pipe = _tiny_amused_pipeline(tmp_path, scheduler, AmusedImg2ImgPipeline)
    steps = _spy_steps(scheduler)
    image, _ = _image_and_mask()
    latents = pipe(
        "a cat",
        image=image,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    # strength 0.5: add_noise masks the grid as after step 1, the run does steps 2 and 3 on the whole grid's schedule
    assert [int(out.mask.sum()) for _, out in steps] == [scheduler.num_masked_after_step(2, 64), 0]
    assert latents.shape == (1, 8, 8) and not (latents == 31).any()
