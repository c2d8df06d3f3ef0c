"""Text conditioning of the transformer and ENATText2ImagePipeline."""

import inspect
import logging

import pytest
import torch
from diffusers import DiffusionPipeline

from enat_diffusers import ENAT_PRESETS, ENATPromptEmbeds, ENATText2ImagePipeline, ENATTransformer2DModel

from .tiny_components import (
    CODEBOOK_SIZE,
    GRID,
    TEXT_LENGTH,
    TEXT_WIDTH,
    TransformerCalls,
    tiny_text_pipeline,
    tiny_text_transformer,
)


@pytest.fixture
def pipe(tmp_path):
    return tiny_text_pipeline(tmp_path / "clip")


def _ids(batch_size=2, num_masked=6):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CODEBOOK_SIZE, (batch_size, GRID * GRID), generator=generator)
    ids[torch.rand(batch_size, GRID * GRID, generator=generator).argsort(dim=1) < num_masked] = CODEBOOK_SIZE
    return ids


def _text(batch_size=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch_size, TEXT_LENGTH, TEXT_WIDTH, generator=generator),
        "pooled_text_embeds": torch.randn(batch_size, TEXT_WIDTH, generator=generator),
    }


def test_text_changes_the_logits_and_padding_is_ignored():
    model = tiny_text_transformer()
    text = _text()
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.bool)
    mask[:, 5:] = False
    base = model(_ids(), **text, encoder_attention_mask=mask).logits
    other_text = model(_ids(), **_text(seed=1), encoder_attention_mask=mask).logits
    assert not torch.allclose(base, other_text, atol=1e-4)
    padded = {**text, "encoder_hidden_states": text["encoder_hidden_states"].clone()}
    padded["encoder_hidden_states"][:, 5:] = 100.0
    assert torch.allclose(model(_ids(), **padded, encoder_attention_mask=mask).logits, base, atol=1e-5)


def test_without_pooled_embedding_the_masked_mean_conditions_adaln():
    model = tiny_text_transformer(pooled=False)
    text = {"encoder_hidden_states": _text()["encoder_hidden_states"]}
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.bool)
    mask[:, 4:] = False
    output = model(_ids(), **text, encoder_attention_mask=mask)
    assert output.logits.shape == (2, CODEBOOK_SIZE, GRID, GRID) and torch.isfinite(output.logits).all()
    truncated = model(
        _ids(), encoder_hidden_states=text["encoder_hidden_states"][:, :4], encoder_attention_mask=mask[:, :4]
    )
    assert torch.allclose(output.logits, truncated.logits, atol=1e-5)


def test_text_model_reuse_step_runs_only_critical_tokens():
    model = tiny_text_transformer()
    text = _text()
    before = _ids(num_masked=10)
    after = before.clone()
    for row in range(2):
        after[row, (before[row] == CODEBOOK_SIZE).nonzero().flatten()[:3]] = 2
    state = model(before, **text).reuse_state
    calls = []
    hook = model.encoder_blocks[0].register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[1]))
    model(after, **text, reuse_state=state)
    hook.remove()
    assert calls == [3]


def test_text_conditioning_is_projected_once_and_reused():
    model = tiny_text_transformer()
    text = _text()
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.bool)
    mask[:, 5:] = False
    first = model(_ids(num_masked=10), **text, encoder_attention_mask=mask)
    assert first.conditioning.text_key_values.shape == (
        2,
        len(model.blocks),
        TEXT_LENGTH,
        2 * model.config.hidden_size,
    )
    projected = []
    hook = model.context_embedder.register_forward_hook(lambda *_: projected.append(1))
    reused = model(_ids(), conditioning=first.conditioning)
    hook.remove()
    assert projected == []
    assert torch.allclose(reused.logits, model(_ids(), **text, encoder_attention_mask=mask).logits, atol=1e-6)
    class_shaped = first.conditioning.__class__(modulation=first.conditioning.modulation)
    with pytest.raises(ValueError, match="made for a class-conditional model"):
        model(_ids(), conditioning=class_shaped)
    with pytest.raises(ValueError, match="conditioning.text_mask` must have shape"):
        model(_ids(), conditioning=first.conditioning.__class__(**{**first.conditioning, "text_mask": mask[:, :3]}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": torch.tensor([0, 1])}, "text-conditioned"),
        ({"encoder_hidden_states": None}, "`encoder_hidden_states` of shape"),
        ({"encoder_hidden_states": torch.zeros(2, 4, TEXT_WIDTH + 1)}, "must have shape"),
        ({"pooled_text_embeds": None}, "`pooled_text_embeds` of shape"),
        ({"encoder_attention_mask": torch.ones(2, 3)}, "`encoder_attention_mask` must have shape"),
    ],
)
def test_text_model_rejects_bad_conditioning(kwargs, message):
    model = tiny_text_transformer()
    with pytest.raises((ValueError, TypeError), match=message):
        model(_ids(), **{**_text(), **kwargs})


def test_config_must_choose_one_conditioning():
    with pytest.raises(ValueError, match="exactly one of `num_classes`"):
        ENATTransformer2DModel(num_classes=10, text_embed_dim=8)
    with pytest.raises(ValueError, match="exactly one of `num_classes`"):
        ENATTransformer2DModel(num_classes=None)


@pytest.mark.parametrize(
    "preset, millions", [("ENAT-S", 49.3), ("ENAT-B", 214.9), ("ENAT-L", 565.9), ("ENAT-B-COCO", 215.3)]
)
def test_presets_have_the_paper_sizes(preset, millions):
    """The paper's 219M (ENAT-B) and 574M (ENAT-L) include the reference's unused `prev_embedder` (4.7M, 8.4M)."""
    with torch.device("meta"):
        model = ENATTransformer2DModel.from_preset(preset)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.1
    assert {k: model.config[k] for k in ENAT_PRESETS[preset]} == ENAT_PRESETS[preset]


def test_text_pipeline_generates_and_is_reproducible(pipe):
    generator = torch.Generator().manual_seed(0)
    images = pipe(["a red bus", "a cat"], num_inference_steps=4, generator=generator, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    first = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="latent").images
    second = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(first, second) and (first != CODEBOOK_SIZE).all()


def test_generator_list_per_image(pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    batch = pipe(["a red bus", "a cat"], generator=generators, output_type="latent").images
    alone = pipe(["a cat"], generator=[torch.Generator().manual_seed(1)], output_type="latent").images
    assert torch.equal(batch[1], alone[0])


def test_guidance_streams_use_the_empty_prompt_and_batch_in_one_forward(pipe, monkeypatch):
    encoded = []
    original = pipe._encode_text

    def spy(prompts, *args, **kwargs):
        encoded.append(prompts)
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(pipe, "_encode_text", spy)
    recorder = TransformerCalls(pipe.transformer)
    pipe(["a red bus", "a cat"], num_images_per_prompt=2, num_inference_steps=3, output_type="latent")
    recorder.remove()
    assert encoded == [["a red bus", "a cat"], ["", ""]]
    assert recorder.calls == [(8, False), (8, True), (8, True)]


def _latents(pipe, seed=0, **kwargs):
    arguments = {"output_type": "latent", "num_inference_steps": 4, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **arguments).images


def test_prompt_embeds_give_the_same_images_as_prompts_by_name(pipe):
    encoded = pipe.encode_prompt(["a cat"])
    from_embeds = _latents(
        pipe,
        prompt_embeds=encoded.prompt_embeds,
        prompt_attention_mask=encoded.prompt_attention_mask,
        pooled_prompt_embeds=encoded.pooled_prompt_embeds,
        negative_prompt_embeds=encoded.negative_prompt_embeds,
        negative_prompt_attention_mask=encoded.negative_prompt_attention_mask,
        negative_pooled_prompt_embeds=encoded.negative_pooled_prompt_embeds,
    )
    assert torch.equal(from_embeds, _latents(pipe, prompt="a cat"))


def test_encode_prompt_output_unpacks_into_the_call_and_reproduces_the_prompt(pipe):
    embeds = pipe.encode_prompt(["a cat", "a red bus"], "a dog")
    assert isinstance(embeds, ENATPromptEmbeds) and isinstance(embeds, tuple)
    call_arguments = inspect.signature(pipe.__call__).parameters
    assert set(embeds.keys()) <= set(call_arguments) and len(embeds) == 6
    from_embeds = _latents(pipe, **embeds, num_images_per_prompt=2)
    from_prompt = _latents(pipe, prompt=["a cat", "a red bus"], negative_prompt="a dog", num_images_per_prompt=2)
    assert torch.equal(from_embeds, from_prompt)


def test_encode_prompt_returns_tensors_without_autograd_history(pipe):
    assert any(parameter.requires_grad for parameter in pipe.text_encoder.parameters())
    embeds = pipe.encode_prompt("a cat")
    assert all(tensor is None or not tensor.requires_grad for tensor in embeds)


def test_prompt_embeds_alone_get_the_empty_prompt_as_negative(pipe):
    embeds = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
    assert embeds.negative_prompt_embeds is None
    positive = {key: embeds[key] for key in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")}
    assert torch.equal(_latents(pipe, **positive), _latents(pipe, prompt="a cat"))


def test_a_pipeline_without_text_encoder_samples_from_precomputed_embeddings(pipe, tmp_path):
    embeds = pipe.encode_prompt("a cat")
    expected = _latents(pipe, prompt="a cat")
    pipe.save_pretrained(tmp_path / "saved")
    bare = ENATText2ImagePipeline.from_pretrained(tmp_path / "saved", text_encoder=None, tokenizer=None)
    bare.set_progress_bar_config(disable=True)
    assert bare.text_encoder is None and bare.tokenizer is None
    assert torch.equal(_latents(bare, **embeds), expected)
    positive = {key: embeds[key] for key in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")}
    with pytest.raises(ValueError, match="pass `negative_prompt_embeds`"):
        _latents(bare, **positive)
    assert _latents(bare, **positive, guidance_scale=1.0).shape == (1, GRID, GRID)
    with pytest.raises(ValueError, match="no text encoder and tokenizer: pass `prompt_embeds`"):
        _latents(bare, prompt="a cat")


def test_negative_prompt_changes_the_result(pipe):
    plain = pipe("a cat", generator=torch.Generator().manual_seed(0), guidance_scale=8.0, output_type="latent")
    negative = pipe(
        "a cat", negative_prompt="a dog", generator=torch.Generator().manual_seed(0), guidance_scale=8.0,
        output_type="latent",
    )  # fmt: skip
    assert not torch.equal(plain.images, negative.images)


def test_long_prompts_are_truncated_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe("a very long prompt about cats", num_inference_steps=2, output_type="latent")
    assert "truncated" in caplog.text


def test_the_truncation_warning_does_not_echo_a_huge_prompt(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt("cat " * 20_000, do_classifier_free_guidance=False)
    assert "truncated" in caplog.text and len(caplog.text) < 1000


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "exactly one of `prompt` and `prompt_embeds`"),
        ({"prompt": "a", "prompt_embeds": torch.zeros(1, TEXT_LENGTH, TEXT_WIDTH)}, ValueError, "exactly one"),
        ({"prompt": ["a", "b"], "negative_prompt": ["c"]}, ValueError, "1 entries for 2 prompts"),
        ({"prompt": 3}, TypeError, "`prompt` must be a string"),
        (
            {
                "prompt_embeds": torch.zeros(1, 8, 8),
                "pooled_prompt_embeds": torch.zeros(1, 8),
                "negative_prompt_embeds": torch.zeros(2, 8, 8),
            },
            ValueError,
            r"`negative_prompt_embeds` must have the shape of `prompt_embeds` \(1, 8, 8\), got \(2, 8, 8\)",
        ),
        ({"prompt_embeds": torch.zeros(0, 8, 8)}, ValueError, r"\(batch_size >= 1, text_length, 8\), got \(0, 8, 8\)"),
        ({"prompt_embeds": torch.zeros(1, 8, 5)}, ValueError, r"\(batch_size >= 1, text_length, 8\), got \(1, 8, 5\)"),
        ({"prompt_embeds": torch.zeros(1, 8, 8)}, ValueError, r"needs `pooled_prompt_embeds` of shape \(1, 8\)"),
        (
            {"prompt_embeds": torch.zeros(1, 8, 8), "pooled_prompt_embeds": torch.zeros(1, 3)},
            ValueError,
            r"`pooled_prompt_embeds` must have shape \(1, 8\), got \(1, 3\)",
        ),
        ({"prompt": "a", "negative_prompt": 5}, TypeError, "`negative_prompt` must be a string or a list of strings"),
        ({"prompt": "a", "negative_prompt": ["b", None]}, TypeError, "`negative_prompt` must be a string"),
        ({"prompt": "a", "callback_on_step_end": 3}, TypeError, "`callback_on_step_end` must be callable"),
        ({"prompt": "a", "generator": [None]}, TypeError, "only hold torch.Generator"),
        ({"prompt": "a", "guidance_scale": float("nan")}, ValueError, "`guidance_scale` must be a finite number"),
        (
            {"prompt": "a", "negative_prompt": "b", "negative_prompt_embeds": torch.zeros(1, 8, 8)},
            ValueError,
            "at most",
        ),
        ({"prompt": "a", "num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt`"),
        ({"prompt": "a", "output_type": "gif"}, ValueError, "`output_type`"),
        ({"prompt": ["a", "b"], "generator": [torch.Generator()]}, ValueError, "one generator per image"),
    ],
)
def test_bad_inputs_fail_before_any_model_runs(pipe, kwargs, error, message):
    encoder_calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda *_: encoder_calls.append(1))
    recorder = TransformerCalls(pipe.transformer)
    with pytest.raises(error, match=message):
        pipe(**kwargs)
    handle.remove()
    recorder.remove()
    assert recorder.calls == [] and encoder_calls == []


def test_save_and_load_with_diffusion_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded) is ENATText2ImagePipeline
    loaded.set_progress_bar_config(disable=True)
    arguments = {"num_inference_steps": 3, "output_type": "latent"}
    expected = pipe("a cat", generator=torch.Generator().manual_seed(0), **arguments).images
    actual = loaded("a cat", generator=torch.Generator().manual_seed(0), **arguments).images
    assert torch.equal(expected, actual)
