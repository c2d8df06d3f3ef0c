"""examples/train_enat.py fine-tuning: new classes on a class-conditional model (replace / extend), LoRA options and
the LoRA file format, and 🤗 datasets input. Tiny data and models from test_train_enat (CPU, offline)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from enat_diffusers import ENATPipeline, ENATTransformer2DModel

from .tiny_components import NUM_CLASSES
from .training_assets import common_args, fresh_accelerate_state, make_assets, recorded_training_prompts, train_enat

_fresh_accelerate_state = pytest.fixture(autouse=True)(fresh_accelerate_state)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("finetune_assets"))


def _finetune_args(assets, tmp_path, steps, *extra) -> list[str]:
    pretrained = ["--pretrained_model_name_or_path", assets.pipeline]
    return ["--train_data_dir", assets.classes, *pretrained, *common_args(tmp_path, steps, *extra)]


def _prepared_model(argv):
    """The model a run would start training from (new classes applied), and the run's data."""
    args = train_enat.parse_args(argv)
    data, config, _, plan = train_enat.prepare_data(args)
    model, _, _ = train_enat.build_models(args, config, "cpu", plan)
    return model, data


def _pretrained_embedding(assets) -> torch.Tensor:
    return ENATTransformer2DModel.from_pretrained(assets.pipeline, subfolder="transformer").class_embedding.weight


# ----------------------------------------------------------------------------------------------------------------------
# New classes
# ----------------------------------------------------------------------------------------------------------------------


def test_replace_gives_the_data_classes_with_stated_initial_embeddings(assets, tmp_path):
    # the tiny pipeline's classes: 0 "tench, Tinca tinca", 1 "goldfish", ..., 4 "hammerhead"; the data: blue green red
    argv = _finetune_args(
        assets, tmp_path, 3, "--new_classes", "replace", "--class_init", "red=Tinca tinca", "green=3"
    )
    model, data = _prepared_model(argv)
    pretrained = _pretrained_embedding(assets)
    mean = pretrained[:NUM_CLASSES].mean(dim=0)
    rows = model.class_embedding.weight
    assert model.config.num_classes == 3 and rows.shape == (4, pretrained.shape[1])
    assert data.id2label == {0: "blue", 1: "green", 2: "red"} and sorted(set(data.conditions)) == [0, 1, 2]
    torch.testing.assert_close(rows[0], mean)  # blue: no pair, no pretrained class of that name
    torch.testing.assert_close(rows[1], pretrained[3])  # green=3
    torch.testing.assert_close(rows[2], pretrained[0])  # red="Tinca tinca" (a synonym of class 0)
    torch.testing.assert_close(rows[3], pretrained[NUM_CLASSES])  # the null class keeps its embedding

    train_enat.main(argv)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe, ENATPipeline) and pipe.transformer.config.num_classes == 3
    assert pipe.labels == {"blue": 0, "green": 1, "red": 2}
    images = pipe(class_labels=["red", "blue"], num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert len(images) == 2


def test_extend_keeps_the_pretrained_classes_and_appends_new_ones(assets, tmp_path):
    classes = tmp_path / "classes"
    for name in ("goldfish", "red"):  # goldfish is a pretrained class, red is new
        (classes / name).mkdir(parents=True)
        for image in sorted((Path(assets.classes) / ("green" if name == "goldfish" else "red")).iterdir()):
            (classes / name / image.name).write_bytes(image.read_bytes())
    argv = _finetune_args(assets, tmp_path, 2, "--new_classes", "extend") + ["--train_data_dir", str(classes)]
    model, data = _prepared_model(argv)
    pretrained = _pretrained_embedding(assets)
    rows = model.class_embedding.weight
    assert model.config.num_classes == NUM_CLASSES + 1
    assert data.id2label[1] == "goldfish" and data.id2label[NUM_CLASSES] == "red"
    assert data.id2label[0] == "tench, Tinca tinca"  # pretrained names stay
    assert sorted(set(data.conditions)) == [1, NUM_CLASSES]  # goldfish images train class 1
    torch.testing.assert_close(rows[:NUM_CLASSES], pretrained[:NUM_CLASSES])
    torch.testing.assert_close(rows[NUM_CLASSES], pretrained[:NUM_CLASSES].mean(dim=0))
    torch.testing.assert_close(rows[NUM_CLASSES + 1], pretrained[NUM_CLASSES])

    train_enat.main(argv)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.transformer.config.num_classes == NUM_CLASSES + 1
    assert pipe.labels["red"] == NUM_CLASSES and pipe.labels["hammerhead"] == 4


def test_class_folders_that_rename_pretrained_classes_warn_without_new_classes(assets, tmp_path):
    args = train_enat.parse_args(_finetune_args(assets, tmp_path, 1))
    with pytest.warns(UserWarning, match=r"'tench, Tinca tinca' -> 'blue'.*pass --new_classes replace or extend"):
        train_enat.prepare_data(args)


NEW_CLASS_ERRORS = {
    "class_init without new_classes": (["--class_init", "red=0"], "--class_init .* goes with --new_classes"),
    "class_init format": (["--new_classes", "replace", "--class_init", "red"], "NEW=OLD pairs"),
    "class_init unknown data class": (
        ["--new_classes", "replace", "--class_init", "purple=0"],
        r"--class_init names \['purple'\], which are not classes of the data",
    ),
    "class_init unknown pretrained class": (
        ["--new_classes", "replace", "--class_init", "red=unicorn"],
        "'unicorn' is not a class of the pretrained model",
    ),
    "8-bit adam without bitsandbytes": (["--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes"),
    "lora dropout": (["--lora_rank", "4", "--lora_dropout", "1.5"], r"--lora_dropout must be in \[0, 1\)"),
    "text encoder lora on class data": (
        ["--lora_rank", "4", "--train_text_encoder"],
        "--train_text_encoder trains a text encoder LoRA: it needs --lora_rank and text data",
    ),
    "lora options without a rank": (["--lora_alpha", "8"], "--lora_alpha configure LoRA: add --lora_rank"),
    "lora target": (["--lora_rank", "4", "--lora_target_modules", "fc1"], r"\['fc1'\] match no linear layer"),
}


@pytest.mark.parametrize("case", sorted(NEW_CLASS_ERRORS))
def test_fine_tuning_arguments_are_checked_before_any_heavy_work(assets, tmp_path, case):
    extra, message = NEW_CLASS_ERRORS[case]
    if case.startswith("8-bit") and train_enat.importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    heavy_work = pytest.MonkeyPatch.context()
    with heavy_work as patch, pytest.raises(ValueError, match=message):
        patch.setattr(train_enat, "create_accelerator", lambda args: pytest.fail("heavy work started"))
        train_enat.main(_finetune_args(assets, tmp_path, 1, *extra))
    assert not (tmp_path / "out").exists()


def test_new_classes_need_class_names(assets, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0.png": 0, "1.png": 1}))
    argv = _finetune_args(assets, tmp_path, 1, "--new_classes", "replace")
    argv += ["--train_data_dir", str(Path(assets.classes) / "red"), "--labels_file", str(labels)]
    with pytest.raises(ValueError, match="--new_classes needs class names"):
        train_enat.main(argv)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------------


def _logits(transformer, labels) -> torch.Tensor:
    """The transformer's logits for a half-masked token grid, one row per label."""
    side = transformer.config.sample_size
    ids = torch.full((len(labels), side, side), transformer.mask_token_id)
    ids[:, : side // 2] = torch.arange(side) % transformer.config.codebook_size
    with torch.no_grad():
        return transformer(ids, class_labels=torch.tensor(labels)).logits


def test_lora_with_new_classes_is_one_file_that_load_lora_weights_turns_into_the_trained_model(assets, tmp_path):
    pytest.importorskip("peft")
    lora = ["--lora_rank", 4, "--lora_alpha", 8, "--lora_dropout", 0.1, "--lora_target_modules", "to_q", "ff.net.2"]
    argv = _finetune_args(assets, tmp_path, 3, "--new_classes", "replace", "--learning_rate", 1e-2, *lora)
    train_enat.main(argv)
    out = tmp_path / "out"
    weight_file = out / train_enat.LORA_WEIGHT_NAME
    tensors = load_file(weight_file)
    with safe_open(str(weight_file), framework="pt") as handle:
        metadata = handle.metadata()
    assert all(key.startswith("transformer.") for key in tensors)
    modules = {key.split(".lora_")[0] for key in tensors if ".lora_" in key}
    assert {next(t for t in ("attn.to_q", "ff.net.2") if name.endswith("." + t)) for name in modules} == {
        "attn.to_q",
        "ff.net.2",
    }
    assert tensors["transformer.class_embedding.weight"].shape == (4, 32)
    fused = DiffusionPipeline.from_pretrained(out)
    assert json.loads(metadata["id2label"]) == {"0": "blue", "1": "green", "2": "red"}
    assert fused.labels == {"blue": 0, "green": 1, "red": 2}
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"], config["transformer.lora_dropout"]) == (
        4,
        8,
        0.1,
    )
    torch.testing.assert_close(tensors["transformer.class_embedding.weight"], fused.transformer.class_embedding.weight)

    # the file through the base pipeline's load_lora_weights: the new classes by name, as the fused output folder
    # draws them; fusing gives the folder's weights
    pipe = DiffusionPipeline.from_pretrained(assets.pipeline)
    assert "red" not in pipe.labels
    pipe.load_lora_weights(out)
    assert pipe.labels == fused.labels and pipe.transformer.config.num_classes == 3
    names, ids = ["red", "blue", "green"], [2, 0, 1]
    loaded_logits, fused_logits = _logits(pipe.transformer, ids), _logits(fused.transformer, ids)
    torch.testing.assert_close(loaded_logits, fused_logits, atol=1e-5, rtol=1e-5)
    by_name = pipe(names, num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
    by_id = pipe(ids, num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
    assert torch.equal(by_name, by_id)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # diffusers' way to bake a LoRA in: the new classes stay
    assert pipe.labels == fused.labels
    fused_state = fused.transformer.state_dict()
    assert pipe.transformer.state_dict().keys() == fused_state.keys()
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, fused_state[key], atol=1e-5, rtol=1e-5, msg=key)

    card = (out / "README.md").read_text()
    assert f"from `{assets.pipeline}`" in card and "the images in `classes`" in card
    assert "LoRA (rank 4, alpha 8, dropout 0.1, on to_q, ff.net.2" in card and "0: blue, 1: green, 2: red" in card


# ----------------------------------------------------------------------------------------------------------------------
# 🤗 datasets
# ----------------------------------------------------------------------------------------------------------------------


def _images_and_names(assets) -> tuple[list, list[str]]:
    """The class-folder images in the order train_enat lists them, with their folder names."""
    data = train_enat.list_class_folders(Path(assets.classes))
    images = [Image.open(path).convert("RGB") for path in data.image_paths]
    return images, [data.id2label[label] for label in data.conditions]


def _args(**kwargs):
    defaults = {"dataset_config_name": None, "dataset_split": "train", "train_data_dir": None, "image_column": None,
                "caption_column": None, "label_column": None}  # fmt: skip
    return SimpleNamespace(**defaults | kwargs)


def test_class_data_from_a_dataset_with_a_label_column_trains_new_classes(assets, tmp_path):
    datasets = pytest.importorskip("datasets")
    images, names = _images_and_names(assets)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=sorted(set(names)))})
    labels = [sorted(set(names)).index(name) for name in names]
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(tmp_path / "ds")

    argv = _finetune_args(assets, tmp_path, 3, "--new_classes", "replace", "--cache_dir", tmp_path / "cache")
    argv[argv.index("--train_data_dir") : argv.index("--train_data_dir") + 2] = [
        "--dataset_name",
        str(tmp_path / "ds"),
    ]
    train_enat.main(argv)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.labels == {"blue": 0, "green": 1, "red": 2} and pipe.transformer.config.num_classes == 3
    # the same images as the class folders: the same tokens
    (dataset_cache,) = (tmp_path / "cache").iterdir()
    folder_data = train_enat.list_class_folders(Path(assets.classes))
    vqvae = train_enat.MaskGITVQModel.from_pretrained(assets.pipeline, subfolder="vqvae")
    folder_tokens = train_enat.tokenize_images(vqvae, folder_data, train_enat.parse_args(argv), Accelerator(cpu=True))
    assert torch.equal(load_file(dataset_cache)["token_ids"], folder_tokens["token_ids"])


def test_text_data_from_an_imagefolder_with_captions(assets, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    images, names = _images_and_names(assets)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, (image, name) in enumerate(zip(images, names, strict=True)):
            image.save(folder / f"{index}.png")
            metadata.write(json.dumps({"file_name": f"{index}.png", "caption": [f"a {name} tile", name]}) + "\n")
    assert datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").num_rows == len(images)

    data = ["--dataset_name", "imagefolder", "--train_data_dir", str(folder), "--caption_column", "caption"]
    model = ["--pretrained_model_name_or_path", assets.text_pipeline]
    with recorded_training_prompts() as prompts:
        train_enat.main(data + model + common_args(tmp_path, 3, "--cond_drop_prob", 0))
    assert set(prompts) <= {f"a {name} tile" for name in names} | set(names) and len(set(prompts)) > 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "the dataset `imagefolder`" in card and f"{2 * len(images)} samples ({len(images)} images, captions)" in card
    )


def test_dataset_columns_labels_and_cache_identity(assets, tmp_path):
    datasets = pytest.importorskip("datasets")
    images, names = _images_and_names(assets)
    datasets.Dataset.from_dict({"picture": images, "kind": names, "id": list(range(len(names)))}).save_to_disk(
        tmp_path / "ds"
    )
    args = _args(dataset_name=str(tmp_path / "ds"), label_column="kind")
    data = train_enat.list_training_data(args)  # the first image column; class names from strings, sorted
    assert data.id2label == {0: "blue", 1: "green", 2: "red"} and not data.text
    assert [data.id2label[label] for label in data.conditions] == names
    assert train_enat.list_training_data(_args(dataset_name=str(tmp_path / "ds"), label_column="id")).id2label is None
    with pytest.raises(
        ValueError, match=r"--label_column 'label': the dataset has no such column .*'picture', 'kind'"
    ):
        train_enat.list_training_data(_args(dataset_name=str(tmp_path / "ds")))
    with pytest.raises(ValueError, match="--image_column 'kind' is a Value, not images"):
        train_enat.list_training_data(_args(dataset_name=str(tmp_path / "ds"), image_column="kind"))
    with pytest.raises(ValueError, match="--dataset_name .*missing.* cannot be loaded"):
        train_enat.list_training_data(_args(dataset_name=str(tmp_path / "missing")))

    # the token cache follows the image bytes of the rows
    key_args = SimpleNamespace(resolution=8, random_flip=False, cache_dir=str(tmp_path / "cache"))
    vqvae = train_enat.MaskGITVQModel.from_pretrained(assets.pipeline, subfolder="vqvae")
    key = train_enat.token_cache_path(key_args, data, vqvae)
    assert train_enat.token_cache_path(key_args, train_enat.list_training_data(args), vqvae) == key
    images[5] = images[5].rotate(90)
    datasets.Dataset.from_dict({"picture": images, "kind": names}).save_to_disk(tmp_path / "ds2")
    changed = train_enat.list_training_data(_args(dataset_name=str(tmp_path / "ds2"), label_column="kind"))
    assert train_enat.token_cache_path(key_args, changed, vqvae) != key
    assert Image.open(changed.open_image(5)).convert("RGB").tobytes() == images[5].tobytes()


def test_text_encoder_lora_is_trained_saved_fused_and_loaded_by_load_lora_weights(assets, tmp_path):
    pytest.importorskip("peft")
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    data = ["--caption_data_dir", assets.captions, "--pretrained_model_name_or_path", assets.text_pipeline]
    lora = ["--lora_rank", 4, "--train_text_encoder", "--learning_rate", 1e-2]
    train_enat.main(data + common_args(tmp_path, 3, *lora))
    out = tmp_path / "out"
    tensors = load_file(out / train_enat.LORA_WEIGHT_NAME)
    with safe_open(str(out / train_enat.LORA_WEIGHT_NAME), framework="pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    text_keys = {key.removeprefix("text_encoder."): value for key, value in tensors.items()
                 if key.startswith("text_encoder.")}  # fmt: skip
    assert text_keys and any(key.startswith("transformer.") for key in tensors)
    assert {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in text_keys} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
    }
    assert any(value.abs().sum() > 0 for key, value in text_keys.items() if "lora_B" in key)
    assert config["text_encoder.r"] == 4 and config["transformer.r"] == 4

    # the saved text encoder is the base one with the adapter of the file merged in, and has no LoRA layers
    pipe = DiffusionPipeline.from_pretrained(out)
    base = DiffusionPipeline.from_pretrained(assets.text_pipeline).text_encoder
    assert not any("lora" in key for key in pipe.text_encoder.state_dict())
    args = train_enat.parse_args(data + common_args(tmp_path, 1, *lora))
    inject_adapter_in_model(train_enat.lora_config(args, train_enat.TEXT_ENCODER_LORA_TARGET_MODULES), base)
    set_peft_model_state_dict(base, text_keys)
    expected = train_enat.fused_text_encoder(base, args)
    original = DiffusionPipeline.from_pretrained(assets.text_pipeline).text_encoder.state_dict()
    saved = pipe.text_encoder.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(value, expected.state_dict()[key], msg=key)
    assert any(not torch.equal(saved[key], original[key]) for key in saved if key.endswith("q_proj.weight"))
    assert pipe("a red tile", num_inference_steps=2).images[0].size == (8, 8)

    # load_lora_weights puts the file's text encoder LoRA into the pipeline's text encoder (one adapter name for both
    # models): the prompt encodes as with the saved, merged text encoder; unloading gives the base encoder back
    def embeds(pipeline):
        return pipeline.encode_prompt("a red tile", do_classifier_free_guidance=False).prompt_embeds

    loaded = DiffusionPipeline.from_pretrained(assets.text_pipeline)
    before = embeds(loaded)
    loaded.load_lora_weights(out, adapter_name="tiles")
    assert loaded.get_list_adapters() == {"transformer": ["tiles"], "text_encoder": ["tiles"]}
    torch.testing.assert_close(embeds(loaded), embeds(pipe), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(embeds(loaded), before, atol=1e-4)
    loaded.unload_lora_weights()
    assert torch.equal(embeds(loaded), before)


def test_8bit_adam_uses_bitsandbytes_adamw8bit(assets, tmp_path, monkeypatch):
    """bitsandbytes is not installed on the test machines: a stand-in module records that its AdamW8bit is used."""
    import importlib.machinery
    import types

    created = []

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            created.append(kwargs)
            super().__init__(*args, **kwargs)

    module = types.ModuleType("bitsandbytes")
    module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    module.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)
    train_enat.main(
        _finetune_args(assets, tmp_path, 1, "--new_classes", "replace", "--use_8bit_adam", "--adam_weight_decay", 0.05)
    )
    assert len(created) == 1 and created[0]["weight_decay"] == 0.05
