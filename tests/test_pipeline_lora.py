"""LoRA through the pipelines: load/unload/fuse/unfuse/save in diffusers' pipeline-loader shape."""

import json

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from enat_diffusers import ENATPipeline

from .tiny_components import CODEBOOK_SIZE, GRID, NUM_CLASSES, TINY_TRANSFORMER_CONFIG, tiny_pipeline, tiny_transformer

pytestmark = pytest.mark.usefixtures("single_thread")

LORA_TARGETS = ["to_q", "to_kv", "to_out"]


def _trained_lora(seed: int = 1):
    """A tiny transformer with a LoRA whose B matrices are not zero (as after training)."""
    transformer = tiny_transformer()
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return transformer


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    transformer = _trained_lora()
    folder = tmp_path_factory.mktemp("lora")
    path = tiny_pipeline().save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return folder, path


def _logits(transformer, labels=(1, 2)):
    ids = torch.full((len(labels), GRID, GRID), CODEBOOK_SIZE)
    ids[:, 0] = torch.arange(GRID)
    with torch.no_grad():
        return transformer(ids, class_labels=torch.tensor(labels)).logits


def _latents(pipe, labels=(1, 2)):
    return pipe(list(labels), num_inference_steps=4, generator=torch.manual_seed(0), output_type="latent").images


def test_saved_file_has_the_contract_layout(lora_folder):
    _, path = lora_folder
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert keys and all(key.startswith("transformer.") and "lora" in key and ".default." not in key for key in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.r"] == 4


def test_pipeline_loading_equals_the_transformers_own_loader_and_unload_restores(lora_folder):
    folder, path = lora_folder
    pipe = tiny_pipeline()
    original_logits, original_latents = _logits(pipe.transformer), _latents(pipe)
    pipe.load_lora_weights(folder)
    by_hand = tiny_transformer()
    by_hand.load_lora_adapter(str(path), prefix="transformer")
    with_lora = _logits(pipe.transformer)
    assert torch.equal(with_lora, _logits(by_hand)) and not torch.allclose(with_lora, original_logits, atol=1e-3)
    assert torch.equal(with_lora, _logits(_trained_lora()))
    assert not torch.equal(_latents(pipe), original_latents)
    pipe.unload_lora_weights()
    assert torch.equal(_logits(pipe.transformer), original_logits) and torch.equal(_latents(pipe), original_latents)


def test_fuse_and_unfuse(lora_folder):
    folder, _ = lora_folder
    pipe = tiny_pipeline()
    original = _logits(pipe.transformer)
    pipe.load_lora_weights(folder, adapter_name="style")
    unfused = _logits(pipe.transformer)
    pipe.fuse_lora()
    assert pipe.fused_loras == {"style"}
    assert torch.allclose(_logits(pipe.transformer), unfused, atol=1e-5)
    pipe.unload_lora_weights()  # fused weights stay
    assert torch.allclose(_logits(pipe.transformer), unfused, atol=1e-5)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    pipe.unfuse_lora()
    assert torch.allclose(_logits(pipe.transformer), unfused, atol=1e-5)
    pipe.unload_lora_weights()
    assert torch.allclose(_logits(pipe.transformer), original, atol=1e-5)


def test_lora_state_dict_returns_the_tensors_and_the_metadata_on_request_as_diffusers_loaders_do(lora_folder):
    folder, path = lora_folder
    with safe_open(str(path), framework="pt") as handle:
        on_disk = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata_on_disk = handle.metadata()
    tensors = ENATPipeline.lora_state_dict(folder)
    assert isinstance(tensors, dict) and tensors.keys() == on_disk.keys()
    assert all(torch.equal(tensors[key], on_disk[key]) for key in on_disk)
    tensors, lora_configs = ENATPipeline.lora_state_dict(folder, return_lora_metadata=True)
    assert tensors.keys() == on_disk.keys()
    assert lora_configs == json.loads(metadata_on_disk["lora_adapter_metadata"]) and lora_configs["transformer.r"] == 4


def test_save_lora_weights_takes_safe_serialization_and_refuses_pickles(tmp_path):
    layers = get_peft_model_state_dict(_trained_lora())
    path = ENATPipeline.save_lora_weights(tmp_path / "safe", transformer_lora_layers=layers, safe_serialization=True)
    assert path.suffix == ".safetensors" and path.is_file()
    with pytest.raises(ValueError, match="`safe_serialization=False` is not supported: .* safetensors only"):
        ENATPipeline.save_lora_weights(tmp_path / "pickle", transformer_lora_layers=layers, safe_serialization=False)
    assert not (tmp_path / "pickle").exists()


def test_a_state_dict_loads_like_the_file(lora_folder):
    folder, path = lora_folder
    with safe_open(str(path), framework="pt") as handle:
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    from_file, from_dict = tiny_pipeline(), tiny_pipeline()
    from_file.load_lora_weights(folder)
    from_dict.load_lora_weights(state_dict)
    assert torch.equal(_logits(from_file.transformer), _logits(from_dict.transformer))


def test_new_classes_resize_the_class_embedding_and_unload_restores_it(tmp_path):
    transformer = _trained_lora()
    extra = {5: "seahorse", 6: "octopus, devil fish"}
    weight = torch.cat([transformer.class_embedding.weight[:NUM_CLASSES], torch.randn(2, TINY_TRANSFORMER_CONFIG["hidden_size"]),
                        transformer.class_embedding.weight[NUM_CLASSES:]])  # fmt: skip
    id2label = {**tiny_pipeline().config.id2label, **extra}
    tiny_pipeline().save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer), class_embedding=weight,
        id2label=id2label,
    )  # fmt: skip
    pipe = tiny_pipeline()
    original = _latents(pipe)
    pipe.load_lora_weights(tmp_path)
    assert pipe.transformer.config.num_classes == NUM_CLASSES + 2 and pipe.transformer.null_class_label == 7
    assert pipe.get_label_ids(["devil fish", "goldfish"]) == [6, 1]
    images = pipe(["octopus", "seahorse"], num_inference_steps=2, output_type="latent").images
    assert images.shape == (2, GRID, GRID)
    pipe.unload_lora_weights()
    assert pipe.transformer.config.num_classes == NUM_CLASSES and "octopus" not in pipe.labels
    assert torch.equal(_latents(pipe), original)


def test_foreign_or_missing_weights_are_refused(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="not an ENAT LoRA"):
        pipe.load_lora_weights({"unet.down.lora_A.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="no LoRA weights 'pytorch_lora_weights.safetensors'"):
        pipe.load_lora_weights(tmp_path)


def test_a_text_encoder_lora_is_refused_by_the_class_pipeline_before_anything_is_loaded(lora_folder):
    folder, path = lora_folder
    with safe_open(str(path), framework="pt") as handle:
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    state_dict["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 8)
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="text encoder weights .*but this ENATPipeline has no text encoder"):
        pipe.load_lora_weights(state_dict)
    assert not pipe.get_list_adapters()


def test_the_text_pipeline_loads_a_lora_the_same_way_with_its_text_encoder_part(tmp_path):
    from peft import inject_adapter_in_model

    from .tiny_components import tiny_text_pipeline

    trained = tiny_text_pipeline(tmp_path / "clip")
    trained.transformer.add_adapter(LoraConfig(r=2, target_modules=LORA_TARGETS, init_lora_weights=False))
    text_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(text_config, trained.text_encoder)
    trained.save_lora_weights(
        tmp_path / "lora",
        transformer_lora_layers=get_peft_model_state_dict(trained.transformer),
        transformer_lora_adapter_metadata=trained.transformer.peft_config["default"].to_dict(),
        text_encoder_lora_layers=get_peft_model_state_dict(trained.text_encoder),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    pipe = tiny_text_pipeline(tmp_path / "clip")
    original, original_embeds = _latents_text(pipe), pipe.encode_prompt("a cat").prompt_embeds
    pipe.load_lora_weights(tmp_path / "lora")
    assert torch.equal(_latents_text(pipe), _latents_text(trained)) and not torch.equal(_latents_text(pipe), original)
    # the text encoder LoRA (alpha 4 from the saved config, not the rank) is in the text encoder
    torch.testing.assert_close(pipe.encode_prompt("a cat").prompt_embeds, trained.encode_prompt("a cat").prompt_embeds)
    assert not torch.allclose(pipe.encode_prompt("a cat").prompt_embeds, original_embeds)
    pipe.unload_lora_weights()
    assert torch.equal(_latents_text(pipe), original)
    assert torch.equal(pipe.encode_prompt("a cat").prompt_embeds, original_embeds)


def _latents_text(pipe):
    return pipe("a cat", num_inference_steps=3, generator=torch.manual_seed(0), output_type="latent").images


# ----------------------------------------------------------------------------------------------------------------------
# All or nothing: a LoRA that cannot be loaded completely leaves the pipeline exactly as it was


def _pipeline_state(pipe):
    """Everything a failed load must leave unchanged: weights (and their names), classes, labels, adapters."""
    return (
        {key: value.clone() for key, value in pipe.transformer.state_dict().items()},
        pipe.transformer.config.num_classes,
        dict(pipe.config.id2label),
        pipe.get_list_adapters(),
    )


def _assert_unchanged(pipe, before):
    weights, num_classes, id2label, adapters = _pipeline_state(pipe)
    assert weights.keys() == before[0].keys()
    assert all(torch.equal(weights[key], before[0][key]) for key in weights)
    assert (num_classes, id2label, adapters) == before[1:]


def _new_class_lora(path, mutate=None, metadata_override=None):
    """A LoRA file with two new classes (a 7-class embedding), changed by `mutate(state_dict)` / the metadata."""
    transformer = _trained_lora()
    weight = torch.cat([transformer.class_embedding.weight[:NUM_CLASSES], torch.randn(2, TINY_TRANSFORMER_CONFIG["hidden_size"]),
                        transformer.class_embedding.weight[NUM_CLASSES:]])  # fmt: skip
    id2label = {**tiny_pipeline().config.id2label, 5: "seahorse", 6: "octopus"}
    file = tiny_pipeline().save_lora_weights(
        path, transformer_lora_layers=get_peft_model_state_dict(transformer), class_embedding=weight,
        id2label=id2label, transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )  # fmt: skip
    with safe_open(str(file), framework="pt") as handle:
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = dict(handle.metadata())
    if mutate is not None:
        mutate(state_dict)
    metadata.update(metadata_override or {})
    from safetensors.torch import save_file

    save_file(state_dict, str(file), metadata=metadata)
    return path


def _wrong_rank(state_dict):
    key = next(key for key in state_dict if key.endswith("to_q.lora_A.weight"))
    state_dict[key] = state_dict[key][:3]


def _drop_lora_b(state_dict):
    for key in [key for key in state_dict if key.endswith("to_kv.lora_B.weight")]:
        del state_dict[key]


@pytest.mark.parametrize(
    ("mutate", "metadata", "message"),
    [
        (_wrong_rank, None, r"to_q` has lora_A \(3, 32\) and lora_B \(\d+, 4\)"),
        (
            _drop_lora_b,
            None,
            r"the LoRA misses \d+ weight\(s\) of `transformer`: \['decoder_blocks.0.attn.to_kv.lora_B'",
        ),
        (None, {"lora_adapter_metadata": "{not json"}, r"metadata entry 'lora_adapter_metadata' is not valid JSON"),
        (None, {"id2label": "[1, 2]"}, r"metadata entry 'id2label' must be a JSON object, got list"),
        (None, {"id2label": '{"57": "whale"}'}, r"`id2label` names classes \[57\] outside \[0, 6\]"),
    ],
    ids=[
        "wrong-rank-lora_A",
        "missing-lora_B",
        "malformed-adapter-metadata",
        "id2label-not-an-object",
        "id2label-out-of-range",
    ],
)
def test_a_lora_that_cannot_load_completely_is_refused_and_leaves_the_pipeline_as_it_was(
    tmp_path, mutate, metadata, message
):
    folder = _new_class_lora(tmp_path, mutate, metadata)
    pipe = tiny_pipeline()
    before = _pipeline_state(pipe)
    with pytest.raises(ValueError, match=message):
        pipe.load_lora_weights(folder)
    _assert_unchanged(pipe, before)


def test_a_failure_inside_peft_after_the_checks_is_rolled_back_keeping_an_earlier_lora(
    tmp_path, lora_folder, monkeypatch
):
    pipe = tiny_pipeline()
    pipe.load_lora_weights(lora_folder[0], adapter_name="first")
    before = _pipeline_state(pipe)
    load = type(pipe.transformer).load_lora_adapter

    def load_then_fail(self, *args, **kwargs):
        load(self, *args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(pipe.transformer), "load_lora_adapter", load_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.load_lora_weights(_new_class_lora(tmp_path), adapter_name="second")
    _assert_unchanged(pipe, before)
    # a pipeline that had no LoRA gets its plain modules back (no peft wrappers left in the state dict)
    plain = tiny_pipeline()
    before = _pipeline_state(plain)
    with pytest.raises(RuntimeError, match="out of memory"):
        plain.load_lora_weights(_new_class_lora(tmp_path / "again"))
    _assert_unchanged(plain, before)


def test_a_typo_in_a_local_lora_path_says_the_file_or_folder_does_not_exist(lora_folder):
    folder, path = lora_folder
    pipe = tiny_pipeline()
    typo = folder.parent / (folder.name + "x")
    with pytest.raises(
        FileNotFoundError, match=rf"the LoRA file or folder '{typo}' does not exist. Did you mean '{folder}'"
    ):
        pipe.load_lora_weights(str(typo))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.load_lora_weights(str(path.with_name("pytorch_lora_weight.safetensors")))
    assert not pipe.get_list_adapters()


def test_attention_kwargs_scale_the_lora_for_one_call_only(lora_folder):
    folder, _ = lora_folder
    plain = _latents(tiny_pipeline())
    pipe = tiny_pipeline()
    pipe.load_lora_weights(folder)
    full = _latents(pipe)
    assert not torch.equal(full, plain)  # the LoRA changes the samples
    off = pipe([1, 2], num_inference_steps=4, generator=torch.manual_seed(0), output_type="latent",
               attention_kwargs={"scale": 0.0}).images  # fmt: skip
    assert torch.equal(off, plain)  # scale 0: as without the LoRA
    assert pipe.attention_kwargs == {"scale": 0.0}
    assert torch.equal(_latents(pipe), full)  # the next call has the LoRA's full weight again
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        pipe([1, 2], num_inference_steps=0, attention_kwargs={"scale": 0.5})
    assert torch.equal(_latents(pipe), full)  # restored after a failed call too


@pytest.mark.parametrize(
    ("attention_kwargs", "error", "message"),
    [
        ({"scale": 0.5, "heads": 2}, ValueError, r"`attention_kwargs` takes only `scale` .* got \['heads'\]"),
        ({"scale": float("nan")}, ValueError, r"`attention_kwargs\['scale'\]` must be a finite number"),
        (0.5, TypeError, r"`attention_kwargs` must be a dict such as \{'scale': 0.5\}, got float"),
    ],
)
def test_bad_attention_kwargs_are_refused_before_the_transformer_runs(attention_kwargs, error, message, monkeypatch):
    pipe = tiny_pipeline()
    monkeypatch.setattr(pipe.transformer, "forward", lambda *args, **kwargs: pytest.fail("the transformer ran"))
    with pytest.raises(error, match=message):
        pipe([1], num_inference_steps=2, attention_kwargs=attention_kwargs)
