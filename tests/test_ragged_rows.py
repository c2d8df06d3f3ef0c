"""A pipeline batch whose rows mask different numbers of tokens (hand-built `latents`): each row is the row alone."""

import pytest
import torch

from .tiny_components import CODEBOOK_SIZE as MASK
from .tiny_components import GRID, tiny_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def _latents(num_masked: list[int], seed: int = 0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK, (len(num_masked), GRID * GRID), generator=generator)
    order = torch.rand(len(num_masked), GRID * GRID, generator=generator).argsort(1).argsort(1)
    return torch.where(order < torch.tensor(num_masked)[:, None], MASK, tokens).reshape(-1, GRID, GRID)


def test_pipeline_rows_with_different_masked_counts_equal_each_row_alone():
    pipe = tiny_pipeline()
    latents = _latents([16, 5, 11, 0])
    labels, seeds = [0, 1, 2, 3], [10, 11, 12, 13]
    common = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "latent"}
    batched = pipe(
        labels, latents=latents, generator=[torch.Generator().manual_seed(s) for s in seeds], **common
    ).images
    assert not (batched == MASK).any()
    given = latents != MASK
    assert torch.equal(batched[given], latents[given])  # given tokens are kept exactly
    for row, (label, seed) in enumerate(zip(labels, seeds, strict=True)):
        alone = pipe(
            [label], latents=latents[row : row + 1], generator=torch.Generator().manual_seed(seed), **common
        ).images
        assert torch.equal(batched[row : row + 1], alone), f"row {row} differs from the row run alone"


def test_every_row_reveals_its_region_over_all_steps():
    pipe = tiny_pipeline()
    latents = _latents([16, 6, 11])
    seen = []

    def record(_pipe, step_index, _timestep, callback_kwargs):
        seen.append((callback_kwargs["latents"] == MASK).flatten(1).sum(1).tolist())
        return callback_kwargs

    pipe(
        [0, 1, 2],
        latents=latents,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    expected = [[pipe.scheduler.num_masked_after_step(k, n) for n in (16, 6, 11)] for k in range(4)]
    assert seen == expected
    assert all(0 < count < start for count, start in zip(seen[1], (16, 6, 11), strict=True))  # no idle row
