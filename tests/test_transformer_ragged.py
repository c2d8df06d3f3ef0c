"""Rows that mask and reuse different numbers of tokens in one batch: each row's result is the row run alone."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from enat_diffusers.models.transformer_enat import ENATTokenGroups

from .tiny_components import CODEBOOK_SIZE as MASK
from .tiny_components import TEXT_LENGTH, TEXT_WIDTH, tiny_text_transformer, tiny_transformer

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_TOKENS = 16
TOLERANCE = 1e-5


def _masked_counts_trajectory(num_masked: list[int], steps: int = 4) -> list[list[int]]:
    """Per step, how many tokens each row still masks: from its own start down to 0, never increasing."""
    return [[start * (steps - 1 - k) // (steps - 1) for start in num_masked] for k in range(steps)]


def _trajectory(num_masked: list[int], seed: int = 0) -> list[torch.LongTensor]:
    """Token ids `(B, 16)` per step: each row reveals its own masked tokens in its own random order."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(num_masked)
    tokens = torch.randint(0, MASK, (batch_size, NUM_TOKENS), generator=generator)
    reveal_order = torch.rand(batch_size, NUM_TOKENS, generator=generator).argsort(dim=1).argsort(dim=1)
    return [
        torch.where(reveal_order < torch.tensor(counts)[:, None], MASK, tokens)
        for counts in _masked_counts_trajectory(num_masked)
    ]


def _class_condition(rows: slice | None = None, batch_size: int = 4) -> dict[str, torch.Tensor]:
    labels = torch.arange(batch_size) % 5
    return {"class_labels": labels if rows is None else labels[rows]}


def _text_condition(rows: slice | None = None, batch_size: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(batch_size, TEXT_LENGTH, dtype=torch.long)
    mask[0, 5:] = 0  # padded prompts too
    mask[2, 2:] = 0
    condition = {
        "encoder_hidden_states": torch.randn(batch_size, TEXT_LENGTH, TEXT_WIDTH, generator=generator),
        "encoder_attention_mask": mask,
        "pooled_text_embeds": torch.randn(batch_size, TEXT_WIDTH, generator=generator),
    }
    return condition if rows is None else {name: value[rows] for name, value in condition.items()}


MODELS = {"class": (tiny_transformer, _class_condition), "text": (tiny_text_transformer, _text_condition)}


def _run_stream(model, steps, condition):
    """Runs one sampling stream with reuse over the steps; returns (logits, features) per step."""
    state, outputs = None, []
    with torch.no_grad():
        for ids in steps:
            output = model(ids, **condition, reuse_state=state)
            state = output.reuse_state
            outputs.append((output.logits, output.reuse_state.features))
    return outputs


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize(
    "num_masked",
    [
        [16, 16, 16, 16],  # generation: equal counts
        [16, 6, 11, 3],  # editing: every row its own region
        [16, 0, 9, 1],  # a fully masked row next to rows with visible tokens, a row with nothing to do
    ],
)
def test_each_row_of_a_ragged_batch_equals_the_row_run_alone_over_a_reuse_trajectory(kind, num_masked):
    build, condition = MODELS[kind]
    model = build()
    steps = _trajectory(num_masked)
    batched = _run_stream(model, steps, condition())
    for row in range(len(num_masked)):
        rows = slice(row, row + 1)
        alone = _run_stream(model, [ids[rows] for ids in steps], condition(rows))
        for k, ((logits, features), (logits_alone, features_alone)) in enumerate(zip(batched, alone, strict=True)):
            assert torch.isfinite(logits).all() and torch.isfinite(features).all()
            error = max((logits[rows] - logits_alone).abs().max(), (features[rows] - features_alone).abs().max())
            assert error < TOLERANCE, f"row {row}, step {k}: differs from the row alone by {error}"


def test_reuse_counts_may_differ_between_rows_with_equal_masked_counts():
    """Both rows mask tokens 0-9 now; row 0 masked the same before (reuses 6), row 1 masked 0-12 (reuses 3)."""
    model = tiny_transformer()
    tokens = torch.randint(0, MASK, (2, NUM_TOKENS), generator=torch.Generator().manual_seed(0))
    after = tokens.clone()
    after[:, :10] = MASK
    before = after.clone()
    before[1, :13] = MASK
    condition = _class_condition(batch_size=2)
    batched = _run_stream(model, [before, after], condition)
    for row in range(2):
        rows = slice(row, row + 1)
        alone = _run_stream(model, [before[rows], after[rows]], _class_condition(rows, batch_size=2))
        assert (batched[1][0][rows] - alone[1][0]).abs().max() < TOLERANCE
        assert (batched[1][1][rows] - alone[1][1]).abs().max() < TOLERANCE


def test_equal_counts_have_no_padding_no_attention_mask_and_no_extra_flops():
    model = tiny_transformer().requires_grad_(False)  # the flop counter's module tracker trips over no_grad params
    steps = _trajectory([16, 16, 16, 16])
    masks = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda _m, args: masks.append(args[2] if len(args) > 2 else None))
        for block in model.blocks
    ]

    def flops(batch_steps, condition):
        with FlopCounterMode(display=False) as counter:
            _run_stream(model, batch_steps, condition)
        return counter.get_total_flops()

    batched = flops(steps, _class_condition())
    for hook in hooks:
        hook.remove()
    per_row = [flops([ids[row : row + 1] for ids in steps], _class_condition(slice(row, row + 1))) for row in range(4)]
    assert masks and all(mask is None for mask in masks)
    assert batched == sum(per_row)

    # a ragged batch pays for its padding (and says so through the mask)
    ragged = _trajectory([16, 6, 11, 3])
    assert flops(ragged, _class_condition()) > sum(
        flops([ids[row : row + 1] for ids in ragged], _class_condition(slice(row, row + 1))) for row in range(4)
    )


def test_groups_of_equal_counts_are_todays_stable_sort_order():
    masking = torch.rand(3, NUM_TOKENS, generator=torch.Generator().manual_seed(0)).argsort(1) < 5
    previous = masking | (torch.rand(3, NUM_TOKENS, generator=torch.Generator().manual_seed(1)).argsort(1) < 4)
    reused = ~previous
    # equalise reused counts
    reused_counts = reused.sum(1)
    for row in range(3):
        extra = reused_counts[row] - reused_counts.min()
        reused[row, reused[row].nonzero()[:extra, 0]] = False
    groups = ENATTokenGroups.from_masks(masking, reused, masking.sum(1).tolist(), reused.sum(1).tolist())
    group = masking.to(torch.int8) * 2 + (~reused).to(torch.int8)
    assert groups.valid is None
    assert torch.equal(groups.order, torch.sort(group, dim=1, stable=True).indices)
    assert groups.sizes == (reused.sum(1)[0].item(), 16 - 5 - reused.sum(1)[0].item(), 5)


def test_ragged_groups_pad_each_group_to_its_largest_row():
    masking = torch.zeros(2, NUM_TOKENS, dtype=torch.bool)
    masking[0, :3] = True
    masking[1, 10:] = True
    reused = torch.zeros_like(masking)
    reused[0, 3:5] = True
    groups = ENATTokenGroups.from_masks(masking, reused, [3, 6], [2, 0])
    assert groups.sizes == (2, 11, 6)
    assert groups.order[0].tolist() == [3, 4, *range(5, 16), 0, 1, 2, 16, 16, 16]
    assert groups.order[1].tolist() == [16, 16, *range(10), 16, 10, 11, 12, 13, 14, 15]
    assert torch.equal(groups.valid, groups.order < NUM_TOKENS)


def test_gradient_checkpointing_works_on_ragged_rows():
    model = tiny_transformer()
    model.train()
    model.config.class_dropout_prob = 0.0  # no random label dropout between the two runs
    ids = _trajectory([16, 6, 11, 0])[1]
    condition = _class_condition()

    def gradients():
        model.zero_grad()
        torch.manual_seed(0)  # same embedding dropout in both runs
        model(ids, **condition).logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.isfinite(g).all() for g in plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))
