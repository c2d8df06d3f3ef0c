"""ENAT attention runs through diffusers' attention dispatch: same logits as plain SDPA, backends selectable."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from enat_diffusers.models.transformer_enat import ENATAttnProcessor

from .tiny_components import CODEBOOK_SIZE as MASK
from .tiny_components import TEXT_LENGTH, TEXT_WIDTH, tiny_text_transformer, tiny_transformer

pytestmark = pytest.mark.usefixtures("single_thread")


class PlainSDPAProcessor:
    """The attention as it was written before the dispatcher: heads split by hand, torch's SDPA called directly."""

    def __call__(self, attn, hidden_states, context_key_values=(), attention_mask=None):
        key_values = [*context_key_values, attn.to_kv(hidden_states)]
        key, value = torch.cat(key_values, dim=1).chunk(2, dim=-1)

        def split(x):
            return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(split(attn.to_q(hidden_states)), split(key), split(value), mask)
        return attn.to_out(attended.transpose(1, 2).flatten(2))


def _ids(num_masked, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (len(num_masked), 16), generator=generator)
    order = torch.rand(len(num_masked), 16, generator=generator).argsort(1).argsort(1)
    return torch.where(order < torch.tensor(num_masked)[:, None], MASK, ids)


def _two_steps(model, condition, num_masked=(10, 10)):
    """A step without and a step with reuse state; returns both logits."""
    before = _ids(num_masked)
    after = torch.where(torch.rand(before.shape, generator=torch.Generator().manual_seed(1)) < 0.5, before, 3)
    with torch.no_grad():
        first = model(before, **condition)
        second = model(after, **condition, reuse_state=first.reuse_state)
    return first.logits, second.logits


def _text_condition():
    generator = torch.Generator().manual_seed(2)
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.long)
    mask[1, 3:] = 0
    return {
        "encoder_hidden_states": torch.randn(2, TEXT_LENGTH, TEXT_WIDTH, generator=generator),
        "encoder_attention_mask": mask,
        "pooled_text_embeds": torch.randn(2, TEXT_WIDTH, generator=generator),
    }


@pytest.mark.parametrize(
    "build, condition, num_masked",
    [
        (tiny_transformer, {"class_labels": torch.tensor([1, 2])}, (10, 10)),
        (tiny_transformer, {"class_labels": torch.tensor([1, 2])}, (10, 4)),  # ragged: a key mask
        (tiny_text_transformer, _text_condition(), (10, 10)),  # padded text: a key mask
    ],
)
def test_dispatched_attention_gives_exactly_the_plain_sdpa_logits(build, condition, num_masked):
    model = build()
    processors = model.attn_processors
    assert processors and all(isinstance(p, ENATAttnProcessor) for p in processors.values())
    dispatched = _two_steps(model, condition, num_masked)
    model.set_attn_processor(PlainSDPAProcessor())
    plain = _two_steps(model, condition, num_masked)
    for a, b in zip(dispatched, plain, strict=True):
        assert torch.equal(a, b)


def _attention_kernels(model):
    ids = _ids((6, 6))
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        model(ids, class_labels=torch.tensor([1, 2]))
    return {event.key for event in prof.key_averages() if event.key.startswith("aten::_scaled_dot_product")}


def test_set_attention_backend_changes_the_kernel_that_runs():
    model = tiny_transformer()
    reference = model(_ids((6, 6)), class_labels=torch.tensor([1, 2])).logits
    default_kernels = _attention_kernels(model)
    try:
        model.set_attention_backend("_native_math")
        math_kernels = _attention_kernels(model)
        math_logits = model(_ids((6, 6)), class_labels=torch.tensor([1, 2])).logits
    finally:
        model.set_attention_backend("native")  # diffusers also sets the process-wide default backend
    assert math_kernels == {"aten::_scaled_dot_product_attention_math"}
    assert math_kernels != default_kernels
    assert torch.allclose(math_logits, reference, atol=1e-5)
    assert _attention_kernels(model) == default_kernels
