#!/usr/bin/env python
"""Generate a labelled grid of images with an ENAT pipeline (by default the packaged handwritten-digit demo).

    python examples/generate.py                                  # all 10 digits -> enat_digits.png
    python examples/generate.py --class_ids 3 7 --images_per_class 4 --seed 1
    python examples/generate.py --prompt "a handwritten seven" "the digit 2"   # the text demo
    python examples/generate.py --model enat-l-256 --class_ids 207 360 --upscale 1   # any pipeline folder or Hub id

Columns are the classes (or prompts), rows the images per class; the class name (or prompt) is written under each
image. The demo images are 16x16, so they are enlarged (nearest neighbour, `--upscale`) to be visible.
"""

import argparse
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

import enat_diffusers
from enat_diffusers import ENATText2ImagePipeline

LABEL_HEIGHT = 28
DEMO_UPSCALE = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=str,
        default=None,
        help='A pipeline folder or Hub id (default: the packaged "digits" demo, or "digits-text" with --prompt).',
    )
    parser.add_argument("--class_ids", type=int, nargs="+", default=None, help="Class ids (default: all classes).")
    parser.add_argument("--prompt", type=str, nargs="+", default=None, help="Prompts, for a text pipeline.")
    parser.add_argument("--images_per_class", type=int, default=1, help="Images per class id or prompt (grid rows).")
    parser.add_argument("--steps", type=int, default=None, help="Sampling steps (default: the pipeline's, 8).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale", type=int, default=None, help="Nearest-neighbour factor (default 8 for demos).")
    parser.add_argument("--output", type=str, default="enat_digits.png")
    args = parser.parse_args(argv)
    if args.prompt and args.class_ids:
        parser.error("pass either --class_ids (class-conditional) or --prompt (text), not both")
    for flag in ("images_per_class", "steps", "upscale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer")
    return args


def load_pipeline(args: argparse.Namespace):
    if args.model is None:
        return enat_diffusers.load_demo_pipeline("digits-text" if args.prompt else "digits")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(args.model)


def conditions(pipeline, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The pipeline inputs and one caption per column."""
    if isinstance(pipeline, ENATText2ImagePipeline):
        if not args.prompt:
            raise ValueError(f"{args.model} is a text-to-image pipeline: pass --prompt")
        return {"prompt": args.prompt, "num_images_per_prompt": args.images_per_class}, list(args.prompt)
    if args.prompt:
        raise ValueError(f"{args.model or 'the digits demo'} is class-conditional: pass --class_ids, not --prompt")
    class_ids = args.class_ids or list(range(pipeline.transformer.config.num_classes))
    return {"class_labels": class_ids, "num_images_per_class": args.images_per_class}, class_names(pipeline, class_ids)


def class_names(pipeline, class_ids: list[int]) -> list[str]:
    """The first name `id2label` gives each class, else the id."""
    id2label = {int(key): names for key, names in (pipeline.config.get("id2label") or {}).items()}
    return [id2label[i].split(",")[0].strip() if i in id2label else str(i) for i in class_ids]


def generate(pipeline, inputs: dict, args: argparse.Namespace) -> list[Image.Image]:
    num_images = len(next(iter(inputs.values()))) * args.images_per_class
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(num_images)]
    options = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
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
    upscale = args.upscale or (DEMO_UPSCALE if args.model is None else 1)
    labelled_grid(images, captions, args.images_per_class, upscale).save(args.output)
    print(f"wrote {len(images)} images to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
