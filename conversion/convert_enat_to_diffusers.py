"""Convert the reference ENAT checkpoints (LeapLabTHU/ENAT) into a diffusers pipeline folder.

    python conversion/convert_enat_to_diffusers.py --checkpoint nnet_ema.pth --vqgan vqgan_jax_strongaug.ckpt \
        --resolution 256 --output_dir enat-l-256 [--dtype fp16|bf16|fp32] [--push_to_hub USER/REPO]

The folder (model_index.json, transformer/, vqvae/, scheduler/, safetensors weights) loads with
`ENATPipeline.from_pretrained` or, after `import enat_diffusers`, `DiffusionPipeline.from_pretrained`. The scheduler
and pipeline configs carry the reference's sampling settings for the resolution (256 px: guidance 2.5, sample
temperature 6; 512 px: guidance 3.5, sample temperature 4; both 8 steps, mask temperature 1.5). Checkpoints are read
with `torch.load(weights_only=True)`; a missing, unexpected or misshaped key stops the conversion with a list.
`--id2label` takes a json file mapping class ids to (comma-separated) class names, e.g. the `id2label` of an
ImageNet DiT pipeline, so that class names can be passed to the pipeline.
"""

import argparse
import json
import sys

from enat_diffusers.conversion.common import DTYPES, save_converted
from enat_diffusers.conversion.pipeline import convert_enat_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="nnet_ema.pth (256 px) or nnet_ema_512.pth (512 px)")
    parser.add_argument("--vqgan", required=True, help="vqgan_jax_strongaug.ckpt")
    parser.add_argument("--resolution", type=int, choices=[256, 512], required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--num_attention_heads", type=int, default=16, help="16 for ENAT-L, 8 for ENAT-B, 6 for -S")
    parser.add_argument("--num_decoder_layers", type=int, default=2, help="2 for ENAT-L, 1 for ENAT-B and -S")
    parser.add_argument("--id2label", default=None, help="json file {class id: class names}")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="also upload to this Hub repository")
    args = parser.parse_args(argv)

    id2label = None
    if args.id2label:
        with open(args.id2label) as handle:
            id2label = {int(key): value for key, value in json.load(handle).items()}
    pipe = convert_enat_pipeline(
        args.checkpoint,
        args.vqgan,
        args.resolution,
        dtype=args.dtype,
        num_attention_heads=args.num_attention_heads,
        num_decoder_layers=args.num_decoder_layers,
        id2label=id2label,
    )
    for name in ("transformer", "vqvae"):
        print(f"{name}: {getattr(pipe, name).num_parameters():,} parameters")
    save_converted(pipe, args.output_dir, args.push_to_hub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
