"""Convert MaskGIT's VQGAN (`vqgan_jax_strongaug.ckpt`, as shipped with ENAT) to a diffusers `MaskGITVQModel` folder.

    python conversion/convert_vqgan_to_diffusers.py --vqgan vqgan_jax_strongaug.ckpt --output_dir DIR \\
        [--dtype fp32|fp16|bf16] [--push_to_hub REPO_ID]

The folder holds `config.json` and `diffusion_pytorch_model.safetensors` and reloads with
`MaskGITVQModel.from_pretrained(DIR)`. The checkpoint is read with `torch.load(weights_only=True)`; every key must
map onto the model (missing, unexpected or misshaped keys raise `CheckpointMismatchError`). As with the pipeline
converter, a damaged checkpoint, weights that are not floating point and NaN/inf weights are refused, the folder is
moved into place only when complete, and a non-empty `--output_dir` needs `--overwrite`.
"""

import argparse
import os
import sys

from enat_diffusers.conversion.common import conversion_start_problem, save_converted
from enat_diffusers.conversion.vqgan import convert_vqgan
from enat_diffusers.script_utils import DTYPES

__all__ = ["convert_vqgan", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqgan", required=True, help="path of vqgan_jax_strongaug.ckpt")
    parser.add_argument("--output_dir", required=True, help="folder to write the diffusers model into")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir as a whole")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--sample_size", type=int, default=256, help="image size recorded in the config")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="also upload to this Hub repository")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.vqgan):
        parser.error(f"--vqgan: no such file: {args.vqgan}")
    problem = conversion_start_problem(
        args.output_dir, args.overwrite, args.push_to_hub, [args.vqgan], DTYPES[args.dtype].itemsize
    )
    if problem:
        parser.error(problem)

    try:
        model = convert_vqgan(args.vqgan, dtype=args.dtype, sample_size=args.sample_size)
    except ValueError as error:
        raise SystemExit(f"conversion refused: {error}") from None
    config = {key: value for key, value in model.config.items() if not key.startswith("_")}
    print(f"MaskGITVQModel: {model.num_parameters():,} parameters, config {config}")
    try:
        save_converted(model, args.output_dir, args.push_to_hub, overwrite=args.overwrite)
    except ValueError as error:  # no room left on the disk: a sentence, no traceback
        raise SystemExit(f"conversion not saved: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
