"""A browser app for any ENAT pipeline: generate images and watch, step by step, which tokens ENAT reveals.

    python -m enat_diffusers.app                         # the packaged digits demo on http://127.0.0.1:7860
    python -m enat_diffusers.app --model demo:digits-text
    python -m enat_diffusers.app --model path/to/enat-l-256 --port 8000

Needs the optional Gradio dependency: `pip install "enat-diffusers[app]"`. The sampling code below does not import
Gradio, so it can be used (and tested) without a browser; `build_demo` turns it into a Gradio page.

The step view shows, after each sampling step, the token grid decoded to pixels. Tokens revealed at that step (the
critical tokens ENAT re-encodes) get an orange frame, tokens that were already visible (whose features ENAT reuses)
a thin blue one. A still-masked token has no value yet: it is shown as the step's prediction for it (the token the
scheduler sampled there before re-masking it), faded towards grey, so one sees what the model currently guesses and
how much of it is already fixed.

The Edit tab inpaints (regenerates a painted region), outpaints (draws around a shrunken copy of the image) or runs
image-to-image (re-masks a share of the tokens, `strength`), with ENATInpaintPipeline / ENATImg2ImgPipeline made from
the loaded pipeline by `from_pipe` (same modules, nothing reloaded).
"""

import argparse
import difflib
import errno
import logging
import math
import random
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .checks import check_strength
from .cpu_memory import enable_cpu_memory_reuse
from .demo import DEMO_PREFIX, resolve_pretrained_location
from .image_files import (
    MAX_IMAGE_FILE_SIZE,
    MAX_IMAGE_PIXELS,
    ImageFileError,
    check_image_file,
    open_image_file,
    to_8bit,
)
from .pipelines import (
    ENAT_PIPELINES,
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    ENATText2ImagePipeline,
)
from .quantization import set_precision
from .schedulers import ENATScheduler
from .schedulers.scheduling_enat import AMUSED_MASKING_SCHEDULES, MASKING_SCHEDULES
from .script_utils import add_precision_flag

logger = logging.getLogger(__name__)

DEFAULT_MODEL = f"{DEMO_PREFIX}digits"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Requests that may sample at the same time; each gets its own pipeline (see `ENATApp.request_pipeline`).
DEFAULT_CONCURRENCY = 2
# Result images, uploads and per-tab results are deleted this many seconds after they were made (`--cache_max_age`),
# checked every `min(CACHE_CLEANUP_INTERVAL, max_age)` seconds.
DEFAULT_CACHE_MAX_AGE = 3600
CACHE_CLEANUP_INTERVAL = 300
# What a text-to-image page starts with (the digits-text demo knows digits only).
DEFAULT_PROMPT = "a photo"
DEMO_PROMPT = "a handwritten seven"
# The step view needs each step's prediction in the step callback.
PREDICTION_TENSOR = "pred_original_sample"
# Images and step frames are enlarged (nearest neighbour, whole factors) to at least this many pixels per side.
DISPLAY_SIZE = 256
MAX_IMAGES_PER_CONDITION = 8
MAX_IMAGES_PER_REQUEST = 16
MAX_SEED = 2**32 - 1
MAX_GUIDANCE_SCALE = 20.0

REVEALED_COLOR = (255, 140, 0)
REUSED_COLOR = (30, 144, 255)
MASKED_GREY = (128, 128, 128)
# Share of grey mixed into a still-masked token's predicted pixels.
MASKED_FADE = 0.7
STEP_VIEW_LEGEND = (
    "**Step by step.** After each step, the token grid decoded to pixels. "
    "<span style='color:rgb(255,140,0)'>&#9632;</span> orange frame: revealed at this step (the critical tokens); "
    "<span style='color:rgb(30,144,255)'>&#9632;</span> blue frame: visible before, reused; "
    "faded grey: still masked, showing the step's prediction for it. Click an image above to see its steps."
)


EDIT_MODES = ("inpaint", "outpaint", "image-to-image")
# Outpainting keeps the image at this share of the model's side (rounded to whole tokens), centred, and draws the rest.
OUTPAINT_KEEP = 0.5
# An editor stroke pixel counts as painted from this alpha (or grey level) on; Gradio's brush edges are anti-aliased.
PAINTED_LEVEL = 128
DEFAULT_STRENGTH = 0.5

EDIT_HELP = (
    "**Edit.** Upload a square image (PNG, JPEG, WebP, ... up to {max_side}x{max_side} pixels and {max_file}; "
    "scaled to the model's {side}x{side} pixels, each pixel the mean of those it covers) or draw a sample (its "
    "bottom half comes painted). **inpaint** regenerates what the white brush "
    "painted (a pixel is regenerated when any painted pixel falls in it); **outpaint** shrinks the image to "
    "{keep}% of the side, centres it and draws the rest (the painting is not used); **image-to-image** redraws as "
    "much as the strength says."
)


class AppInputError(ValueError):
    """A request the app cannot run; its message is shown in the page as it is."""


@dataclass
class StepRecord:
    """Token grids `(batch, side, side)` of one sampling step, for every image of the request."""

    before: torch.LongTensor
    after: torch.LongTensor
    prediction: torch.LongTensor


@dataclass
class StepFrame:
    """One frame of the step view: the picture and the token masks it marks, each `(side, side)` bool."""

    image: Image.Image
    caption: str
    revealed: torch.BoolTensor
    reused: torch.BoolTensor
    masked: torch.BoolTensor


@dataclass
class GenerationResult:
    images: list[Image.Image]
    captions: list[str]
    seeds: list[int]
    steps: list[StepRecord]


@dataclass
class EditResult:
    """What the edit pipeline got (`image` and `mask` at the model's resolution; `mask` is None for image-to-image)
    and what it made: `tokens` `(num_images, side, side)` and their decoded `images`."""

    image: Image.Image
    mask: Image.Image | None
    images: list[Image.Image]
    captions: list[str]
    seeds: list[int]
    tokens: torch.LongTensor


def display_scale(side: int) -> int:
    """Whole nearest-neighbour factor that makes `side` pixels at least `DISPLAY_SIZE`."""
    return max(1, math.ceil(DISPLAY_SIZE / side))


def upscale(image: Image.Image) -> Image.Image:
    scale = display_scale(min(image.size))
    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def check_device(device: str | None) -> str:
    """The torch device to run on (`cuda` if available, else `cpu`, when None); a device this machine does not have
    stops the app with one sentence before the model is loaded."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise SystemExit(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"--device {device!r}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                "use --device cpu."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {device!r}: MPS is not available on this machine; use --device cpu.")
    return device


def check_port(host: str, port: int) -> None:
    """Stops the app with one sentence, before the model is loaded, when `port` is already taken on `host`."""
    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"--port {port} is already in use on {host} (another app or server); choose another with --port."
            ) from None
        raise SystemExit(f"--host {host!r} --port {port} cannot be served: {error.strerror or error}.") from None


def load_pipeline(model: str = DEFAULT_MODEL, device: str | None = None):
    """Loads an ENAT pipeline from a folder, a Hub id or `demo:NAME`; exits with one sentence if that fails."""
    from diffusers import DiffusionPipeline

    device = check_device(device)

    try:
        pipeline = DiffusionPipeline.from_pretrained(resolve_pretrained_location(model))
    except (OSError, ValueError) as error:
        raise SystemExit(f"--model {model!r} could not be loaded as a pipeline: {error}") from None
    if not isinstance(pipeline, ENAT_PIPELINES):
        names = " or ".join(cls.__name__ for cls in ENAT_PIPELINES)
        raise SystemExit(f"--model {model!r} is a {type(pipeline).__name__}; the app takes {names}")
    return pipeline.to(device)


class ENATApp:
    """
    What the page does, without Gradio: check a request, sample with a pipeline of its own (`from_pipe`: the same
    modules, its own scheduler), and turn the token grids the step callback records into the step view.
    """

    def __init__(self, pipeline: ENATPipeline | ENATText2ImagePipeline, model_name: str = ""):
        self.pipeline = pipeline
        self.model_name = model_name
        self.pipeline.set_progress_bar_config(disable=True)

    # ----------------------------------------------------------------------------------------------------------
    # what the page offers

    @property
    def is_text_to_image(self) -> bool:
        return isinstance(self.pipeline, ENATText2ImagePipeline)

    @property
    def per_image_seeds(self) -> bool:
        """ENATScheduler draws each image from its own generator, so image `i` gets seed `seed + i`; diffusers'
        AmusedScheduler takes one generator for the batch, so its images share the request's seed."""
        return isinstance(self.pipeline.scheduler, ENATScheduler)

    @property
    def images_label(self) -> str:
        return "Images" if self.is_text_to_image else "Images per class"

    @property
    def num_tokens(self) -> int:
        return self.pipeline.token_grid_size**2

    @property
    def masking_schedules(self) -> tuple[str, ...]:
        if isinstance(self.pipeline.scheduler, ENATScheduler):
            return MASKING_SCHEDULES
        return AMUSED_MASKING_SCHEDULES

    def class_names(self) -> dict[int, str]:
        """The first name `id2label` gives each class (the id itself where there is none)."""
        id2label = {int(key): names for key, names in (self.pipeline.config.get("id2label") or {}).items()}
        num_classes = self.pipeline.transformer.config.num_classes
        return {i: id2label[i].split(",")[0].strip() if i in id2label else str(i) for i in range(num_classes)}

    @property
    def default_condition(self) -> str:
        """What the page starts with, so that the first click on Generate draws: the first class, or a prompt."""
        if self.is_text_to_image:
            return DEMO_PROMPT if self.model_name.startswith(DEMO_PREFIX) else DEFAULT_PROMPT
        return self.class_choices()[0][1]

    def class_choices(self) -> list[tuple[str, str]]:
        """Dropdown entries `(shown, value)`; the value is what `parse_class_labels` reads back."""
        return [(name if name == str(i) else f"{name} ({i})", str(i)) for i, name in self.class_names().items()]

    # ----------------------------------------------------------------------------------------------------------
    # checking a request (before any sampling)

    def parse_class_labels(self, selection: str | Sequence[str] | None) -> list[int]:
        """Class ids from dropdown values: ids, or any class name `id2label` knows; a typed entry may list several,
        separated by commas."""
        entries = [selection] if isinstance(selection, (str, int)) else list(selection or [])
        labels = [part.strip() for entry in entries for part in str(entry).split(",") if part.strip()]
        if not labels:
            raise AppInputError("Class: choose at least one class.")
        num_classes = self.pipeline.transformer.config.num_classes
        ids = []
        for label in labels:
            if re.fullmatch(r"\d+", label):
                class_id = int(label)
                if class_id >= num_classes:
                    raise AppInputError(f"Class: {class_id} is not a class id of this model (0 to {num_classes - 1}).")
                ids.append(class_id)
                continue
            if label not in self.pipeline.labels:
                matches = difflib.get_close_matches(label, list(self.pipeline.labels), n=3, cutoff=0.5)
                hint = f" Did you mean {' or '.join(repr(match) for match in matches)}?" if matches else ""
                raise AppInputError(f"Class: unknown class name {label!r}.{hint} Pick a class from the list.")
            ids.extend(self.pipeline.get_label_ids(label))
        return ids

    def check_request(
        self,
        condition: str | Sequence[str] | None,
        num_images: int,
        num_inference_steps: int,
        guidance_scale: float,
        masking_schedule: str,
        seed: int,
    ) -> tuple[dict, list[str]]:
        """The pipeline's conditioning arguments and one caption per image, or an `AppInputError` naming the input."""
        num_images = _whole_number(num_images, self.images_label)
        if not 1 <= num_images <= MAX_IMAGES_PER_CONDITION:
            raise AppInputError(f"{self.images_label}: choose 1 to {MAX_IMAGES_PER_CONDITION}, got {num_images}.")
        steps = _whole_number(num_inference_steps, "Steps")
        if not 1 <= steps <= self.num_tokens:
            raise AppInputError(
                f"Steps: this model has {self.num_tokens} tokens per image, so choose 1 to {self.num_tokens} steps, "
                f"got {steps}."
            )
        if not isinstance(guidance_scale, (int, float)) or not 1 <= guidance_scale <= MAX_GUIDANCE_SCALE:
            raise AppInputError(
                f"Guidance scale: choose a number from 1 (no guidance) to {MAX_GUIDANCE_SCALE:g}, got {guidance_scale}."
            )
        if masking_schedule not in self.masking_schedules:
            raise AppInputError(
                f"Masking schedule: choose one of {', '.join(self.masking_schedules)}, got {masking_schedule!r}."
            )
        seed = _whole_number(seed, "Seed")
        if not 0 <= seed <= MAX_SEED:
            raise AppInputError(f"Seed: choose a whole number from 0 to {MAX_SEED}, got {seed}.")

        if self.is_text_to_image:
            prompt = (condition or "").strip() if isinstance(condition, str) else ""
            if not prompt:
                raise AppInputError("Prompt: enter a prompt.")
            return {"prompt": prompt, "num_images_per_prompt": num_images}, [prompt] * num_images
        class_ids = self.parse_class_labels(condition)
        if len(class_ids) * num_images > MAX_IMAGES_PER_REQUEST:
            raise AppInputError(
                f"{self.images_label}: {len(class_ids)} classes x {num_images} images is more than {MAX_IMAGES_PER_REQUEST} "
                "images per request."
            )
        names = self.class_names()
        captions = [names[i] for i in class_ids for _ in range(num_images)]
        return {"class_labels": class_ids, "num_images_per_prompt": num_images}, captions

    # ----------------------------------------------------------------------------------------------------------
    # sampling

    def request_pipeline(self, masking_schedule: str, pipeline_class=None):
        """
        The pipeline of one request, made by diffusers' `from_pipe`: the models are shared (read-only at inference),
        but the per-call state that diffusers pipelines keep on themselves (`_guidance_scale`, `_interrupt`, ...)
        and the scheduler (`set_timesteps` stores the schedule on it) are the request's own, so concurrent requests
        cannot change each other's sampling.
        """
        scheduler = type(self.pipeline.scheduler).from_config(
            self.pipeline.scheduler.config, masking_schedule=masking_schedule
        )
        pipeline = (pipeline_class or type(self.pipeline)).from_pipe(self.pipeline, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def request_generators(self, seed: int, captions: list[str]):
        """`(generator, seeds, captions)` for a request of `len(captions)` images from `seed` (see `per_image_seeds`)."""
        if self.per_image_seeds:
            seeds = [seed + i for i in range(len(captions))]
            generator = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            captions = [f"{caption} · seed {s}" for caption, s in zip(captions, seeds, strict=True)]
        else:
            seeds = [seed] * len(captions)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            captions = [f"{caption} · seed {seed} #{i + 1}" for i, caption in enumerate(captions)]
        return generator, seeds, captions

    def generate(
        self,
        condition: str | Sequence[str] | None,
        num_images: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        masking_schedule: str | None = None,
        seed: int = 0,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """
        Samples `num_images` images per class (or for the prompt); with ENATScheduler image `i` uses the seed
        `seed + i` alone, so it is the same image whatever else is requested (see `per_image_seeds`).
        `on_step(step_index, num_steps)` is called after each step.
        """
        config = self.pipeline.config
        num_inference_steps = (
            config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        )
        guidance_scale = config.default_guidance_scale if guidance_scale is None else guidance_scale
        masking_schedule = masking_schedule or self.pipeline.scheduler.config.masking_schedule
        inputs, captions = self.check_request(
            condition, num_images, num_inference_steps, guidance_scale, masking_schedule, seed
        )
        seed, steps = int(seed), int(num_inference_steps)
        pipeline = self.request_pipeline(masking_schedule)
        side = pipeline.token_grid_size
        records: list[StepRecord] = []
        previous = [torch.full((len(captions), side, side), pipeline.mask_token_id, dtype=torch.long)]
        # The step view shows each step's prediction, which the pipelines pass to the step callback on request.
        tensor_inputs = ["latents", PREDICTION_TENSOR]

        def record(pipe, step_index, timestep, callback_kwargs):
            latents = callback_kwargs["latents"].detach().cpu()
            prediction = callback_kwargs[PREDICTION_TENSOR].detach().cpu()
            records.append(StepRecord(before=previous[0], after=latents, prediction=prediction))
            previous[0] = latents
            if on_step is not None:
                on_step(step_index, steps)
            return {}

        generator, seeds, captions = self.request_generators(seed, captions)
        output = pipeline(
            **inputs,
            num_inference_steps=steps,
            guidance_scale=float(guidance_scale),
            generator=generator,
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )
        return GenerationResult(images=list(output.images), captions=captions, seeds=seeds, steps=records)

    # ----------------------------------------------------------------------------------------------------------
    # editing

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the model makes and edits."""
        return self.pipeline.token_grid_size * self.pipeline.vqvae.downsample_factor

    def prepare_edit_image(self, image) -> Image.Image:
        """
        The image to edit at the model's resolution. Any square image is accepted: it is resized to `image_size`
        with a box filter (each model pixel the mean of the pixels it covers, so an image enlarged by a whole factor
        with nearest neighbour, like the app's own, comes back exactly). Other shapes are refused.
        """
        side = self.image_size
        if image is None:
            raise AppInputError("Image: upload an image to edit, or draw a sample.")
        image = _read_image(image, "Image")
        if image.width != image.height:
            raise AppInputError(
                f"Image: this model edits square images of {side}x{side} pixels (a larger square is scaled down); "
                f"got {image.width}x{image.height}. Crop it to a square first."
            )
        image = image.convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BOX)
        return image

    def prepare_edit_mask(self, mask) -> Image.Image:
        """
        The painted mask at the model's resolution, white (regenerate) or black. A mask pixel is painted where its
        alpha (for a mask whose alpha varies, like the editor's brush layer) or else its grey level is at least
        `PAINTED_LEVEL`; a model pixel is masked when any painted pixel falls in it.
        """
        side = self.image_size
        if mask is None:
            raise AppInputError("Mask: paint the region to regenerate.")
        mask = _read_image(mask, "Mask", keep_alpha=True)
        if mask.width != mask.height:
            raise AppInputError(f"Mask: must be square like the image, got {mask.width}x{mask.height}.")
        level = _painted_level(mask)
        painted = level.point(lambda value: 255 if value >= PAINTED_LEVEL else 0)
        mask = painted.resize((side, side), Image.Resampling.BOX).point(lambda value: 255 if value > 0 else 0)
        if not mask.getbbox():
            raise AppInputError("Mask: nothing is painted; paint the region to regenerate (white brush).")
        return mask

    def outpainting_source(self, image: Image.Image) -> Image.Image:
        """The image shrunk to `OUTPAINT_KEEP` of the model's side, rounded to whole tokens (box filter)."""
        factor = self.pipeline.vqvae.downsample_factor
        keep = max(factor, round(self.image_size * OUTPAINT_KEEP / factor) * factor)
        return image.resize((keep, keep), Image.Resampling.BOX)

    def edit(
        self,
        image,
        mask=None,
        condition: str | Sequence[str] | None = None,
        mode: str = "inpaint",
        strength: float = DEFAULT_STRENGTH,
        num_images: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        on_step: Callable[[int, int], None] | None = None,
    ) -> EditResult:
        """
        Edits one image with one class (or the prompt): `inpaint` regenerates the painted `mask`; `outpaint` ignores
        the mask, shrinks the image (`outpainting_source`), centres it on the model's canvas and draws the rest;
        `image-to-image` redraws as much as `strength` says. Seeds as in `generate`; every input is checked before
        any sampling.
        """
        if mode not in EDIT_MODES:
            raise AppInputError(f"Mode: choose one of {', '.join(EDIT_MODES)}, got {mode!r}.")
        config = self.pipeline.config
        steps = config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = config.default_guidance_scale if guidance_scale is None else guidance_scale
        masking_schedule = self.pipeline.scheduler.config.masking_schedule
        inputs, captions = self.check_request(condition, num_images, steps, guidance_scale, masking_schedule, seed)
        if len(inputs.get("class_labels", [0])) != 1:
            raise AppInputError("Class: choose one class to edit with.")
        steps, seed = int(steps), int(seed)
        image = self.prepare_edit_image(image)
        if mode == "image-to-image":
            try:
                strength = check_strength(strength, steps)
            except ValueError as error:
                raise AppInputError(f"Strength: {error}.") from None
        elif mode == "inpaint":
            mask = self.prepare_edit_mask(mask)

        # The request's own pipeline copy (scheduler and per-call state), as an editing pipeline on the same modules.
        pipeline_class = ENATImg2ImgPipeline if mode == "image-to-image" else ENATInpaintPipeline
        pipeline = self.request_pipeline(masking_schedule, pipeline_class)
        if mode == "image-to-image":
            mask, options = None, {"strength": float(strength)}
        else:
            if mode == "outpaint":
                image, mask = pipeline.outpainting_inputs(self.outpainting_source(image))
            options = {"mask_image": mask}

        def report(pipe, step_index, timestep, callback_kwargs):
            if on_step is not None:
                on_step(step_index, steps)
            return {}

        generator, seeds, captions = self.request_generators(seed, captions)
        tokens = pipeline(
            **inputs,
            image=image,
            **options,
            num_inference_steps=steps,
            guidance_scale=float(guidance_scale),
            generator=generator,
            output_type="latent",
            callback_on_step_end=report,
        ).images
        images = pipeline.decode_latents(tokens, output_type="pil")
        return EditResult(image=image, mask=mask, images=list(images), captions=captions, seeds=seeds, tokens=tokens)

    # ----------------------------------------------------------------------------------------------------------
    # the step view

    def step_frames(self, result: GenerationResult, image_index: int = 0) -> list[StepFrame]:
        """One frame per sampling step of image `image_index`: the step's prediction decoded to pixels, enlarged,
        with revealed tokens framed orange, reused ones blue and still-masked ones faded."""
        if not 0 <= image_index < len(result.images):
            raise AppInputError(f"Step view: there is no image {image_index + 1} in this result.")
        mask_token_id = self.pipeline.mask_token_id
        predictions = torch.stack([record.prediction[image_index] for record in result.steps])
        pictures = self.pipeline.decode_latents(predictions.to(self.pipeline.vqvae.device), output_type="pil")
        frames = []
        num_steps = len(result.steps)
        for step_index, (record, picture) in enumerate(zip(result.steps, pictures, strict=True)):
            masked_before = record.before[image_index] == mask_token_id
            masked = record.after[image_index] == mask_token_id
            revealed = masked_before & ~masked
            reused = ~masked_before
            caption = (
                f"step {step_index + 1}/{num_steps}: {int(revealed.sum())} revealed, {int(reused.sum())} reused, "
                f"{int(masked.sum())} masked"
            )
            image = _mark_tokens(upscale(picture), revealed, reused, masked)
            frames.append(StepFrame(image=image, caption=caption, revealed=revealed, reused=reused, masked=masked))
        return frames


def _read_image(image, name: str, keep_alpha: bool = False) -> Image.Image:
    """An uploaded image (a file path, checked before decoding), a PIL image or an array, as 8-bit RGB (RGBA with
    `keep_alpha` when it has transparency): 16-bit and float images scaled by their range, NaN refused."""
    try:
        if isinstance(image, (str, Path)):
            return open_image_file(image, name, keep_alpha=keep_alpha)
        if isinstance(image, np.ndarray):
            if image.dtype.kind == "f" and not np.isfinite(image).all():
                raise AppInputError(f"{name}: the image has NaN or infinite pixel values.")
            try:
                image = Image.fromarray(image)
            except TypeError:
                raise AppInputError(f"{name}: an array of shape {image.shape} is not an image.") from None
        if not isinstance(image, Image.Image):
            raise AppInputError(f"{name}: expected an image, got {type(image).__name__}.")
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise AppInputError(f"{name}: {image.width}x{image.height} is more than {MAX_IMAGE_PIXELS:,} pixels.")
        return to_8bit(image, name, keep_alpha=keep_alpha)
    except ImageFileError as error:
        raise AppInputError(str(error)) from None


def _painted_level(mask: Image.Image) -> Image.Image:
    """The grey image whose level says how much each mask pixel is painted: the alpha band when it varies (a brush
    layer, or a mask painted only in transparency), else the grey level (an opaque black-and-white mask)."""
    if mask.mode == "RGBA":
        alpha = mask.getchannel("A")
        low, high = alpha.getextrema()
        if low != high:
            return alpha
    return mask.convert("L")


def _whole_number(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise AppInputError(f"{name}: enter a whole number, got {value!r}.")
    return int(value)


def _mark_tokens(
    image: Image.Image, revealed: torch.BoolTensor, reused: torch.BoolTensor, masked: torch.BoolTensor
) -> Image.Image:
    image = image.convert("RGB")
    side = revealed.shape[0]
    cell_w, cell_h = image.width / side, image.height / side
    grey = Image.new("RGB", image.size, MASKED_GREY)
    faded = Image.blend(image, grey, MASKED_FADE)
    draw = ImageDraw.Draw(image)
    thick = max(2, round(min(cell_w, cell_h) / 10))

    def box(row: int, column: int, inset: int = 0) -> tuple[int, int, int, int]:
        left, top = round(column * cell_w), round(row * cell_h)
        right, bottom = round((column + 1) * cell_w) - 1, round((row + 1) * cell_h) - 1
        return left + inset, top + inset, right - inset, bottom - inset

    for row, column in masked.nonzero().tolist():
        image.paste(faded.crop(box(row, column)), box(row, column)[:2])
    for row, column in reused.nonzero().tolist():
        draw.rectangle(box(row, column), outline=REUSED_COLOR, width=1)
    for row, column in revealed.nonzero().tolist():
        draw.rectangle(box(row, column), outline=REVEALED_COLOR, width=thick)
    return image


class ResultFiles:
    """
    Writes each image a request returns to a PNG file of its own (a new random name), in `folder`.

    Handing Gradio PIL images makes it write each one to a file named after a hash of its bytes; two requests for
    the same image (same class and seed) then rewrite one file while it is being served, and a client receives a
    truncated or empty image. Files of their own cannot collide. When `folder` is inside Gradio's cache, Gradio
    serves them as they are and deletes them with the rest of its cache (`delete_cache`, `--cache_max_age`).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def save(self, image: Image.Image) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{uuid.uuid4().hex}.png"
        image.save(path, format="PNG")
        return str(path)


def page_handlers(app: ENATApp, files: ResultFiles):
    """The functions behind the page's events, `(generate, show_steps)`: they turn every failure into a `gr.Error`
    sentence shown in the page (the traceback of an unexpected one goes to the terminal), so the app keeps
    serving. Images are returned as files of their own (`files`)."""
    from .script_utils import require_optional

    gr = require_optional("gradio", "app", "The ENAT app")

    def generate(condition, num_images, steps, guidance_scale, masking_schedule, seed, progress=gr.Progress()):  # noqa: B008 (Gradio's way to ask for progress)
        def on_step(step_index: int, num_steps: int) -> None:
            progress((step_index + 1, num_steps), desc="sampling", unit="steps")

        try:
            result = app.generate(condition, num_images, steps, guidance_scale, masking_schedule, seed, on_step)
            frames = app.step_frames(result, 0)
        except AppInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(error).__name__}: {error}", print_exception=False) from None
        gallery = [
            (files.save(upscale(image)), caption)
            for image, caption in zip(result.images, result.captions, strict=True)
        ]
        status = f"{len(result.images)} image(s), {len(result.steps)} steps each."
        return gallery, [(files.save(frame.image), frame.caption) for frame in frames], status, result

    def show_steps(result: GenerationResult | None, event: gr.SelectData):
        if result is None:
            return gr.update()
        try:
            frames = app.step_frames(result, event.index)
        except AppInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return gr.update(
            value=[(files.save(frame.image), frame.caption) for frame in frames],
            label=f"Step by step: image {event.index + 1}",
        )

    return generate, show_steps


def sample_editor_value(image: Image.Image) -> dict:
    """The image editor's value for a drawn sample: the image enlarged for painting, with its bottom half already
    painted (one brush layer) so that the sample can be edited at once."""
    background = upscale(image.convert("RGB")).convert("RGBA")
    layer = Image.new("RGBA", background.size, (0, 0, 0, 0))
    # Translucent (but above `PAINTED_LEVEL`) so that the digit stays visible under the painted half.
    layer.paste((255, 255, 255, 176), (0, background.height // 2, background.width, background.height))
    return {"background": background, "layers": [layer], "composite": Image.alpha_composite(background, layer)}


def editor_mask(value: dict | None) -> Image.Image | None:
    """The union of the editor's brush layers (PIL images or, from the page, file paths) as one RGBA image (its
    alpha is what was painted), or None."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    layers = [_read_image(layer, "Mask", keep_alpha=True).convert("RGBA") for layer in layers]
    mask = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for layer in layers:
        mask = Image.alpha_composite(mask, layer.resize(mask.size))
    return mask


def check_editor_uploads(editor) -> None:
    """
    Makes Gradio's ImageEditor `editor` hand the app the uploaded files instead of decoded images. Gradio's editor
    decodes an upload before the app sees it, so a damaged or huge file fails inside Gradio ("The upstream Gradio
    app has raised an exception") after it was decoded in full; here each uploaded file's size and header are
    checked first (`check_image_file`) and refused with a sentence in the page, and the app decodes it
    (`_read_image`). Done on the instance: a subclass of a Gradio component makes Gradio write a `.pyi` file next
    to this module.
    """
    import gradio as gr

    convert = editor.convert_and_format_image

    def checked(file, flatten_on_white: bool = False):
        if not isinstance(file, gr.FileData):  # None, or bytes from the canvas: Gradio's own path
            return convert(file, flatten_on_white)
        try:
            check_image_file(file.path, "Image", MAX_IMAGE_PIXELS)
        except ImageFileError as error:
            name = file.orig_name or Path(file.path).name
            message = str(error).replace(repr(Path(file.path).name), repr(name))
            raise gr.Error(message, print_exception=False) from None
        return file.path

    editor.convert_and_format_image = checked


def edit_page_handlers(app: ENATApp, files: ResultFiles):
    """The functions behind the Edit tab, `(edit, draw_sample)`, with failures shown as one sentence in the page."""
    from .script_utils import require_optional

    gr = require_optional("gradio", "app", "The ENAT app")

    def edit(editor_value, condition, mode, strength, num_images, steps, guidance_scale, seed, progress=gr.Progress()):  # noqa: B008 (Gradio's way to ask for progress)
        def on_step(step_index: int, num_steps: int) -> None:
            progress((step_index + 1, num_steps), desc="editing", unit="steps")

        value = editor_value or {}
        try:
            mask = editor_mask(value) if mode == "inpaint" else None
            result = app.edit(
                value.get("background"),
                mask,
                condition,
                mode,
                strength,
                num_images,
                steps,
                guidance_scale,
                seed,
                on_step,
            )
        except AppInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:
            logger.exception("editing failed")
            raise gr.Error(f"Editing failed: {type(error).__name__}: {error}", print_exception=False) from None
        inputs = [(files.save(upscale(result.image)), "input")]
        if result.mask is not None:
            inputs.append((files.save(upscale(result.mask.convert("RGB"))), "mask (white: regenerated)"))
        gallery = [
            (files.save(upscale(image)), caption)
            for image, caption in zip(result.images, result.captions, strict=True)
        ]
        return inputs, gallery, f"{mode}: {len(result.images)} image(s)."

    def draw_sample(condition, seed):
        try:
            result = app.generate(condition, 1, seed=seed)
        except AppInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        status = f"Sample drawn ({result.captions[0]}), its bottom half painted: paint more, or press Edit."
        return sample_editor_value(result.images[0]), status

    return edit, draw_sample


def build_demo(app: ENATApp, concurrency_limit: int = DEFAULT_CONCURRENCY, cache_max_age: int = DEFAULT_CACHE_MAX_AGE):
    """The Gradio page of `app`. Sampling runs through Gradio's queue, up to `concurrency_limit` requests at once.
    Result images, uploads and each tab's last result are deleted `cache_max_age` seconds after they were made."""
    from .script_utils import require_optional

    gr = require_optional("gradio", "app", "The ENAT app")
    pipeline_config = app.pipeline.config
    title = f"ENAT: {app.model_name}" if app.model_name else "ENAT"
    cleanup = (max(1, min(CACHE_CLEANUP_INTERVAL, cache_max_age)), cache_max_age)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=cleanup) as demo:
        files = ResultFiles(Path(demo.GRADIO_CACHE) / "enat-app" / uuid.uuid4().hex)
        run, show_steps = page_handlers(app, files)
        gr.Markdown(
            f"# {title}\nMasked-token image generation with ENAT: each step reveals some tokens and reuses the "
            "features of those already visible."
        )
        with gr.Tab("Generate"), gr.Row():
            with gr.Column(scale=1):
                if app.is_text_to_image:
                    condition = gr.Textbox(value=app.default_condition, label="Prompt", elem_id="enat-condition")
                else:
                    condition = gr.Dropdown(
                        choices=app.class_choices(),
                        value=[app.default_condition],
                        multiselect=True,
                        allow_custom_value=True,
                        label="Class",
                        info="Pick classes, or type a class name or id.",
                        elem_id="enat-condition",
                    )
                num_images = gr.Slider(1, MAX_IMAGES_PER_CONDITION, value=1, step=1, label=app.images_label)
                steps = gr.Slider(
                    1, app.num_tokens, value=pipeline_config.default_num_inference_steps, step=1, label="Steps"
                )
                guidance = gr.Slider(
                    1,
                    MAX_GUIDANCE_SCALE,
                    value=pipeline_config.default_guidance_scale,
                    step=0.5,
                    label="Guidance scale",
                    info="1: no guidance; higher follows the class (or prompt) more closely.",
                )
                masking_schedule = gr.Dropdown(
                    choices=list(app.masking_schedules),
                    value=app.pipeline.scheduler.config.masking_schedule,
                    label="Masking schedule",
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", scale=3)
                    random_seed = gr.Button("Random seed", scale=1, elem_id="enat-random-seed")
                generate = gr.Button("Generate", variant="primary", elem_id="enat-generate")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="enat-status")
                gallery = gr.Gallery(
                    label="Images",
                    format="png",
                    columns=4,
                    object_fit="contain",
                    buttons=["download", "fullscreen"],
                    elem_id="enat-gallery",
                )
                step_view = gr.Gallery(
                    label="Step by step: image 1", format="png", columns=4, object_fit="contain", elem_id="enat-steps"
                )
                gr.Markdown(STEP_VIEW_LEGEND)
        with gr.Tab("Edit"), gr.Row():
            with gr.Column(scale=1):
                editor = gr.ImageEditor(
                    type="filepath",
                    image_mode="RGBA",
                    sources=["upload", "clipboard"],
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                    transforms=(),
                    label="Image: paint the region to regenerate",
                    elem_id="enat-edit-image",
                )
                check_editor_uploads(editor)
                draw_sample = gr.Button("Draw a sample to edit", elem_id="enat-edit-sample")
                if app.is_text_to_image:
                    edit_condition = gr.Textbox(
                        value=app.default_condition, label="Prompt", elem_id="enat-edit-condition"
                    )
                else:
                    edit_condition = gr.Dropdown(
                        choices=app.class_choices(),
                        value=app.default_condition,
                        allow_custom_value=True,
                        label="Class",
                        info="The class to draw (and of a drawn sample).",
                        elem_id="enat-edit-condition",
                    )
                mode = gr.Radio(list(EDIT_MODES), value="inpaint", label="Mode", elem_id="enat-edit-mode")
                strength = gr.Slider(0.05, 1, value=DEFAULT_STRENGTH, step=0.05, label="Strength (image-to-image)")
                edit_images = gr.Slider(1, MAX_IMAGES_PER_CONDITION, value=4, step=1, label="Images")
                edit_steps = gr.Slider(
                    1, app.num_tokens, value=pipeline_config.default_num_inference_steps, step=1, label="Steps"
                )
                edit_guidance = gr.Slider(
                    1,
                    MAX_GUIDANCE_SCALE,
                    value=pipeline_config.default_guidance_scale,
                    step=0.5,
                    label="Guidance scale",
                )
                edit_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                edit_button = gr.Button("Edit", variant="primary", elem_id="enat-edit")
            with gr.Column(scale=2):
                gr.Markdown(
                    EDIT_HELP.format(
                        side=app.image_size,
                        keep=round(OUTPAINT_KEEP * 100),
                        max_side=math.isqrt(MAX_IMAGE_PIXELS),
                        max_file=MAX_IMAGE_FILE_SIZE.upper().replace("MB", " MB"),
                    )
                )
                edit_status = gr.Markdown(elem_id="enat-edit-status")
                edit_inputs = gr.Gallery(
                    label="Input and mask", format="png", columns=4, object_fit="contain", elem_id="enat-edit-inputs"
                )
                edit_gallery = gr.Gallery(
                    label="Results",
                    format="png",
                    columns=4,
                    object_fit="contain",
                    buttons=["download", "fullscreen"],
                    elem_id="enat-edit-gallery",
                )
        run_edit, run_draw_sample = edit_page_handlers(app, files)
        draw_sample.click(
            run_draw_sample,
            inputs=[edit_condition, edit_seed],
            outputs=[editor, edit_status],
            concurrency_limit=concurrency_limit,
        )
        edit_button.click(
            run_edit,
            inputs=[editor, edit_condition, mode, strength, edit_images, edit_steps, edit_guidance, edit_seed],
            outputs=[edit_inputs, edit_gallery, edit_status],
            concurrency_limit=concurrency_limit,
        )
        result_state = gr.State(time_to_live=cache_max_age)
        random_seed.click(lambda: random.randint(0, MAX_SEED), outputs=seed, queue=False)
        generate.click(
            run,
            inputs=[condition, num_images, steps, guidance, masking_schedule, seed],
            outputs=[gallery, step_view, status, result_state],
            concurrency_limit=concurrency_limit,
        )
        gallery.select(show_steps, inputs=result_state, outputs=step_view, concurrency_limit=concurrency_limit)
    return demo.queue()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m enat_diffusers.app", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"An ENAT pipeline folder, Hub id or demo:NAME (default: {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"Address to serve on (default {DEFAULT_HOST}: this machine only)."
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default {DEFAULT_PORT}).")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    add_precision_flag(parser)
    parser.add_argument(
        "--cache_max_age",
        type=int,
        default=DEFAULT_CACHE_MAX_AGE,
        help=f"Seconds that result images, uploads and a tab's last result are kept (default {DEFAULT_CACHE_MAX_AGE}). "
        f"Uploads are limited to {MAX_IMAGE_FILE_SIZE} and {math.isqrt(MAX_IMAGE_PIXELS)}x{math.isqrt(MAX_IMAGE_PIXELS)} "
        "pixels.",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"Requests sampled at the same time (default {DEFAULT_CONCURRENCY}); more wait in the queue.",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be a positive integer, got {args.concurrency}")
    if args.cache_max_age < 1:
        parser.error(f"--cache_max_age must be a positive number of seconds, got {args.cache_max_age}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from .script_utils import require_optional

    require_optional("gradio", "app", "The ENAT app")
    check_port(args.host, args.port)
    enable_cpu_memory_reuse()
    pipeline = load_pipeline(args.model, args.device)
    choice = set_precision(pipeline, args.precision)
    print(f"precision: {choice.precision} ({choice.reason})")
    app = ENATApp(pipeline, model_name=args.model)
    demo = build_demo(app, concurrency_limit=args.concurrency, cache_max_age=args.cache_max_age)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        ssr_mode=False,
        show_error=False,
        max_file_size=MAX_IMAGE_FILE_SIZE,
    )


if __name__ == "__main__":
    main()
