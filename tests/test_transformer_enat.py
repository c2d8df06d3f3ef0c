"""Behaviour of ENATTransformer2DModel beyond reference parity: shapes, reuse bookkeeping, errors, training aids."""

import pytest
import torch

from enat_diffusers.models.transformer_enat import ENATConditioning, ENATReuseState, ENATTransformer2DModel

from .tiny_components import TINY_TRANSFORMER_CONFIG as TINY
from .tiny_components import public_config

MASK = TINY["codebook_size"]


def _randomize(model: ENATTransformer2DModel) -> ENATTransformer2DModel:
    """Random adaLN weights so that no block is an identity map, as after training."""
    with torch.no_grad():
        for block in [*model.encoder_blocks, *model.decoder_blocks]:
            block.adaln_modulation.weight.normal_(0, 0.1)
            block.adaln_modulation.bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return _randomize(ENATTransformer2DModel(**TINY))


def _ids(batch_size=2, num_masked=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (batch_size, 16), generator=generator)
    order = torch.rand(batch_size, 16, generator=generator).argsort(dim=1)
    ids[order < num_masked] = MASK
    return ids


def test_logits_layout_and_both_input_shapes(model):
    ids = _ids()
    labels = torch.tensor([1, 2])
    flat = model(ids, class_labels=labels)
    grid = model(ids.reshape(2, 4, 4), class_labels=labels)
    assert flat.logits.shape == (2, MASK, 4, 4)
    assert torch.equal(flat.logits, grid.logits)
    assert flat.reuse_state.features.shape == (2, 16, 32)
    assert torch.equal(flat.reuse_state.masking, ids == MASK)
    logits, state, conditioning = model(ids, class_labels=labels, return_dict=False)
    assert torch.equal(logits, flat.logits) and isinstance(state, ENATReuseState)
    assert conditioning.modulation.shape == (2, 3, 8 * 32)


def test_rows_are_independent(model):
    ids = _ids()
    labels = torch.tensor([1, 2])
    batched = model(ids, class_labels=labels).logits
    single = model(ids[1:], class_labels=labels[1:]).logits
    assert torch.allclose(batched[1:], single, atol=1e-5)


def test_reuse_state_is_used_and_only_critical_tokens_are_encoded(model):
    labels = torch.tensor([1, 2])
    before = _ids(num_masked=10)
    after = before.clone()
    # reveal two masked tokens per row
    for row in range(2):
        masked_positions = (before[row] == MASK).nonzero().flatten()[:2]
        after[row, masked_positions] = 3
    state = model(before, class_labels=labels).reuse_state
    reused = model(after, class_labels=labels, reuse_state=state)
    recomputed = model(after, class_labels=labels)
    assert not torch.allclose(reused.logits, recomputed.logits, atol=1e-4)

    calls = []
    hook = model.encoder_blocks[0].register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[1]))
    model(after, class_labels=labels, reuse_state=state)
    model(after, class_labels=labels)
    hook.remove()
    assert calls == [2, 16 - 8]


def test_previously_visible_features_come_from_the_projection_of_the_old_features(model):
    labels = torch.tensor([1, 2])
    before = _ids(num_masked=10)
    state = model(before, class_labels=labels).reuse_state
    output = model(before, class_labels=labels, reuse_state=state)
    visible = ~state.masking
    projected = model.reuse_proj(state.features)
    assert torch.allclose(output.reuse_state.features[visible], projected[visible], atol=1e-6)


def test_fully_masked_step_skips_the_encoder(model):
    ids = torch.full((2, 16), MASK)
    calls = []
    hook = model.encoder_blocks[0].register_forward_hook(lambda *_: calls.append(1))
    output = model(ids, class_labels=torch.tensor([0, 5]))
    hook.remove()
    assert calls == [] and torch.isfinite(output.logits).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.full((2, 16), MASK + 1)}, "input_ids` must lie in"),
        ({"input_ids": torch.full((2, 16), -1)}, "input_ids` must lie in"),
        ({"input_ids": torch.zeros(2, 25, dtype=torch.long)}, "trained on a 4x4 token grid"),
        ({"input_ids": torch.zeros(2, 5, 5, dtype=torch.long)}, "trained on a 4x4 token grid"),
        ({"input_ids": torch.zeros(2, 16)}, "integer torch.Tensor"),
        ({"class_labels": None}, "`class_labels` is required"),
        ({"class_labels": torch.tensor([0, 6])}, "`class_labels` must lie in"),
        ({"class_labels": torch.tensor([0, 1, 2])}, "must hold 2 labels"),
        ({"encoder_hidden_states": torch.zeros(2, 3, 32)}, "class-conditional"),
    ],
)
def test_bad_inputs_are_rejected(model, kwargs, message):
    arguments = {"input_ids": _ids(), "class_labels": torch.tensor([1, 2]), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        model(**arguments)


def test_returned_conditioning_replaces_the_labels_and_skips_the_adaln_projections(model):
    labels = torch.tensor([1, 2])
    first = model(_ids(num_masked=10), class_labels=labels)
    projections = []
    hooks = [block.adaln_modulation.register_forward_hook(lambda *_: projections.append(1)) for block in model.blocks]
    ids = _ids(num_masked=6)
    with_labels = model(ids, class_labels=labels)
    assert len(projections) == len(model.blocks)
    reused = model(ids, conditioning=first.conditioning)
    for hook in hooks:
        hook.remove()
    assert len(projections) == len(model.blocks)  # none more
    assert torch.equal(reused.logits, with_labels.logits)
    other_class = model(ids, class_labels=torch.tensor([3, 4])).logits
    assert not torch.allclose(other_class, with_labels.logits, atol=1e-4)


def test_step_states_survive_accelerate_device_moves(model):
    """Offloading hooks rebuild the outputs passed back as inputs (`send_to_device`): they must keep their type."""
    from accelerate.utils import send_to_device

    output = model(_ids(), class_labels=torch.tensor([1, 2]))
    for state in (output.reuse_state, output.conditioning):
        moved = send_to_device(state, "cpu")
        assert type(moved) is type(state) and moved.keys() == state.keys()
        assert all(torch.equal(moved[key], state[key]) for key in state)


def test_conditioning_that_does_not_fit_is_rejected(model):
    labels = torch.tensor([1, 2])
    conditioning = model(_ids(), class_labels=labels).conditioning
    with pytest.raises(ValueError, match="either `conditioning` or the condition"):
        model(_ids(), class_labels=labels, conditioning=conditioning)
    with pytest.raises(ValueError, match=r"conditioning.modulation` must have shape \(3, 3, 256\)"):
        model(_ids(batch_size=3), conditioning=conditioning)
    with pytest.raises(TypeError, match="ENATConditioning of an earlier call"):
        model(_ids(), conditioning={"modulation": conditioning.modulation})
    text_shaped = ENATConditioning(modulation=conditioning.modulation, text_key_values=torch.zeros(2, 3, 4, 64))
    with pytest.raises(ValueError, match="made for a text-conditioned model"):
        model(_ids(), conditioning=text_shaped)


def test_reuse_state_that_does_not_fit_is_rejected(model):
    labels = torch.tensor([1, 2])
    ids = _ids(num_masked=6)
    state = model(ids, class_labels=labels).reuse_state
    remasked = ids.clone()
    for row in range(2):  # swap one visible and one masked token: same count, but a visible token got masked
        remasked[row, (ids[row] != MASK).nonzero()[0]] = MASK
        remasked[row, (ids[row] == MASK).nonzero()[0]] = 1
    with pytest.raises(ValueError, match="were visible in the previous step"):
        model(remasked, class_labels=labels, reuse_state=state)
    with pytest.raises(ValueError, match=r"reuse_state.features` must have shape \(2, 16, 32\)"):
        model(ids, class_labels=labels, reuse_state=ENATReuseState(state.features[:, :8], state.masking))
    with pytest.raises(ValueError, match="reuse_state.masking` must be a bool tensor"):
        model(ids, class_labels=labels, reuse_state=ENATReuseState(state.features, state.masking.long()))


def test_gradient_checkpointing_gives_the_same_gradients(model):
    ids, labels = _ids(), torch.tensor([1, 2])

    def gradients():
        model.zero_grad()
        model(ids, class_labels=labels).logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def test_training_mode_drops_labels_to_the_null_class():
    torch.manual_seed(0)
    model = _randomize(ENATTransformer2DModel(**{**TINY, "class_dropout_prob": 1.0, "hidden_dropout_prob": 0.0}))
    ids = _ids()
    null = model(ids, class_labels=torch.full((2,), TINY["num_classes"])).logits
    model.train()
    dropped = model(ids, class_labels=torch.tensor([1, 2])).logits
    assert torch.allclose(dropped, null, atol=1e-6)


def test_head_does_not_train_the_word_embedding_through_the_logits(model):
    model(_ids(num_masked=0), class_labels=torch.tensor([1, 2])).logits.sum().backward()
    # visible tokens only reach the logits through the head, never through the transposed embedding
    assert model.embed.word_embedding.weight.grad is not None
    grad_rows = model.embed.word_embedding.weight.grad.abs().sum(1)
    assert grad_rows[MASK] == 0


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = ENATTransformer2DModel.from_pretrained(tmp_path).eval()
    assert public_config(loaded.config) == public_config(model.config)
    ids, labels = _ids(), torch.tensor([1, 2])
    assert torch.equal(loaded(ids, class_labels=labels).logits, model(ids, class_labels=labels).logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_finite_and_close(model, dtype):
    ids, labels = _ids(), torch.tensor([1, 2])
    reference = model(ids, class_labels=labels)
    half = model.to(dtype)(ids, class_labels=labels)
    state = model(ids, class_labels=labels).reuse_state
    reused = model(ids, class_labels=labels, reuse_state=state)
    assert half.logits.dtype == dtype and torch.isfinite(half.logits).all() and torch.isfinite(reused.logits).all()
    assert torch.allclose(half.logits.float(), reference.logits, atol=0.1)


def test_lora_adapter_trains_only_the_adapter(model):
    peft = pytest.importorskip("peft")
    ids, labels = _ids(), torch.tensor([1, 2])
    before = model(ids, class_labels=labels).logits
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_kv", "to_kv_context", "to_out"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in name for name in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    assert not torch.allclose(model(ids, class_labels=labels).logits, before, atol=1e-4)
    model.disable_adapters()
    assert torch.allclose(model(ids, class_labels=labels).logits, before, atol=1e-6)


def test_prepare_conditioning_is_what_a_forward_call_returns_and_checks_its_inputs(model):
    labels = torch.tensor([1, 2])
    conditioning = model.prepare_conditioning(class_labels=labels)
    output = model(_ids(), class_labels=labels)
    assert torch.equal(conditioning.modulation, output.conditioning.modulation)
    assert conditioning.text_key_values is None and conditioning.text_mask is None
    assert torch.equal(model(_ids(), conditioning=conditioning).logits, output.logits)
    with pytest.raises(ValueError, match="`class_labels` must lie in"):
        model.prepare_conditioning(class_labels=torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="`class_labels` is required"):
        model.prepare_conditioning()


def test_prepare_conditioning_of_a_text_model_checks_the_text_shapes():
    from .tiny_components import TEXT_LENGTH, TEXT_WIDTH, tiny_text_transformer

    model = tiny_text_transformer()
    text, pooled = torch.randn(2, TEXT_LENGTH, TEXT_WIDTH), torch.randn(2, TEXT_WIDTH)
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.long)
    mask[1, 4:] = 0
    kwargs = {"encoder_hidden_states": text, "encoder_attention_mask": mask, "pooled_text_embeds": pooled}
    conditioning = model.prepare_conditioning(**kwargs)
    output = model(_ids(), **kwargs)
    assert torch.equal(conditioning.text_key_values, output.conditioning.text_key_values)
    assert torch.equal(model(_ids(), conditioning=conditioning).logits, output.logits)
    with pytest.raises(ValueError, match="pooled_text_embeds` of shape"):
        model.prepare_conditioning(encoder_hidden_states=text)


def test_resize_class_embedding_keeps_named_rows_starts_new_ones_from_the_mean_and_keeps_the_null_class(model):
    old = model.class_embedding.weight.detach().clone()
    classes, mean = TINY["num_classes"], old[: TINY["num_classes"]].mean(dim=0)

    model.resize_class_embedding(classes + 2)
    assert model.config.num_classes == classes + 2 and model.null_class_label == classes + 2
    new = model.class_embedding.weight
    assert torch.equal(new[:classes], old[:classes]) and torch.equal(new[-1], old[-1])
    torch.testing.assert_close(new[classes : classes + 2], mean.expand(2, -1))
    assert model(_ids(), class_labels=torch.tensor([classes + 1, classes + 2])).logits.isfinite().all()

    model.resize_class_embedding(sources=[2, None, 2])  # from the classes the model has now
    rows = model.class_embedding.weight
    assert torch.equal(rows[0], old[2]) and torch.equal(rows[2], old[2]) and torch.equal(rows[3], old[-1])
    assert model.config.num_classes == 3 and not model.class_embedding.training  # the model's (eval) mode

    table = torch.randn(6, TINY["hidden_size"])
    model.resize_class_embedding(weight=table)
    assert torch.equal(model.class_embedding.weight, table) and model.config.num_classes == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of `num_classes`, `sources` and `weight`"),
        ({"num_classes": 3, "sources": [0]}, "exactly one of"),
        ({"num_classes": 0}, "`num_classes` must be a positive integer"),
        ({"sources": [0, 99]}, r"`sources` must be a non-empty list of current class ids in \[0, 4\]"),
        ({"weight": torch.zeros(4, 3)}, r"`weight` must have shape \(num_classes \+ 1, 32\)"),
    ],
)
def test_resize_class_embedding_refuses_bad_arguments_and_keeps_the_model(model, kwargs, message):
    old = model.class_embedding.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        model.resize_class_embedding(**kwargs)
    assert torch.equal(model.class_embedding.weight, old) and model.config.num_classes == TINY["num_classes"]
