"""The stages every pipeline shares, seen from outside: a quiet import, prompt encoding without a transformer, one
resolution of class names, one meaning of a bare string, the step callback's prediction, fused projections, editing
inputs of any size and kind, and components refused at load."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AmusedScheduler
from diffusers.utils.source_code_parsing_utils import ReturnNameVisitor

from enat_diffusers import (
    ENATClassNames,
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    ENATScheduler,
    ENATText2ImagePipeline,
)
from enat_diffusers.conditioning import ENATPromptEmbeds
from enat_diffusers.image_utils import editing_inputs_as_pixels, resize_pixels

from .tiny_components import (
    CODEBOOK_SIZE,
    ID2LABEL,
    tiny_clip,
    tiny_pipeline,
    tiny_text_transformer,
    tiny_transformer,
    tiny_vqvae,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE = 8  # pixels of the tiny pipelines (4x4 tokens, VQ downsampling 2)
REPO_ROOT = Path(__file__).resolve().parent.parent


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def no_model_may_run(pipe, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(pipe.transformer, "forward", refuse)
    monkeypatch.setattr(pipe.vqvae, "encode", refuse)


# ---------------------------------------------------------------------------------------------------------------------
# Import and warnings


def test_importing_the_package_prints_nothing():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", "import enat_diffusers"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stderr


def test_casting_to_bfloat16_prints_no_empty_float32_module_list(capfd, caplog):
    pipe = tiny_pipeline()
    capfd.readouterr()
    with caplog.at_level("WARNING"):
        pipe.to(torch.bfloat16)
        ENATInpaintPipeline.from_pipe(pipe, dtype=torch.float32)
    assert "should be kept in float32" not in capfd.readouterr().err + caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning


def test_encode_prompt_needs_only_the_text_encoder_and_tokenizer(tmp_path):
    text_encoder, tokenizer = tiny_clip(tmp_path / "clip")
    encoder_only = ENATText2ImagePipeline(text_encoder, tokenizer, transformer=None, vqvae=None, scheduler=None)
    embeds = encoder_only.encode_prompt("a cat")
    components = {"transformer": tiny_text_transformer(), "vqvae": tiny_vqvae()}
    scheduler = {"scheduler": ENATScheduler(mask_token_id=CODEBOOK_SIZE)}
    without_encoder = ENATText2ImagePipeline(None, None, **components, **scheduler)
    full = ENATText2ImagePipeline(text_encoder, tokenizer, **components, **scheduler)
    for pipe in (without_encoder, full):
        pipe.set_progress_bar_config(disable=True)
    arguments = {"num_inference_steps": 3, "output_type": "latent"}
    from_embeds = without_encoder(**embeds, generator=seeded(), **arguments).images
    assert torch.equal(from_embeds, full("a cat", generator=seeded(), **arguments).images)


@pytest.mark.parametrize("pipeline_class", [ENATText2ImagePipeline, ENATInpaintPipeline, ENATImg2ImgPipeline])
def test_diffusers_reads_encode_prompts_six_names_from_its_source_in_call_order(pipeline_class):
    # diffusers' tooling (its pipeline tests among them) zips `encode_prompt`'s result with the names of the return
    # statement and passes them to `__call__` by name, so the statement must name the fields of ENATPromptEmbeds.
    visitor = ReturnNameVisitor()
    visitor.visit(visitor.get_ast_tree(cls=pipeline_class))
    assert visitor.return_names == list(ENATPromptEmbeds._fields)
    call_parameters = inspect.signature(pipeline_class.__call__).parameters
    assert all(name in call_parameters for name in visitor.return_names)


def test_enat_pipeline_classes_load_the_packaged_demos_by_name():
    pipe = ENATInpaintPipeline.from_pretrained("demo:digits")
    assert isinstance(pipe, ENATInpaintPipeline) and pipe.get_label_ids("Seven") == [7]


def test_the_class_conditional_pipeline_has_no_encode_prompt():
    assert not hasattr(ENATPipeline, "encode_prompt")
    assert hasattr(ENATText2ImagePipeline, "encode_prompt") and hasattr(ENATInpaintPipeline, "encode_prompt")


def test_class_names_match_case_insensitively_unless_that_is_ambiguous():
    pipe = tiny_pipeline()
    assert pipe.get_label_ids(["Goldfish", "GREAT WHITE SHARK", "tinca TINCA", 3]) == [1, 2, 0, 3]
    assert pipe.class_label_ids("goldfish") == pipe.get_label_ids("goldfish") == [1]
    names = ENATClassNames({0: "Cat", 1: "cat"})
    assert names.ids(["Cat", "cat"]) == [0, 1]
    with pytest.raises(ValueError, match="matches .* when case is ignored; spell it exactly"):
        names.ids("CAT")


def test_an_id2label_naming_a_class_the_model_lacks_is_refused_at_construction_and_load(tmp_path):
    with pytest.raises(ValueError, match="names class 57, but the model has 5 classes"):
        ENATPipeline(tiny_transformer(), tiny_vqvae(), tiny_pipeline().scheduler, id2label={**ID2LABEL, 57: "walrus"})
    tiny_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["id2label"]["57"] = "walrus"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names class 57"):
        ENATPipeline.from_pretrained(tmp_path)


def test_a_model_index_naming_another_transformer_class_is_refused_at_load(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "UNet2DModel"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "UNet2DModel",
                "block_out_channels": [8, 8],
                "down_block_types": ["DownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "UpBlock2D"],
                "norm_num_groups": 4,
            }
        )
    )
    with pytest.raises(TypeError, match="needs `transformer` to be a ENATTransformer2DModel, got UNet2DModel"):
        ENATPipeline.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# One meaning of a bare string


def test_a_bare_string_names_a_class_in_every_class_conditional_pipeline():
    generation = tiny_pipeline()
    arguments = {"num_inference_steps": 3, "output_type": "latent"}
    by_name = generation("goldfish", generator=seeded(), **arguments).images
    assert torch.equal(by_name, generation(prompt="Goldfish", generator=seeded(), **arguments).images)
    with pytest.raises(ValueError, match=r"class-conditional: a prompt is read as class names.*pass `class_labels`"):
        generation(prompt="a photo of a dog", **arguments)

    inpaint = ENATInpaintPipeline.from_pipe(generation)
    image, mask = torch.rand(1, 3, SIDE, SIDE, generator=seeded(1)), torch.zeros(1, SIDE, SIDE)
    mask[:, SIDE // 2 :] = 1
    edited = inpaint("goldfish", image, mask, generator=seeded(), **arguments).images
    reference = inpaint(image=image, mask_image=mask, class_labels=1, generator=seeded(), **arguments).images
    assert torch.equal(edited, reference)


def test_a_class_pipeline_on_a_text_transformer_says_which_pipeline_to_use():
    pipe = ENATPipeline(tiny_text_transformer(), tiny_vqvae(), tiny_pipeline().scheduler)
    with pytest.raises(ValueError, match=r"ENATText2ImagePipeline.from_pipe\(pipe\)"):
        pipe(class_labels=[0], num_inference_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def test_the_step_callback_can_receive_the_prediction_and_an_interrupt_returns_it():
    pipe = tiny_pipeline()
    seen = []

    def record(pipeline, step_index, timestep, tensors):
        seen.append({name: tensor.clone() for name, tensor in tensors.items()})
        if step_index == 1:
            pipeline._interrupt = True
        return {}

    result = pipe(
        [1, 2],
        num_inference_steps=4,
        generator=seeded(),
        output_type="latent",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    ).images
    assert len(seen) == 2 and set(seen[0]) == {"latents", "pred_original_sample"}
    assert not (seen[1]["pred_original_sample"] == CODEBOOK_SIZE).any()
    assert (seen[1]["latents"] == CODEBOOK_SIZE).any()
    assert torch.equal(result, seen[1]["pred_original_sample"])


def test_amused_scheduler_with_a_generator_list_is_refused_before_any_model_runs(monkeypatch):
    pipe = tiny_pipeline()
    pipe.scheduler = AmusedScheduler(mask_token_id=CODEBOOK_SIZE)
    no_model_may_run(pipe, monkeypatch)
    with pytest.raises(ValueError, match="AmusedScheduler draws with one torch.Generator"):
        pipe([1, 2], generator=[seeded(0), seeded(1)], num_inference_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# The transformer


def test_fused_qkv_projections_are_reported_and_give_the_same_logits():
    model = tiny_transformer()
    input_ids = torch.randint(0, CODEBOOK_SIZE, (2, 16), generator=seeded())
    input_ids[:, :6] = CODEBOOK_SIZE
    labels = torch.tensor([0, 3])
    before = model(input_ids, class_labels=labels).logits
    attentions = [block.attn for block in model.blocks]
    own_layers = [(attn.to_q, attn.to_kv, attn.to_q.weight.clone(), attn.to_kv.weight.clone()) for attn in attentions]
    model.fuse_qkv_projections()
    assert all(attn.fused_projections and hasattr(attn, "to_qkv") for attn in attentions)
    torch.testing.assert_close(model(input_ids, class_labels=labels).logits, before, atol=1e-5, rtol=1e-5)
    model.unfuse_qkv_projections()
    assert not any(attn.fused_projections or hasattr(attn, "to_qkv") for attn in attentions)
    # Unfusing removes only what fusing added: `to_kv` is the model's own (stored) layer, unlike diffusers' fused one.
    for attn, (to_q, to_kv, q_weight, kv_weight) in zip(attentions, own_layers, strict=True):
        assert attn.to_q is to_q and attn.to_kv is to_kv
        assert torch.equal(attn.to_q.weight, q_weight) and torch.equal(attn.to_kv.weight, kv_weight)
    assert set(model.state_dict()) == set(tiny_transformer().state_dict())
    assert torch.equal(model(input_ids, class_labels=labels).logits, before)


# ---------------------------------------------------------------------------------------------------------------------
# Editing inputs


def test_editing_pipelines_resize_images_of_any_size():
    pipe = ENATImg2ImgPipeline.from_pipe(tiny_pipeline())
    large = torch.rand(1, 3, 3 * SIDE, 2 * SIDE, generator=seeded())
    arguments = {"class_labels": 1, "strength": 0.75, "num_inference_steps": 4, "output_type": "np"}
    result = pipe(image=large, generator=seeded(), **arguments).images
    assert result.shape == (1, SIDE, SIDE, 3)
    resized = resize_pixels(large[0], SIDE)[None]
    assert np.array_equal(result, pipe(image=resized, generator=seeded(), **arguments).images)


def test_a_16_bit_image_is_read_at_full_scale_not_clipped():
    values = np.full((SIDE, SIDE), 32768, dtype=np.uint16)
    image = PIL.Image.fromarray(values)  # what a 16-bit greyscale PNG opens as
    assert image.mode.startswith("I")
    pixels = editing_inputs_as_pixels(image)[0]
    torch.testing.assert_close(pixels, torch.full((3, SIDE, SIDE), 32768 / 65535))


def test_a_mask_painted_only_in_alpha_is_read_by_its_alpha():
    rgba = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere
    rgba[SIDE // 2 :, :, 3] = 255  # opaque only in the bottom half
    mask = editing_inputs_as_pixels(PIL.Image.fromarray(rgba, "RGBA"), name="mask_image", is_mask=True)[0]
    assert mask[0, SIDE // 2 :].eq(1).all() and mask[0, : SIDE // 2].eq(0).all()


def test_a_float_mode_mask_is_read_as_floats_and_nan_is_refused(monkeypatch):
    pipe = ENATInpaintPipeline.from_pipe(tiny_pipeline())
    values = np.zeros((SIDE, SIDE), dtype=np.float32)
    values[SIDE // 2 :] = 1.0
    _, token_mask = pipe.prepare_token_mask(PIL.Image.fromarray(values, "F"))
    assert token_mask[0, 2:].all() and not token_mask[0, :2].any()
    values[0, 0] = np.nan
    image = torch.rand(1, 3, SIDE, SIDE)
    no_model_may_run(pipe, monkeypatch)
    with pytest.raises(ValueError, match="`mask_image` .* holds NaN"):
        pipe(image=image, mask_image=PIL.Image.fromarray(values, "F"), class_labels=0)


def test_strength_is_checked_against_the_steps_only_when_they_are_known():
    from enat_diffusers.checks import check_strength

    assert check_strength(0.01) == 0.01  # a script's default step count is not known yet: the range rule only
    with pytest.raises(ValueError, match="`strength` 0.01 runs no step of `num_inference_steps` 8"):
        check_strength(0.01, 8)
    for bad in (0, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match=r"`strength` must be a number in \(0, 1\]"):
            check_strength(bad)
