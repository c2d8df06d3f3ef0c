#!/usr/bin/env python
"""Edit images with an ENAT pipeline: inpainting (with --mask_image), outpainting (--outpaint) or image-to-image.

    python examples/edit.py --image digit.png --mask_image bottom.png --class_labels seven   # inpainting
    python examples/edit.py --image digit.png --strength 0.5 --class_labels 3 --num_images_per_prompt 4
    python examples/edit.py --image small.png --outpaint --class_labels 2   # extend a smaller image to the canvas
    python examples/edit.py --image photo.png --mask_image mask.png --prompt "the digit 7" --model demo:digits-text
    python examples/edit.py --figure assets/enat_editing.png   # the docs' editing picture (real digits)
    python examples/edit.py --measure_flops                     # transformer FLOPs of editing vs generation, ENAT-L

`--model` takes a pipeline folder, a Hub id or `demo:NAME` (default `demo:digits`; `demo:digits-text` with
`--prompt`). Images must have the model's resolution (16x16 for the demos). Masks: white = regenerate. The output
grid shows the samples of each input image in a row.

`--measure_flops` runs the editing rows of `examples/benchmark.py` without timing (`python examples/benchmark.py
--rows enat --editing --flops_only --batch_sizes 1`): transformer FLOPs per image of a full-size ENAT-L 256 (random
weights) inpainting 12.5 / 25 / 50% of the tokens with 1 and 4 samples per image, next to generation and aMUSEd's
inpainting path.
"""

import argparse
import sys
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import numpy as np
import PIL.Image
import torch

from enat_diffusers import ENATImg2ImgPipeline, ENATInpaintPipeline, ENATScheduler
from enat_diffusers.checks import check_strength
from enat_diffusers.cpu_memory import enable_cpu_memory_reuse
from enat_diffusers.demo import resolve_pretrained_location
from enat_diffusers.image_files import MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS, ImageFileError, open_image_file
from enat_diffusers.pipelines.pipeline_enat_editing import KEPT_CONTEXT_MODES
from enat_diffusers.quantization import set_precision
from enat_diffusers.schedulers.scheduling_enat import MASKING_SCHEDULES
from enat_diffusers.script_utils import add_precision_flag

EXAMPLES = Path(__file__).resolve().parent
DEMO_UPSCALE = 8
# Inpainting demo: the bottom half of each digit is redrawn with its true class.
DEMO_MASKED_ROWS = slice(8, 16)


def _examples_module(name: str):
    """Another script of this folder (the digit helpers of train_demo_digits, the editing rows of benchmark)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return __import__(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "--pretrained_model_name_or_path", dest="model", default=None,
                        help="Pipeline folder, Hub id or demo:NAME (default demo:digits, demo:digits-text for --prompt).")  # fmt: skip
    parser.add_argument("--image", nargs="+", default=None,
                        help=f"Image file(s) to edit (up to {MAX_IMAGE_PIXELS:,} pixels and {MAX_IMAGE_FILE_BYTES // 2**20} MiB each).")  # fmt: skip
    parser.add_argument("--mask_image", nargs="+", default=None,
                        help="Mask file(s), one per image or one for all (white = regenerate): inpainting.")  # fmt: skip
    parser.add_argument("--outpaint", action="store_true",
                        help="Place each (smaller) --image in the centre of a canvas of the model's size and generate the rest.")  # fmt: skip
    parser.add_argument("--strength", type=float, default=None,
                        help="In (0, 1]: the share of the steps that run (diffusers' meaning). Image-to-image "
                        "(default 0.5): how much is redrawn; inpainting (default 1.0): below 1 the region starts "
                        "from the image's own tokens.")  # fmt: skip
    parser.add_argument("--class_labels", nargs="+", default=None, help="Class ids or names, one per image or one.")
    parser.add_argument("--prompt", nargs="+", default=None, help="Prompts (text pipelines), one per image or one.")
    parser.add_argument("--num_images_per_prompt", type=int, default=1, help="Samples per input image.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the pipeline's.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--masking_schedule", choices=MASKING_SCHEDULES, default=None,
                        help="Masking schedule of the ENAT scheduler (default: the pipeline's).")  # fmt: skip
    parser.add_argument("--paste_back", action="store_true", help="Inpainting: original pixels outside the mask.")
    parser.add_argument("--kept_context_mode", choices=KEPT_CONTEXT_MODES, default="fixed",
                        help="How later steps see the kept tokens (fixed: computed once; refreshed: every step).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale", type=int, default=None,
                        help="Nearest-neighbour factor, 1 to 64 (default 8 for demos); the grid may have at most "
                        "100,000,000 pixels.")  # fmt: skip
    parser.add_argument("--output", default="enat_edit.png",
                        help="Image file (.png, .jpg, .webp, ...); a missing folder is created.")  # fmt: skip
    parser.add_argument("--figure", default=None, help="Write the editing guide's picture to this path and exit.")
    add_precision_flag(parser)
    parser.add_argument(
        "--measure_flops", action="store_true", help="Print the benchmark's editing FLOPs (ENAT-L) and exit."
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.figure or args.measure_flops:
        return args
    if not args.image:
        parser.error("--image is required (or --figure / --measure_flops)")
    if args.prompt and args.class_labels:
        parser.error("pass either --class_labels (class-conditional) or --prompt (text), not both")
    if not args.prompt and not args.class_labels:
        parser.error("pass --class_labels (class-conditional) or --prompt (text)")
    if args.outpaint and args.mask_image:
        parser.error("--outpaint makes its own masks: leave out --mask_image")
    for flag in ("num_images_per_prompt", "num_inference_steps", "upscale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer")
    if args.strength is not None:
        try:  # the step rule needs the step count; without --num_inference_steps the pipeline checks it
            check_strength(args.strength, args.num_inference_steps)
        except ValueError as error:
            parser.error(f"--strength: {error}")
    sizes = _examples_module("generate")
    if args.upscale is not None and args.upscale > sizes.MAX_UPSCALE:
        parser.error(f"--upscale must be at most {sizes.MAX_UPSCALE}, got {args.upscale}")
    problem = sizes.output_problem(args.output)
    if problem:
        parser.error(problem)
    # Read (and check) every input file now, before the model is loaded and the edit runs.
    try:
        args.images = [open_image_file(path, "--image") for path in args.image]
        args.masks = [open_image_file(path, "--mask_image").convert("L") for path in args.mask_image or []]
    except ImageFileError as error:
        parser.error(str(error))
    return args


def load_pipeline(model: str | None, pipeline_class, text: bool = False):
    from diffusers import DiffusionPipeline

    location = resolve_pretrained_location(model or ("demo:digits-text" if text else "demo:digits"))
    pipeline = pipeline_class.from_pipe(DiffusionPipeline.from_pretrained(location))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def set_masking_schedule(pipeline, masking_schedule: str | None) -> None:
    if masking_schedule is not None:
        pipeline.scheduler = ENATScheduler.from_config(pipeline.scheduler.config, masking_schedule=masking_schedule)


def class_labels_argument(values: list[str]) -> list[int | str]:
    return [int(value) if value.lstrip("-").isdigit() else value for value in values]


def grid(rows: list[list[PIL.Image.Image]], upscale: int) -> PIL.Image.Image:
    """Images in rows (all of one size), enlarged by `upscale`, one pixel apart on white."""
    width, height = rows[0][0].width * upscale, rows[0][0].height * upscale
    columns = max(len(row) for row in rows)
    canvas = PIL.Image.new("RGB", (columns * (width + 2), len(rows) * (height + 2)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            enlarged = image.convert("RGB").resize((width, height), PIL.Image.Resampling.NEAREST)
            canvas.paste(enlarged, (c * (width + 2), r * (height + 2)))
    return canvas


def edit(args: argparse.Namespace) -> list[list[PIL.Image.Image]]:
    """Runs the edit the flags ask for; returns one row per input image: input, mask (if any), samples."""
    text = bool(args.prompt)
    inpainting = bool(args.mask_image) or args.outpaint
    pipeline = load_pipeline(args.model, ENATInpaintPipeline if inpainting else ENATImg2ImgPipeline, text=text)
    choice = set_precision(pipeline, args.precision)
    if args.precision == "auto":
        print(f"precision auto: {choice.precision} ({choice.reason})")
    if text == pipeline.is_class_conditional:
        raise SystemExit("--prompt needs a text pipeline and --class_labels a class-conditional one")
    set_masking_schedule(pipeline, args.masking_schedule)
    images = args.images
    masks = None
    if args.outpaint:
        pairs = [pipeline.outpainting_inputs(image) for image in images]
        images, masks = [canvas for canvas, _ in pairs], [mask for _, mask in pairs]
    elif args.mask_image:
        masks = args.masks
    columns = 1 + (masks is not None) + args.num_images_per_prompt
    side = pipeline.token_grid_size * pipeline.vqvae.downsample_factor * output_upscale(args) + 2
    problem = _examples_module("generate").grid_size_problem(columns * side, len(images) * side)
    if problem:
        raise SystemExit(f"edit.py: error: {problem}")
    condition = {"prompt": args.prompt} if text else {"class_labels": class_labels_argument(args.class_labels)}
    # Flags left out take the pipeline's default (strength: 0.5 for image-to-image, 1.0 for inpainting).
    options = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "strength": args.strength,
    }
    options = {key: value for key, value in options.items() if value is not None}
    options["kept_context_mode"] = args.kept_context_mode
    samples = args.num_images_per_prompt
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(images) * samples)]
    if inpainting:
        options.update(mask_image=masks, paste_back=args.paste_back)
    try:
        outputs = pipeline(
            image=images, **condition, **options, num_images_per_prompt=samples, generator=generators
        ).images
    except ValueError as error:  # the pipeline's argument checks, raised before any model call
        raise SystemExit(f"edit.py: error: {error}") from None
    rows = []
    for index, image in enumerate(images):
        shown = [image] + ([masks[index if len(masks) > 1 else 0]] if masks else [])
        rows.append(shown + outputs[index * samples : (index + 1) * samples])
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# The digits demo: the inpainting check and the editing guide's picture


def held_out_digits(num_images: int):
    """Real digits the demo classifier did not see: `(N, 3, 16, 16)` images in [0, 1] and their labels."""
    from sklearn.model_selection import train_test_split

    demo = _examples_module("train_demo_digits")
    pixels, labels = demo.load_digit_data()
    _, test_pixels, _, test_labels = train_test_split(
        pixels, labels, test_size=0.25, random_state=demo.SEED, stratify=labels
    )
    images = (demo.digits_to_images(test_pixels[:num_images]) + 1) / 2
    return images, test_labels[:num_images]


def inpainting_demo(num_images: int = 100, seed: int = 0, pipeline=None, kept_context_mode: str = "fixed") -> dict:
    """
    The digits demo's inpainting check: real held-out digits, the bottom half masked, redrawn with the true class.
    Returns how often an independent classifier (the demo's SVC) recognises the true digit, and the fraction of
    tokens outside the mask left unchanged.
    """
    demo = _examples_module("train_demo_digits")
    pipeline = pipeline or load_pipeline("demo:digits", ENATInpaintPipeline)
    images, labels = held_out_digits(num_images)
    mask = torch.zeros(1, images.shape[2], images.shape[3])
    mask[:, DEMO_MASKED_ROWS] = 1
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    tokens = pipeline(
        image=images,
        mask_image=mask,
        class_labels=labels.tolist(),
        generator=generators,
        kept_context_mode=kept_context_mode,
        output_type="latent",
    ).images
    kept = ~pipeline.prepare_token_mask(mask)[1].expand_as(tokens)
    encoded = pipeline.encode_image(images * 2 - 1)
    classifier, _ = demo.fit_digit_classifier()
    predicted = classifier.predict(demo.images_to_digits(pipeline.decode_latents(tokens, "np")))
    return {
        "num_images": len(labels),
        "accuracy": float(np.mean(predicted == labels)),
        "unchanged_outside_mask": float((tokens[kept] == encoded[kept]).float().mean()),
    }


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    arrays = (images.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(array) for array in arrays]


def make_figure(path: str, seed: int = 0) -> str:
    """The editing guide's picture: rows inpainting (bottom half, true class), class-conditional editing (bottom half as
    another digit), outpainting (the centre 8x8 kept) and image-to-image (strength 0.5); columns input, mask (grey:
    image-to-image re-masks at random), four samples."""
    inpaint = load_pipeline("demo:digits", ENATInpaintPipeline)
    img2img = ENATImg2ImgPipeline.from_pipe(inpaint)
    img2img.set_progress_bar_config(disable=True)
    images, labels = held_out_digits(3)
    samples = 4
    pil_images = to_pil(images)

    def generators():
        return [torch.Generator().manual_seed(seed + i) for i in range(samples)]

    bottom = PIL.Image.new("L", (16, 16), 0)
    bottom.paste(255, (0, 8, 16, 16))
    rows = []
    for image, label in ((pil_images[0], int(labels[0])), (pil_images[1], (int(labels[1]) + 3) % 10)):
        out = inpaint(image=image, mask_image=bottom, class_labels=label, num_images_per_prompt=samples,
                      generator=generators()).images  # fmt: skip
        rows.append([image, bottom, *out])
    centre = pil_images[2].crop((4, 4, 12, 12))
    canvas, mask = inpaint.outpainting_inputs(centre)
    out = inpaint(image=canvas, mask_image=mask, class_labels=int(labels[2]), num_images_per_prompt=samples,
                  generator=generators()).images  # fmt: skip
    rows.append([canvas, mask, *out])
    out = img2img(image=pil_images[0], class_labels=int(labels[0]), strength=0.5, num_images_per_prompt=samples,
                  generator=generators()).images  # fmt: skip
    rows.append([pil_images[0], PIL.Image.new("L", (16, 16), 128), *out])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid(rows, DEMO_UPSCALE).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs of editing against generation: the benchmark's editing rows


MEASURE_FLOPS_ARGUMENTS = ("--rows", "enat", "--editing", "--flops_only", "--batch_sizes", "1")


def measure_flops(extra_arguments: tuple[str, ...] = ()) -> dict:
    """
    The editing rows of `examples/benchmark.py` (ENAT-L 256 by default, random weights), FLOPs and memory only:
    transformer FLOPs per output image of inpainting 12.5 / 25 / 50% of the tokens with 1 and 4 samples per image,
    generation and aMUSEd's inpainting path, with their ratios. `extra_arguments` are more benchmark flags.
    """
    return _examples_module("benchmark").main([*MEASURE_FLOPS_ARGUMENTS, *extra_arguments])


def output_upscale(args: argparse.Namespace) -> int:
    return args.upscale or (DEMO_UPSCALE if args.model is None or str(args.model).startswith("demo:") else 1)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    enable_cpu_memory_reuse()
    if args.measure_flops:
        return measure_flops()
    if args.figure:
        print(f"wrote {make_figure(args.figure, args.seed)}")
        return args.figure
    rows = edit(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid(rows, output_upscale(args)).save(args.output)
    print(f"wrote {sum(len(row) for row in rows)} images to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
