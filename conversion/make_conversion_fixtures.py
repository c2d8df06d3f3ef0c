"""Write tiny random checkpoints in the exact layout of the reference ENAT release, for the conversion tests.

    python conversion/make_conversion_fixtures.py --reference_dir /path/to/ENAT [--output_dir tests/fixtures]

`--reference_dir` is a checkout of github.com/LeapLabTHU/ENAT outside this repository (it needs `einops` and
`omegaconf`). The reference classes build a 256 px-shaped but tiny transformer (16x16 tokens, width 32, 1 encoder +
1 decoder block, 16 codes, 10 classes) and an f16 VQGAN (5 levels of width 32, 1 block each, 16 codes), so the
conversion script runs on them exactly as on `nnet_ema.pth` and `vqgan_jax_strongaug.ckpt`. Weights are random and
stored in float16 to keep the files small: `tiny_nnet_ema.pth` (a plain state dict, as `nnet_ema.pth`) and
`tiny_vqgan.ckpt` (wrapped under "state_dict", as taming checkpoints are).
"""

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_import import import_reference  # noqa: E402

CODEBOOK_SIZE = 16
VQ_DDCONFIG = {
    "double_z": False,
    "z_channels": 8,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def _randomised_half_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif parameter.ndim == 1:
                parameter.normal_(0.0, 0.05)
            else:
                parameter.normal_(0.0, 1.0 / parameter[0].numel() ** 0.5)
    return {key: value.half().contiguous() for key, value in model.state_dict().items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_dir", required=True, help="checkout of LeapLabTHU/ENAT, outside this repo")
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    args = parser.parse_args(argv)
    models_module, vqgan_module = import_reference(args.reference_dir, "libs.models", "taming.models.vqgan")
    torch.manual_seed(0)

    transformer = models_module.DiT(
        input_size=16,
        hidden_size=32,
        num_heads=2,
        num_classes=10,
        codebook_size=CODEBOOK_SIZE,
        args=SimpleNamespace(enc_dec=[1, 1]),
    )
    vqgan = vqgan_module.VQModel(ddconfig=VQ_DDCONFIG, lossconfig=None, n_embed=CODEBOOK_SIZE, embed_dim=8)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_randomised_half_state_dict(transformer), output_dir / "tiny_nnet_ema.pth")
    torch.save({"state_dict": _randomised_half_state_dict(vqgan)}, output_dir / "tiny_vqgan.ckpt")
    for name in ("tiny_nnet_ema.pth", "tiny_vqgan.ckpt"):
        print(f"wrote {output_dir / name} ({(output_dir / name).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
