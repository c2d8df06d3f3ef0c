#!/usr/bin/env python
"""Generate many images with an ENAT pipeline (e.g. 50k ImageNet samples for FID) on one or several processes.

    # ImageNet 256, 50 images of each of the 1000 classes, on every GPU of the machine
    accelerate launch --multi_gpu --num_processes 8 examples/sample_at_scale.py --model enat-l-256 \\
        --num_images_per_prompt 50 --batch_size 125 --output_dir samples-enat-l-256 --precision bf16 --compile
    # one process (GPU if there is one), or several CPU processes (gloo)
    python examples/sample_at_scale.py --model enat-l-256 --num_images_per_prompt 50 --output_dir out
    torchrun --standalone --nproc_per_node 2 examples/sample_at_scale.py --model demo:digits \\
        --num_images_per_prompt 10 --output_dir digits-samples
    # a text pipeline: one prompt per line (or a .json list), 1 image per prompt
    accelerate launch examples/sample_at_scale.py --model enat-b-coco --prompts_file captions.txt \\
        --num_images_per_prompt 1 --output_dir coco-samples

Image `i` always gets the same class (or prompt) and its own generator, seeded from `(--seed, i)`, so the images do
not depend on the number of processes. The images are cut into shards of `--shard_size` consecutive images, dealt
out to the processes round-robin, and each shard's files are written atomically (temporary file + rename):

* `--format npz`: `shards/shard_NNNNNN.npz` with `arr_0` (uint8, N x H x W x 3, the ADM evaluation layout),
  `indices` (the image numbers) and `labels` (class ids) or `prompt_indices` (lines of the prompts file);
* `--format png`: `images/NNNNNN.png`, one file per image (a flat folder, as FID tools read);
* `--format both`: both.

Then `shards/shard_NNNNNN.json` records the sha256 of each of the shard's files (and the seconds it took): a shard
counts as done only with this record, and only while its files match it.

`manifest.json` records every setting that changes the images and the sha256 of the model's files (`model_index.json`
and every file of its component folders); running again with the same output folder resumes (finished shards are
skipped, whatever the number of processes) and different settings or model files are refused, naming each
difference. Only `--batch_size` (when `--shard_size` is given), `--compile`, `--max_shards`, the device number (not
its kind: the random streams differ between CPU and GPU) and the process count may change between runs (a different
batch size or compilation can change the last bits of the computation). `--max_shards` stops each process after that
many shards, e.g. to fit a job's time limit; run the same command again to continue. When every shard is there, the
main process writes `samples.npz` (`arr_0` and `labels` / `prompt_indices` of all images, in order) if npz is on, and
its checksum in `samples.json`. The output folder also holds `labels.npy` (class pipelines) or `prompts.json` and
`prompt_indices.npy` (text pipelines), and `timing.json` with images per second per process and in total for the last
run that generated images (model loading excluded, compilation included).

After a crash or a kill at any point, running the same command again:

* keeps every shard whose files match their record (each is checked again: checksums, image shape and dtype, image
  numbers and their conditions) and generates the others; a damaged shard (changed, truncated, unreadable) is named,
  removed and generated again;
* merges `samples.npz` again if it is missing, truncated or changed since it was written;
* rebuilds a missing `timing.json` from the shard records;
* refuses a folder whose shards exist but whose `manifest.json` is gone (nothing says what made them), and a model
  whose files changed since the manifest was written.

`--model` takes a pipeline folder, a Hub id, or `demo:digits` / `demo:digits-text` (the packaged demo models).
Sampling settings default to the model's saved configuration. With several processes, the output folder must be
shared by all of them.
"""

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import enat_diffusers  # isort: skip  (first, before torch: sets the CPU threads' wait policy)
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from enat_diffusers.cpu_memory import enable_cpu_memory_reuse
from enat_diffusers.demo import DEMO_NAMES, DEMO_PREFIX, resolve_pretrained_location
from enat_diffusers.image_utils import to_uint8
from enat_diffusers.pipelines import GUIDANCE_SCHEDULES
from enat_diffusers.quantization import resolve_precision, set_precision
from enat_diffusers.schedulers import MASKING_SCHEDULES
from enat_diffusers.script_utils import add_deprecated_flag, add_precision_flag

MANIFEST = "manifest.json"
TIMING = "timing.json"
MERGED = "samples.npz"
SHARD_DIR = "shards"
IMAGE_DIR = "images"
MERGED_RECORD = "samples.json"
MANIFEST_VERSION = 2
HASH_CHUNK = 1 << 24
PIPELINES = {"ENATPipeline": "class", "ENATText2ImagePipeline": "text"}
FORMATS = ("png", "npz", "both")
# flag -> scheduler config entry
SCHEDULER_FLAGS = {
    "mask_temperature": "mask_temperature",
    "sample_temperature": "sample_temperature",
    "masking_schedule": "masking_schedule",
}


# ----------------------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the flags that need no model; errors exit with the flag and what it accepts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=str, required=True, help="Pipeline folder, Hub id, or demo:digits / demo:digits-text."
    )
    parser.add_argument("--output_dir", type=str, required=True, help="Where shards, manifest and results go.")
    parser.add_argument(
        "--num_images", type=int, default=None, help="Images in all (default: from --num_images_per_prompt)."
    )
    parser.add_argument(
        "--num_images_per_prompt",
        type=int,
        default=None,
        help="Images per class label (classes in order) or per prompt (prompts in order).",
    )
    parser.add_argument(
        "--class_labels", type=class_label, nargs="+", default=None, help="Class ids or names (default: all)."
    )
    parser.add_argument("--prompts_file", type=str, default=None, help="Text pipelines: .txt (a line each) or .json.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per pipeline call, per process.")
    parser.add_argument("--shard_size", type=int, default=None, help="Images per shard (default: --batch_size).")
    parser.add_argument("--format", type=str, default="npz", choices=FORMATS, help="Shard files to write.")
    parser.add_argument("--seed", type=int, default=0, help="Image i is seeded from (seed, i).")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the pipeline's.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="diffusers' meaning (guidance on above 1; the paper's cfg + 1). Default: the pipeline's.",
    )
    parser.add_argument("--guidance_schedule", type=str, default=None, choices=GUIDANCE_SCHEDULES)
    parser.add_argument("--mask_temperature", type=float, default=None, help="Default: the scheduler's.")
    parser.add_argument("--sample_temperature", type=float, default=None, help="Default: the scheduler's.")
    parser.add_argument("--masking_schedule", type=str, default=None, choices=MASKING_SCHEDULES, help="Scheduler's.")
    add_precision_flag(parser)
    parser.add_argument("--compile", action="store_true", help="Compile the transformer's blocks (torch.compile).")
    parser.add_argument("--device", type=str, default=None, help="Default: accelerate's device for the process.")
    parser.add_argument("--max_shards", type=int, default=None, help="Stop after this many shards per process.")
    for old, new in (
        ("--per_class", "--num_images_per_prompt"),
        ("--per_prompt", "--num_images_per_prompt"),
        ("--mask_schedule", "--masking_schedule"),
        ("--dtype", "--precision"),
    ):
        add_deprecated_flag(parser, old, new, removed_in="0.3.0")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ("num_images", "num_images_per_prompt", "batch_size", "shard_size", "num_inference_steps")
    for flag in (*positive, "max_shards"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be a positive integer, got {value}")
    for flag in ("guidance_scale", "mask_temperature", "sample_temperature"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value < math.inf:
            parser.error(f"--{flag} must be a finite number >= 0, got {value}")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    if args.model.startswith(DEMO_PREFIX) and args.model[len(DEMO_PREFIX) :] not in DEMO_NAMES:
        demos = ", ".join(DEMO_PREFIX + name for name in DEMO_NAMES)
        parser.error(f"--model {args.model!r} is not a packaged demo; available: {demos}")
    if args.class_labels is not None and args.prompts_file is not None:
        parser.error("--class_labels (class-conditional) cannot be combined with --prompts_file (text)")
    if args.num_images is None and args.num_images_per_prompt is None:
        parser.error("pass --num_images, or --num_images_per_prompt to generate that many per class / prompt")

    if args.prompts_file is not None:
        try:
            args.prompts = read_prompts(args.prompts_file)
        except (OSError, ValueError) as error:
            parser.error(f"--prompts_file: {error}")
    else:
        args.prompts = None
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir} exists and is not a folder")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device must be a torch device such as cpu, cuda or cuda:1, got {args.device!r}")
        if args.precision == "int8" and torch.device(args.device).type != "cpu":
            parser.error(f"--precision int8 runs on the CPU only, got --device {args.device}")


def read_prompts(path: str) -> list[str]:
    """Prompts of a `.json` file (a list of strings) or a text file (one per line, blank lines skipped)."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid json ({error})") from error
        if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(f"{path} must hold a json list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# what to generate (from the model's configs only: nothing heavy is loaded)


@dataclass
class ModelInfo:
    """What the pipeline's config files say: its kind, defaults, scheduler and transformer configuration."""

    pipeline_class: type
    kind: str  # "class" or "text"
    pipeline_config: dict
    scheduler_class: type
    scheduler_config: dict
    transformer_config: dict


@dataclass
class Plan:
    """The resolved run: per-image conditions and every setting that changes the images."""

    conditions: np.ndarray  # class id or prompt index of every image
    settings: dict
    prompts: list[str] | None = None
    scheduler_overrides: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.conditions)

    @property
    def shard_size(self) -> int:
        return self.settings["shard_size"]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_size)

    @property
    def condition_key(self) -> str:
        return "labels" if self.prompts is None else "prompt_indices"

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))


def class_label(text: str) -> int | str:
    """A class id (digits only) or a class name."""
    return int(text) if text.strip().isdigit() else text


def class_ids(labels: list[int | str], info: ModelInfo) -> list[int]:
    """Class ids for `--class_labels`: names are looked up in the pipeline config's `id2label` (any synonym); a
    class may be named once."""
    names = {}
    for class_id, synonyms in (info.pipeline_config.get("id2label") or {}).items():
        for name in synonyms.split(","):
            names[name.strip()] = int(class_id)
    unknown = [label for label in labels if isinstance(label, str) and label not in names]
    if unknown:
        known = "no class names" if not names else f"names such as {', '.join(list(names)[:5])}"
        raise SystemExit(f"--class_labels: unknown class name(s) {unknown}; the model has {known}")
    ids = [names[label] if isinstance(label, str) else label for label in labels]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"--class_labels must not repeat a class, got {labels} (class ids {ids})")
    return ids


def model_location(model: str) -> str:
    """A local folder or Hub id for `--model` (`demo:NAME` is the packaged demo)."""
    return resolve_pretrained_location(model)


def _import_class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def describe_model(model: str) -> ModelInfo:
    """Reads the pipeline, scheduler and transformer configs of `model` (json files only)."""
    location = model_location(model)
    try:
        pipeline_config = DiffusionPipeline.load_config(location)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--model {model!r}: no diffusers pipeline found there ({error})") from error
    class_name = pipeline_config.get("_class_name")
    if class_name not in PIPELINES:
        raise SystemExit(f"--model {model!r} is a {class_name}; this script runs {' and '.join(PIPELINES)}")
    scheduler_class = _import_class(*pipeline_config["scheduler"])
    transformer_class = _import_class(*pipeline_config["transformer"])
    return ModelInfo(
        pipeline_class=getattr(enat_diffusers, class_name),
        kind=PIPELINES[class_name],
        pipeline_config=pipeline_config,
        scheduler_class=scheduler_class,
        scheduler_config=scheduler_class.load_config(location, subfolder="scheduler"),
        transformer_config=transformer_class.load_config(location, subfolder="transformer"),
    )


def image_conditions(values: int, per_value: int | None, num_images: int | None, what: str) -> np.ndarray:
    """Index into `values` things (classes or prompts) of every image: `per_value` each in order, or cycling."""
    if per_value is not None:
        expected = per_value * values
        if num_images is not None and num_images != expected:
            raise SystemExit(
                f"--num_images {num_images} must equal --num_images_per_prompt {per_value} x {values} {what} = "
                f"{expected} (or leave out --num_images_per_prompt to cycle through the {what})"
            )
        return np.repeat(np.arange(values), per_value)
    return np.arange(num_images) % values


def _init_default(function, name: str):
    return inspect.signature(function).parameters[name].default


def resolve_scheduler(info: ModelInfo, args: argparse.Namespace) -> tuple[dict, dict]:
    """The scheduler overrides given by flags and the resulting public scheduler config."""
    overrides = {key: getattr(args, flag) for flag, key in SCHEDULER_FLAGS.items() if getattr(args, flag) is not None}
    accepted = inspect.signature(info.scheduler_class.__init__).parameters
    unknown = [flag for flag, key in SCHEDULER_FLAGS.items() if key in overrides and key not in accepted]
    if unknown:
        raise SystemExit(
            f"--{unknown[0]}: the model's scheduler {info.scheduler_class.__name__} has no such setting "
            f"(it takes {', '.join(name for name in accepted if name != 'self')})"
        )
    scheduler = info.scheduler_class.from_config(info.scheduler_config, **overrides)
    config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    return overrides, config


def make_plan(args: argparse.Namespace, info: ModelInfo, device: torch.device) -> Plan:
    """Checks the flags against the model and resolves every setting; exits with a clear message otherwise."""
    if info.kind == "class":
        if args.prompts_file is not None:
            raise SystemExit(f"--model {args.model!r} is class-conditional: use --class_labels")
        num_classes = info.transformer_config["num_classes"]
        classes = class_ids(args.class_labels, info) if args.class_labels is not None else list(range(num_classes))
        out_of_range = [label for label in classes if label >= num_classes]
        if out_of_range:
            raise SystemExit(f"--class_labels must be class ids in [0, {num_classes - 1}], got {out_of_range}")
        indices = image_conditions(len(classes), args.num_images_per_prompt, args.num_images, "classes")
        conditions = np.asarray(classes, dtype=np.int64)[indices]
        condition_settings = {"class_labels": list(classes), "num_images_per_prompt": args.num_images_per_prompt}
    else:
        if args.prompts_file is None:
            wrong = " (--class_labels is for class-conditional pipelines)" if args.class_labels is not None else ""
            raise SystemExit(f"--model {args.model!r} is a text-to-image pipeline: pass --prompts_file{wrong}")
        conditions = image_conditions(len(args.prompts), args.num_images_per_prompt, args.num_images, "prompts")
        prompts_hash = hashlib.sha256(json.dumps(args.prompts).encode()).hexdigest()
        condition_settings = {"num_prompts": len(args.prompts), "prompts_sha256": prompts_hash}
        condition_settings["num_images_per_prompt"] = args.num_images_per_prompt
    num_tokens = info.transformer_config["sample_size"] ** 2
    steps = args.num_inference_steps or info.pipeline_config.get(
        "default_num_inference_steps", _init_default(info.pipeline_class.__init__, "default_num_inference_steps")
    )
    if steps > num_tokens:
        raise SystemExit(f"--num_inference_steps must be at most the {num_tokens} tokens of an image, got {steps}")
    guidance_scale = args.guidance_scale
    if guidance_scale is None:
        default_scale = _init_default(info.pipeline_class.__init__, "default_guidance_scale")
        guidance_scale = info.pipeline_config.get("default_guidance_scale", default_scale)
    overrides, scheduler_config = resolve_scheduler(info, args)
    settings = {
        "model": args.model,
        "pipeline": info.pipeline_class.__name__,
        "num_images": int(len(conditions)),
        **condition_settings,
        "seed": args.seed,
        "shard_size": args.shard_size or args.batch_size,
        "format": args.format,
        "num_inference_steps": int(steps),
        "guidance_scale": float(guidance_scale),
        "guidance_schedule": args.guidance_schedule
        or _init_default(info.pipeline_class.__call__, "guidance_schedule"),
        "scheduler": {"class": info.scheduler_class.__name__, **scheduler_config},
        "dtype": resolve_precision(args.precision, device).precision,
        "generator_device": device.type,
    }
    return Plan(conditions=conditions, settings=settings, prompts=args.prompts, scheduler_overrides=overrides)


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image `index`: mixed from `(seed, index)`, so runs with other seeds do not overlap."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------------------------------------------
# the output folder


def _atomic_write(path: Path, write) -> None:
    """Calls `write(file_object)` on a hidden temporary file next to `path`, then renames it to `path`."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_json(path: Path, data) -> None:
    _atomic_write(path, lambda handle: handle.write((json.dumps(data, indent=2) + "\n").encode()))


def image_name(plan: Plan, index: int) -> str:
    width = max(6, len(str(plan.num_images - 1)))
    return f"{index:0{width}d}.png"


def shard_path(output_dir: Path, shard: int) -> Path:
    return output_dir / SHARD_DIR / f"shard_{shard:06d}.npz"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(location: str) -> dict[str, str]:
    """sha256 of `model_index.json` and of every file of the component folders (configs, weights, tokenizer), by
    relative path: what identifies the model, so that other weights behind the same `--model` are noticed. A Hub id
    is resolved to its local snapshot (downloaded once; loading the pipeline needs it anyway)."""
    folder = Path(location)
    if not folder.is_dir():
        folder = Path(DiffusionPipeline.download(location))
    files = [folder / "model_index.json"]
    for component in sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")):
        files += sorted(path for path in component.rglob("*") if path.is_file() and not path.name.startswith("."))
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in files}


def _has_samples(output_dir: Path) -> bool:
    return (
        any((output_dir / SHARD_DIR).glob("shard_*"))
        or any((output_dir / IMAGE_DIR).glob("*.png"))
        or (output_dir / MERGED).exists()
    )


def check_orphaned_samples(output_dir: Path) -> None:
    """Refuses a folder that holds samples but no manifest: nothing says which model and settings made them.

    Every process checks this before the main process writes a manifest, which it never does in such a folder."""
    if not (output_dir / MANIFEST).exists() and _has_samples(output_dir):
        raise SystemExit(
            f"{output_dir} holds samples but no {MANIFEST}, so nothing says which model and settings made them; "
            "delete the folder (or its shards/, images/ and samples.npz) or choose another --output_dir"
        )


def write_run_files(output_dir: Path, plan: Plan, model_files: dict[str, str]) -> None:
    """Main process, first run: the manifest and the per-image conditions."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / MANIFEST).exists():
        return
    if plan.prompts is None:
        _atomic_write(output_dir / "labels.npy", lambda handle: np.save(handle, plan.conditions))
    else:
        _write_json(output_dir / "prompts.json", plan.prompts)
        _atomic_write(output_dir / "prompt_indices.npy", lambda handle: np.save(handle, plan.conditions))
    manifest = {
        "version": MANIFEST_VERSION,
        "script": "examples/sample_at_scale.py",
        "settings": plan.settings,
        "model_files": model_files,
    }
    _write_json(output_dir / MANIFEST, manifest)


def check_manifest(output_dir: Path, plan: Plan, model_files: dict[str, str]) -> None:
    """Refuses to continue an output folder made with other settings or another model, naming every difference."""
    path = output_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{path} cannot be read ({error}); choose another --output_dir") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise SystemExit(
            f"{path} was written by another version of this script (manifest version {manifest.get('version')}, "
            f"this one writes {MANIFEST_VERSION}); choose another --output_dir"
        )
    recorded = manifest.get("settings", {})
    current = json.loads(json.dumps(plan.settings))
    differences = [
        f"  {key}: {json.dumps(recorded.get(key))} in the manifest, {json.dumps(current.get(key))} now"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]
    recorded_files = manifest.get("model_files", {})
    changed = sorted(
        name for name in set(recorded_files) | set(model_files) if recorded_files.get(name) != model_files.get(name)
    )
    if changed:
        differences.append(f"  model files changed, added or removed since the manifest: {', '.join(changed)}")
    if differences:
        raise SystemExit(
            f"{output_dir} holds samples made with other settings ({path}):\n"
            + "\n".join(differences)
            + "\nrerun with the recorded settings and model to resume, or choose another --output_dir"
        )


def remove_temporary_files(output_dir: Path) -> None:
    """Main process, before any work: leftovers of interrupted writes."""
    for folder in (output_dir, output_dir / SHARD_DIR, output_dir / IMAGE_DIR):
        if folder.is_dir():
            for leftover in folder.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)


def record_path(output_dir: Path, shard: int) -> Path:
    """The shard's record: written last, so a shard without one is not finished."""
    return output_dir / SHARD_DIR / f"shard_{shard:06d}.json"


class BadShard(Exception):
    """A shard whose files are not what was recorded when it was written."""


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def check_shard(output_dir: Path, plan: Plan, shard: int, image_shape: tuple | None = None) -> dict:
    """The shard's record if its files are complete and unchanged since they were written: the checksum recorded for
    each file, and for the npz the image shape and dtype, the image numbers and their conditions. `None` when the
    shard was never finished; `BadShard` naming the file and the fault otherwise."""
    path = record_path(output_dir, shard)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadShard(f"{path} is unreadable ({error})") from None
    expected = np.asarray(plan.shard_range(shard), dtype=np.int64)
    wanted = []
    if plan.settings["format"] in ("npz", "both"):
        wanted.append(shard_path(output_dir, shard).relative_to(output_dir).as_posix())
    if plan.settings["format"] in ("png", "both"):
        wanted += [f"{IMAGE_DIR}/{image_name(plan, index)}" for index in expected]
    if sorted(files) != sorted(wanted):
        raise BadShard(f"{path} records other files than shard {shard} has")
    for name in wanted:
        file = output_dir / name
        if not file.is_file():
            raise BadShard(f"{file} is missing")
        if file_sha256(file) != files[name]:
            raise BadShard(f"{file} is not the file that was written (its checksum differs from {path.name}'s)")
    if plan.settings["format"] in ("npz", "both"):
        file = shard_path(output_dir, shard)
        try:
            data = _load_npz(file)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise BadShard(f"{file} cannot be read ({error})") from None
        images = data.get("arr_0")
        if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise BadShard(f"{file} holds no uint8 N x H x W x 3 images")
        if len(images) != len(expected) or (image_shape is not None and images.shape[1:] != image_shape):
            raise BadShard(f"{file} holds images of shape {images.shape}, expected {len(expected)} images")
        if not np.array_equal(data.get("indices"), expected):
            raise BadShard(f"{file} holds other images than {expected[0]}..{expected[-1]}")
        if not np.array_equal(data.get(plan.condition_key), plan.conditions[expected]):
            raise BadShard(f"{file} records other {plan.condition_key} than this run's")
        record["image_shape"], record["images"] = images.shape[1:], images
    return record


def _remove_shard(output_dir: Path, plan: Plan, shard: int) -> None:
    record_path(output_dir, shard).unlink(missing_ok=True)
    shard_path(output_dir, shard).unlink(missing_ok=True)
    for index in plan.shard_range(shard):
        (output_dir / IMAGE_DIR / image_name(plan, index)).unlink(missing_ok=True)


def finished_shards(output_dir: Path, plan: Plan, verify: bool = True) -> list[bool]:
    """Whether each shard is finished. With `verify`, every file is checked against the record written with it
    (checksums, shapes, image numbers); a shard that fails is named, removed and counted as not finished, so that
    it is generated again. Without, only the records are looked for (for shards written during this run)."""
    finished, image_shape = [], None
    for shard in range(plan.num_shards):
        if not verify:
            finished.append(record_path(output_dir, shard).is_file())
            continue
        try:
            record = check_shard(output_dir, plan, shard, image_shape)
        except BadShard as fault:
            print(f"shard {shard} is damaged and will be generated again: {fault}")
            _remove_shard(output_dir, plan, shard)
            record = None
        if record is not None and "image_shape" in record:
            image_shape = record["image_shape"]
        finished.append(record is not None)
    return finished


def write_shard(output_dir: Path, plan: Plan, shard: int, images: np.ndarray, timing: dict) -> None:
    """Writes the shard's files, each atomically, then its record (checksums and timing) that marks it finished."""
    indices = np.asarray(plan.shard_range(shard), dtype=np.int64)
    files = []
    if plan.settings["format"] in ("png", "both"):
        (output_dir / IMAGE_DIR).mkdir(exist_ok=True)
        for index, image in zip(indices, images, strict=True):
            pil = Image.fromarray(image)
            path = output_dir / IMAGE_DIR / image_name(plan, index)
            _atomic_write(path, lambda h, pil=pil: pil.save(h, "PNG"))
            files.append(path)
    (output_dir / SHARD_DIR).mkdir(exist_ok=True)
    if plan.settings["format"] in ("npz", "both"):
        arrays = {"arr_0": images, "indices": indices, plan.condition_key: plan.conditions[indices]}
        _atomic_write(shard_path(output_dir, shard), lambda handle: np.savez(handle, **arrays))
        files.append(shard_path(output_dir, shard))
    record = {
        "shard": shard,
        "files": {path.relative_to(output_dir).as_posix(): file_sha256(path) for path in files},
        **timing,
    }
    _write_json(record_path(output_dir, shard), record)


def merge_shards(output_dir: Path, plan: Plan) -> Path:
    """Streams every shard's images, in order, into `samples.npz` (`arr_0` + conditions) without holding them all,
    then records its checksum in `samples.json` (a merged file without a matching record is rebuilt)."""
    path = output_dir / MERGED
    (output_dir / MERGED_RECORD).unlink(missing_ok=True)

    def write(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                for shard in range(plan.num_shards):
                    images = _read_shard(output_dir, plan, shard)
                    if shard == 0:
                        header = np.lib.format.header_data_from_array_1_0(images)
                        header["shape"] = (plan.num_images, *images.shape[1:])
                        np.lib.format.write_array_header_1_0(member, header)
                    member.write(np.ascontiguousarray(images).tobytes())
            with archive.open(f"{plan.condition_key}.npy", "w") as member:
                np.lib.format.write_array(member, plan.conditions)

    _atomic_write(path, write)
    _write_json(output_dir / MERGED_RECORD, {"num_images": plan.num_images, "sha256": file_sha256(path)})
    return path


def merged_is_intact(output_dir: Path) -> bool:
    """Whether `samples.npz` is the file the last merge wrote (its checksum matches `samples.json`)."""
    path, record = output_dir / MERGED, output_dir / MERGED_RECORD
    if not path.is_file() or not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("sha256") == file_sha256(path)
    except (OSError, ValueError, AttributeError):
        return False


def _read_shard(output_dir: Path, plan: Plan, shard: int) -> np.ndarray:
    try:
        record = check_shard(output_dir, plan, shard)
    except BadShard as fault:
        _remove_shard(output_dir, plan, shard)
        raise SystemExit(f"{fault}; removed it: run the same command again to generate shard {shard} again") from None
    if record is None:
        raise SystemExit(f"shard {shard} is not finished; run the same command again")
    return record["images"]


# ----------------------------------------------------------------------------------------------------------------
# generation


def load_pipeline(args: argparse.Namespace, plan: Plan, info: ModelInfo, device: torch.device):
    """The pipeline on `device` in the requested dtype, with the scheduler overrides and optional compilation."""
    pipe = DiffusionPipeline.from_pretrained(model_location(args.model))
    set_precision(pipe, plan.settings["dtype"], device)
    if plan.scheduler_overrides:
        pipe.scheduler = info.scheduler_class.from_config(pipe.scheduler.config, **plan.scheduler_overrides)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        compile_transformer(pipe.transformer)
    return pipe


def compile_transformer(transformer) -> str:
    """Compiles each repeated block once for all token counts if the model supports it, else the whole model."""
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(dynamic=True)
        return "regional"
    transformer.compile(dynamic=True)
    return "full"


def generate_batch(pipe, plan: Plan, indices: list[int], device: torch.device) -> np.ndarray:
    """uint8 images (N, H, W, 3) of images `indices`, each from its own generator."""
    settings = plan.settings
    generators = [torch.Generator(device=device).manual_seed(image_seed(settings["seed"], i)) for i in indices]
    conditions = plan.conditions[indices].tolist()
    if plan.prompts is None:
        inputs = {"class_labels": conditions}
    else:
        inputs = {"prompt": [plan.prompts[j] for j in conditions]}
    images = pipe(
        **inputs,
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        guidance_schedule=settings["guidance_schedule"],
        generator=generators,
        output_type="np",
    ).images
    return to_uint8(images)


def _batches(indices: range, batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), batch_size):
        yield list(indices[start : start + batch_size])


def generate_shards(pipe, plan: Plan, shards: list[int], args, output_dir: Path, accelerator, device) -> dict:
    """Generates and writes `shards`; returns this process's count of images, seconds and shard numbers."""
    total = sum(len(plan.shard_range(shard)) for shard in shards)
    progress = tqdm(total=total, unit="img", desc="Sampling", disable=not accelerator.is_main_process)
    start = time.perf_counter()
    for shard in shards:
        shard_start = time.perf_counter()
        batches = [
            generate_batch(pipe, plan, batch, device) for batch in _batches(plan.shard_range(shard), args.batch_size)
        ]
        timing = {
            "seconds": time.perf_counter() - shard_start,
            "process": accelerator.process_index,
            "num_processes": accelerator.num_processes,
            "device": device.type,
            "batch_size": args.batch_size,
            "compile": args.compile,
        }
        write_shard(output_dir, plan, shard, np.concatenate(batches), timing)
        progress.update(len(plan.shard_range(shard)))
    progress.close()
    return {"images": total, "seconds": time.perf_counter() - start, "shards": shards}


def report_timing(output_dir: Path, mine: dict, args, accelerator, device) -> dict | None:
    """Gathers every process's counts; the main process prints images/s and writes `timing.json`."""
    per_process = gather_object([{"process": accelerator.process_index, **mine}])
    if not accelerator.is_main_process:
        return None
    per_process = sorted(per_process, key=lambda entry: entry["process"])
    for entry in per_process:
        entry["images_per_second"] = entry["images"] / entry["seconds"] if entry["seconds"] > 0 else None
    images = sum(entry["images"] for entry in per_process)
    seconds = max(entry["seconds"] for entry in per_process)
    timing = {
        "num_processes": accelerator.num_processes,
        "device": device.type,
        "batch_size": args.batch_size,
        "compile": args.compile,
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else None,
        "per_process": per_process,
    }
    for entry in per_process:
        rate = entry["images_per_second"]
        rate_text = f"{rate:.2f} images/s" if rate else "nothing to do"
        print(f"process {entry['process']}: {entry['images']} images in {entry['seconds']:.1f} s ({rate_text})")
    if images:  # a run with nothing left to do keeps the timing of the run that did the work
        print(
            f"total: {images} images in {seconds:.1f} s on {accelerator.num_processes} process(es): "
            f"{timing['images_per_second']:.2f} images/s"
        )
        _write_json(output_dir / TIMING, timing)
    return timing


def timing_from_records(output_dir: Path, plan: Plan) -> dict:
    """A `timing.json` rebuilt from the shard records (each holds the seconds its images took and which process of
    which run made them), for a folder whose `timing.json` was lost: per process, the sum over its shards."""
    records = [json.loads(record_path(output_dir, shard).read_text()) for shard in range(plan.num_shards)]
    per_process: dict[int, dict] = {}
    for record in records:
        entry = per_process.setdefault(record["process"], {"process": record["process"], "images": 0, "seconds": 0.0})
        entry["images"] += len(plan.shard_range(record["shard"]))
        entry["seconds"] += record["seconds"]
        entry.setdefault("shards", []).append(record["shard"])
    per_process_list = [per_process[key] for key in sorted(per_process)]
    for entry in per_process_list:
        entry["images_per_second"] = entry["images"] / entry["seconds"] if entry["seconds"] > 0 else None
    seconds = max(entry["seconds"] for entry in per_process_list)
    last = records[-1]
    return {
        "num_processes": max(record["num_processes"] for record in records),
        "device": last["device"],
        "batch_size": last["batch_size"],
        "compile": last["compile"],
        "images": plan.num_images,
        "seconds": seconds,
        "images_per_second": plan.num_images / seconds if seconds > 0 else None,
        "per_process": per_process_list,
        "rebuilt_from": "shard records (timing.json was missing; model loading and gaps between runs excluded)",
    }


def finish(output_dir: Path, plan: Plan, args) -> dict:
    """Main process, after every process is done: checks that no image is missing and merges the npz shards."""
    # Shards found finished at the start were verified then; the merge verifies each one again as it reads it.
    missing = [shard for shard, done in enumerate(finished_shards(output_dir, plan, verify=False)) if not done]
    if missing:
        message = f"{len(missing)} of {plan.num_shards} shards are still to do; run the same command again"
        if args.max_shards is None:
            raise SystemExit(f"{message} (missing shards: {missing[:20]})")
        print(message)
        return {"complete": False, "missing_shards": missing}
    merged = None
    if plan.settings["format"] in ("npz", "both"):
        merged = output_dir / MERGED
        if not merged_is_intact(output_dir):
            if merged.exists():
                print(f"{merged} is incomplete or changed since it was written; merging the shards again")
            merge_shards(output_dir, plan)
    if not (output_dir / TIMING).is_file():
        _write_json(output_dir / TIMING, timing_from_records(output_dir, plan))
        print(f"{output_dir / TIMING} was missing: rebuilt from the shard records")
    print(f"all {plan.num_images} images are in {output_dir}" + (f" ({MERGED} holds them all)" if merged else ""))
    return {"complete": True, "missing_shards": [], "merged": str(merged) if merged else None}


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def create_accelerator(args: argparse.Namespace) -> tuple[Accelerator, torch.device]:
    """accelerate's state for this process and the device to sample on (`--device` if given)."""
    requested = torch.device(args.device) if args.device is not None else None
    cpu = requested.type == "cpu" if requested is not None else not _has_accelerator()
    accelerator = Accelerator(cpu=cpu)
    device = accelerator.device
    if requested is not None and not (requested.type == device.type and requested.index is None):
        device = requested
    return accelerator, device


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    enable_cpu_memory_reuse()
    info = describe_model(args.model)
    accelerator, device = create_accelerator(args)
    plan = make_plan(args, info, device)
    output_dir = Path(args.output_dir)
    model_files = model_fingerprint(model_location(args.model))

    # Every check runs on every process, so that all of them stop on a refusal (none waits at a barrier).
    check_orphaned_samples(output_dir)
    if accelerator.is_main_process:
        write_run_files(output_dir, plan, model_files)
    accelerator.wait_for_everyone()
    check_manifest(output_dir, plan, model_files)
    pending = None
    if accelerator.is_main_process:
        remove_temporary_files(output_dir)
        pending = [shard for shard, done in enumerate(finished_shards(output_dir, plan)) if not done]
    pending = broadcast_object_list([pending])[0]
    mine = pending[accelerator.process_index :: accelerator.num_processes][: args.max_shards]
    if accelerator.is_main_process:
        print(
            f"{plan.num_shards - len(pending)} of {plan.num_shards} shards done already; "
            f"{len(pending)} to do on {accelerator.num_processes} process(es)"
        )

    result = {"images": 0, "seconds": 0.0, "shards": []}
    if mine:
        pipe = load_pipeline(args, plan, info, device)
        result = generate_shards(pipe, plan, mine, args, output_dir, accelerator, device)
    accelerator.wait_for_everyone()
    timing = report_timing(output_dir, result, args, accelerator, device)
    summary = {"generated_shards": result["shards"], "timing": timing}
    if accelerator.is_main_process:
        summary.update(finish(output_dir, plan, args))
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
