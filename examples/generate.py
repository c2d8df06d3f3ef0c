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
import os
import textwrap
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw, ImageFont

from enat_diffusers import ENATText2ImagePipeline
from enat_diffusers.cpu_memory import enable_cpu_memory_reuse
from enat_diffusers.demo import resolve_pretrained_location
from enat_diffusers.quantization import set_precision
from enat_diffusers.script_utils import add_deprecated_flag, add_precision_flag

LABEL_HEIGHT = 28
DEMO_UPSCALE = 8
# Size limits, checked before sampling: the enlargement factor, and the pixels of the written grid (100 million:
# about 300 MB in memory as RGB, e.g. 10 columns of 16x16 demo images enlarged 64 times, 6 rows).
MAX_UPSCALE = 64
MAX_GRID_PIXELS = 100_000_000
DEFAULT_DEMOS = {"class": "demo:digits", "text": "demo:digits-text"}


def class_label(text: str) -> int | str:
    """A class id (digits only) or a class name."""
    return int(text) if text.strip().isdigit() else text


def writable_extensions() -> set[str]:
    """The file extensions PIL can write images to (e.g. .png, .jpg, .webp)."""
    Image.init()
    return {extension for extension, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def output_problem(output: str) -> str | None:
    """Why the image file `output` cannot be written (a sentence naming `--output`), or None: its extension must be
    an image format PIL writes, it must not be a folder, and its nearest existing folder must be writable."""
    path = Path(output)
    extension = path.suffix.lower()
    if extension not in writable_extensions():
        return (
            f"--output {output!r}: the extension {extension or '(none)'} is no image format PIL writes; use e.g. "
            ".png, .jpg or .webp"
        )
    if path.is_dir():
        return f"--output {output!r} is a folder; give an image file name"
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"--output {output!r}: {str(folder)!r} is a file, so the folder cannot be created"
    if not os.access(folder, os.W_OK):
        return f"--output {output!r}: the folder {str(folder)!r} is not writable"
    return None


def grid_size_problem(width: int, height: int) -> str | None:
    """A sentence when a grid of `width` x `height` pixels is larger than `MAX_GRID_PIXELS`, else None."""
    if width * height > MAX_GRID_PIXELS:
        return (
            f"the grid would be {width}x{height} pixels, more than {MAX_GRID_PIXELS:,}; use a smaller --upscale or "
            "fewer images"
        )
    return None


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
    parser.add_argument(
        "--upscale",
        type=int,
        default=None,
        help=f"Nearest-neighbour factor, 1 to {MAX_UPSCALE} (default 8 for demos); the grid may have at most "
        f"{MAX_GRID_PIXELS:,} pixels.",
    )
    parser.add_argument(
        "--output",
        type=str,
        default="enat_digits.png",
        help="Image file (.png, .jpg, .webp, ...); a missing folder is created.",
    )
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
    if args.upscale is not None and args.upscale > MAX_UPSCALE:
        parser.error(f"--upscale must be at most {MAX_UPSCALE}, got {args.upscale}")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    problem = output_problem(args.output)
    if problem:
        parser.error(problem)
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
    enable_cpu_memory_reuse()
    pipeline = load_pipeline(args)
    inputs, captions = conditions(pipeline, args)
    upscale = args.upscale or (DEMO_UPSCALE if args.model in DEFAULT_DEMOS.values() else 1)
    side = pipeline.token_grid_size * pipeline.vqvae.downsample_factor * upscale
    problem = grid_size_problem(len(captions) * side, args.num_images_per_prompt * (side + LABEL_HEIGHT))
    if problem:
        raise ValueError(problem)
    images = generate(pipeline, inputs, args)
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
