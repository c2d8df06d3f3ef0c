"""Convert the reference ENAT checkpoints (LeapLabTHU/ENAT) into a diffusers pipeline folder.

    python conversion/convert_enat_to_diffusers.py --checkpoint nnet_ema.pth --vqgan vqgan_jax_strongaug.ckpt \\
        --resolution 256 --output_dir enat-l-256 [--dtype fp16|bf16|fp32] [--push_to_hub USER/REPO]

The folder (model_index.json, transformer/, vqvae/, scheduler/, safetensors weights) loads with
`ENATPipeline.from_pretrained` or, after `import enat_diffusers`, `DiffusionPipeline.from_pretrained`. The scheduler
and pipeline configs carry the reference's sampling settings for the resolution (256 px: guidance_scale 3.5, sample
temperature 6; 512 px: guidance_scale 4.5, sample temperature 4; both 8 steps, mask temperature 1.5); guidance_scale
has diffusers' meaning, the reference's `cfg` 2.5 / 3.5 plus 1.

The model's configuration is read from the checkpoint: its width and number of blocks identify ENAT-S, -B or -L,
which fixes the head count and the encoder/decoder split (not recorded in the weights); `--num_attention_heads` and
`--num_decoder_layers` are only needed for other checkpoints, and values that contradict the paper configuration
are refused. A checkpoint with 1000 classes gets ImageNet-1k's class names as `id2label`, so that
`pipe(class_labels=["golden retriever"])` works; `--id2label` takes a json file {class id: comma-separated names}
for another label set.

Refused before anything is written: a damaged checkpoint (a zip member failing its CRC), pickled objects other than
tensors (`torch.load(weights_only=True)`), missing, unexpected or misshaped keys (listed), weights that are not
floating point, NaN or inf weights (also after the cast to `--dtype`). The folder is written into a temporary folder
next to `--output_dir` and moved into place when complete, so an interrupted conversion leaves the previous state (no
folder, or the old one); the next run removes the hidden `.NAME.*.tmp` / `.NAME.*.old` folders it left (and moves an
old folder back when the kill came between the two renames), saying so. A non-empty `--output_dir` is refused unless
`--overwrite` is given, which replaces it as a whole. Checked at start-up, before the conversion: free space for the
output (estimated from the checkpoints' sizes and `--dtype`), and for `--push_to_hub` the repo id (NAMESPACE/NAME) and
a Hub token (`hf auth login` or HF_TOKEN).
"""

import argparse
import json
import os
import sys

from enat_diffusers.conversion.common import conversion_start_problem, save_converted
from enat_diffusers.conversion.pipeline import convert_enat_pipeline
from enat_diffusers.script_utils import DTYPES


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def read_id2label(path: str) -> dict[int, str]:
    """A json object {class id: comma-separated class names}; the conversion checks it against the model."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"--id2label {path}: cannot read a json object ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--id2label {path}: expected a json object {{class id: class names}}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=existing_file, required=True, help="nnet_ema.pth (256 px) or nnet_ema_512.pth (512 px)"
    )
    parser.add_argument("--vqgan", type=existing_file, required=True, help="vqgan_jax_strongaug.ckpt")
    parser.add_argument("--resolution", type=int, choices=[256, 512], required=True)
    parser.add_argument("--output_dir", required=True, help="a new or empty folder (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir as a whole")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    parser.add_argument(
        "--num_attention_heads",
        type=positive_int,
        default=None,
        help="default: from the checkpoint's paper configuration (ENAT-L 16, ENAT-B 8, ENAT-S 6)",
    )
    parser.add_argument(
        "--num_decoder_layers",
        type=positive_int,
        default=None,
        help="default: from the checkpoint's paper configuration (ENAT-L 2, ENAT-B and -S 1)",
    )
    parser.add_argument(
        "--id2label", default=None, help="json file {class id: class names} (default: ImageNet-1k for 1000 classes)"
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="also upload to this Hub repository")
    args = parser.parse_args(argv)
    problem = conversion_start_problem(
        args.output_dir, args.overwrite, args.push_to_hub, [args.checkpoint, args.vqgan], DTYPES[args.dtype].itemsize
    )
    if problem:
        parser.error(problem)

    try:
        id2label = read_id2label(args.id2label) if args.id2label else None
        pipe = convert_enat_pipeline(
            args.checkpoint,
            args.vqgan,
            args.resolution,
            dtype=args.dtype,
            num_attention_heads=args.num_attention_heads,
            num_decoder_layers=args.num_decoder_layers,
            id2label=id2label,
        )
    except ValueError as error:  # includes CheckpointMismatchError: a sentence (or a list of keys), no traceback
        raise SystemExit(f"conversion refused: {error}") from None
    for name in ("transformer", "vqvae"):
        print(f"{name}: {getattr(pipe, name).num_parameters():,} parameters")
    try:
        save_converted(pipe, args.output_dir, args.push_to_hub, overwrite=args.overwrite)
    except ValueError as error:  # no room left on the disk: a sentence, no traceback
        raise SystemExit(f"conversion not saved: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
