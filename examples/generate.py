#!/usr/bin/env python
"""Generate a labelled grid of images with an ENAT pipeline (by default the packaged handwritten-digit demo).

    python examples/generate.py                                  # all 10 digits -> enat_digits.png
    python examples/generate.py --class_labels 3 seven --num_images_per_prompt 4 --seed 1
    python examples/generate.py --prompt "a handwritten seven" "the digit 2"   # the text demo
    python examples/generate.py --model enat-l-256 --class_labels 207 "tiger cat" --upscale 1   # any folder or Hub id

Columns are the classes (or prompts), rows the images per class; the class name (or prompt) is written under each
image. The demo images are 16x16, so they are enlarged (nearest neighbour, `--upscale`) to be visible. The output's
folder is created if missing; its extension picks the image format (checked before sampling).
"""

import argparse
import textwrap
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw, ImageFont

from enat_diffusers import ENATText2ImagePipeline
from enat_diffusers.demo import resolve_pretrained_location
from enat_diffusers.quantization import set_precision
from enat_diffusers.script_utils import add_deprecated_flag, add_precision_flag

LABEL_HEIGHT = 28
DEMO_UPSCALE = 8
DEFAULT_DEMOS = {"class": "demo:digits", "text": "demo:digits-text"}


def class_label(text: str) -> int | str:
    """A class id (digits only) or a class name."""
    return int(text) if text.strip().isdigit() else text


def writable_extensions() -> set[str]:
    """The file extensions PIL can write images to (e.g. .png, .jpg, .webp)."""
    Image.init()
    return {extension for extension, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=str,
        default=None,
        help="A pipeline folder, Hub id, or demo:digits / demo:digits-text (default: the digits demo, or the text "
        "demo with --prompt).",
    )
    parser.add_argument(
        "--class_labels", type=class_label, nargs="+", default=None, help="Class ids or names (default: all)."
    )
    parser.add_argument("--prompt", type=str, nargs="+", default=None, help="Prompts, for a text pipeline.")
    parser.add_argument(
        "--num_images_per_prompt", type=int, default=1, help="Images per class label or prompt (grid rows)."
    )
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the pipeline's (8).")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance scale, diffusers' meaning: on above 1 (default: the pipeline's).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale", type=int, default=None, help="Nearest-neighbour factor (default 8 for demos).")
    parser.add_argument("--output", type=str, default="enat_digits.png", help="Image file (.png, .jpg, .webp, ...).")
    add_precision_flag(parser)
    for old, new in (
        ("--class_ids", "--class_labels"),
        ("--images_per_class", "--num_images_per_prompt"),
        ("--steps", "--num_inference_steps"),
    ):
        add_deprecated_flag(parser, old, new, removed_in="0.3.0")
    args = parser.parse_args(argv)
    if args.prompt and args.class_labels:
        parser.error("pass either --class_labels (class-conditional) or --prompt (text), not both")
    for flag in ("num_images_per_prompt", "num_inference_steps", "upscale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    extension = Path(args.output).suffix.lower()
    if extension not in writable_extensions():
        parser.error(
            f"--output {args.output!r}: the extension {extension or '(none)'} is no image format PIL writes; use e.g. "
            ".png, .jpg or .webp"
        )
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output!r} is a folder; give an image file name")
    if args.model is None:
        args.model = DEFAULT_DEMOS["text" if args.prompt else "class"]
    try:
        args.location = resolve_pretrained_location(args.model)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"--model: {error}")
    return args


def load_pipeline(args: argparse.Namespace):
    pipeline = DiffusionPipeline.from_pretrained(args.location)
    pipeline.set_progress_bar_config(disable=True)
    choice = set_precision(pipeline, args.precision)
    if args.precision == "auto":
        print(f"precision auto: {choice.precision} ({choice.reason})")
    return pipeline


def conditions(pipeline, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The pipeline inputs and one caption per column."""
    per_condition = {"num_images_per_prompt": args.num_images_per_prompt}
    if isinstance(pipeline, ENATText2ImagePipeline):
        if not args.prompt:
            raise ValueError(f"{args.model} is a text-to-image pipeline: pass --prompt")
        return {"prompt": args.prompt, **per_condition}, list(args.prompt)
    if args.prompt:
        raise ValueError(f"{args.model} is class-conditional: pass --class_labels, not --prompt")
    labels = args.class_labels or list(range(pipeline.transformer.config.num_classes))
    ids = [label if isinstance(label, int) else pipeline.get_label_ids(label)[0] for label in labels]
    return {"class_labels": ids, **per_condition}, class_names(pipeline, ids)


def class_names(pipeline, class_ids: list[int]) -> list[str]:
    """The first name `id2label` gives each class, else the id."""
    id2label = {int(key): names for key, names in (pipeline.config.get("id2label") or {}).items()}
    return [id2label[i].split(",")[0].strip() if i in id2label else str(i) for i in class_ids]


def generate(pipeline, inputs: dict, args: argparse.Namespace) -> list[Image.Image]:
    num_images = len(next(iter(inputs.values()))) * args.num_images_per_prompt
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(num_images)]
    options = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    options = {key: value for key, value in options.items() if value is not None}
    return pipeline(**inputs, **options, generator=generators).images


def labelled_grid(images: list[Image.Image], captions: list[str], rows: int, upscale: int) -> Image.Image:
    """Images in `len(captions)` columns (image `i` in column `i // rows`), a caption under each."""
    width, height = images[0].width * upscale, images[0].height * upscale
    font = ImageFont.load_default()
    lines = [textwrap.shorten(text, width=max(4, width // 7), placeholder="...") for text in captions]
    columns = len(captions)
    grid = Image.new("RGB", (columns * width, rows * (height + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        column, row = divmod(index, rows)
        left, top = column * width, row * (height + LABEL_HEIGHT)
        grid.paste(image.convert("RGB").resize((width, height), Image.Resampling.NEAREST), (left, top))
        text_width = draw.textlength(lines[column], font=font)
        draw.text((left + (width - text_width) / 2, top + height + 6), lines[column], fill="black", font=font)
    return grid


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    pipeline = load_pipeline(args)
    inputs, captions = conditions(pipeline, args)
    images = generate(pipeline, inputs, args)
    upscale = args.upscale or (DEMO_UPSCALE if args.model in DEFAULT_DEMOS.values() else 1)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, captions, args.num_images_per_prompt, upscale).save(output)
    print(f"wrote {len(images)} images to {args.output}")
    return args.output


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a class name or argument the pipeline refuses: one sentence, no traceback
        raise SystemExit(f"generate.py: error: {error}") from None
