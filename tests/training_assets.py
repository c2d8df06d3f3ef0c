"""Tiny training data, models and arguments shared by the tests of examples/train_enat.py (CPU, offline)."""

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
from accelerate.state import AcceleratorState
from PIL import Image

from .example_scripts import load_example
from .tiny_components import tiny_clip, tiny_pipeline, tiny_text_pipeline, tiny_vqvae

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
IMAGES_PER_CLASS = 4  # 12 images, batch 4: 3 steps per epoch


train_enat = load_example("train_enat")


def fresh_accelerate_state():
    """Each in-process run of the script starts from a fresh accelerate state (use as an autouse fixture)."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def square(color, rng, size=8) -> Image.Image:
    pixels = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_assets(root: Path) -> SimpleNamespace:
    """Class folders, COCO and caption-folder text data, a tiny VQ model, a tiny CLIP, configs and pipelines."""
    rng = np.random.default_rng(0)
    classes, captions, coco_images = root / "classes", root / "captions", root / "coco_images"
    coco = {"images": [], "annotations": []}
    for name, color in COLORS.items():
        (classes / name).mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            image = square(color, rng)
            image.save(classes / name / f"{index}.png")
            captions.mkdir(exist_ok=True)
            image.save(captions / f"{name}{index}.png")
            (captions / f"{name}{index}.txt").write_text(f"a {name} tile\n\n{name}\n")
            coco_images.mkdir(exist_ok=True)
            image.save(coco_images / f"{name}{index}.jpg")
            image_id = len(coco["images"])
            coco["images"].append({"id": image_id, "file_name": f"{name}{index}.jpg"})
            coco["annotations"].append({"id": 2 * image_id, "image_id": image_id, "caption": f"{name} "})
            coco["annotations"].append({"id": 2 * image_id + 1, "image_id": image_id, "caption": f"a {name} tile"})
    (root / "captions_train.json").write_text(json.dumps(coco))
    tiny_vqvae().save_pretrained(root / "vq")
    text_encoder, tokenizer = tiny_clip(root / "clip")
    text_encoder.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    tiny_pipeline().save_pretrained(root / "pipeline")
    tiny_text_pipeline(root / "text_tokenizer").save_pretrained(root / "text_pipeline")
    config = {"hidden_size": 32, "num_attention_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 1}
    (root / "config.json").write_text(json.dumps(config))
    return SimpleNamespace(
        root=root,
        classes=str(classes),
        captions=str(captions),
        coco_json=str(root / "captions_train.json"),
        coco_images=str(coco_images),
        vq=str(root / "vq"),
        clip=str(root / "clip"),
        pipeline=str(root / "pipeline"),
        text_pipeline=str(root / "text_pipeline"),
        config=str(root / "config.json"),
    )


def common_args(tmp_path, steps, *extra) -> list[str]:
    return [
        "--resolution", "8", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
        "--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "3e-3",
        "--lr_warmup_steps", "0", *map(str, extra),
    ]  # fmt: skip


@contextlib.contextmanager
def recorded_training_prompts():
    """Within the block, every prompt that train_enat.py encodes for training is appended to the yielded list."""
    prompts = []
    model_kwargs = train_enat.TextConditioning.model_kwargs

    def record_prompts(conditioning, batch):
        prompts.extend(batch)
        return model_kwargs(conditioning, batch)

    with mock.patch.object(train_enat.TextConditioning, "model_kwargs", autospec=True, side_effect=record_prompts):
        yield prompts
