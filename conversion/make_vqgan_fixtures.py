"""Write golden VQGAN encode/decode outputs of the reference ENAT implementation for the parity tests.

    python conversion/make_vqgan_fixtures.py --reference_dir /path/to/ENAT [--output tests/fixtures]

`--reference_dir` is a checkout of github.com/LeapLabTHU/ENAT outside this repository (it needs `einops` and
`omegaconf`). A small reference `taming.models.vqgan.VQModel` (width 32, levels x1/x2/x1 so that both encoder and
decoder have width-changing blocks, 1 block per level, 16-dim latents, 64 codes) gets random weights everywhere,
GroupNorm affines included, and a codebook drawn at the scale of its encoder outputs so that the encoded ids are
varied and every nearest entry wins by a clear margin. Weights are rounded to float16 values (and stored as float16
to keep the file small); both implementations run them in float32.

Writes `vqgan_reference.safetensors` with:
- `state_dict.<reference key>`: the reference model's weights under its own key names,
- `images`: (2, 3, 32, 32) inputs in the reference's [0, 1] range,
- `token_ids`: (2, 8, 8) ids from the reference encoder/quantizer,
- `latents`: (2, 16, 8, 8) quantized latents from the reference,
- `decoded`: (2, 3, 32, 32) reference `decode_code(token_ids)` output, in the reference's [0, 1] convention,
and the configs (reference `ddconfig` and ours) as json in the metadata.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_import import import_reference  # noqa: E402

DDCONFIG = {
    "double_z": False,
    "z_channels": 16,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
N_EMBED = 64
EMBED_DIM = 16
BATCH_SIZE = 2
SEED = 0
# Our MaskGITVQModel config for the same network.
OUR_CONFIG = {
    "in_channels": DDCONFIG["in_channels"],
    "out_channels": DDCONFIG["out_ch"],
    "hidden_channels": DDCONFIG["ch"],
    "channel_multipliers": DDCONFIG["ch_mult"],
    "layers_per_block": DDCONFIG["num_res_blocks"],
    "latent_channels": EMBED_DIM,
    "num_vq_embeddings": N_EMBED,
    "norm_num_groups": 32,
    "sample_size": DDCONFIG["resolution"],
}


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter (fp16-representable values) so that no layer is close to an identity or zero."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("quantize."):
                continue
            if parameter.ndim == 1 and "norm" in name and name.endswith("weight"):
                value = 1 + 0.25 * torch.randn(parameter.shape, generator=generator)
            elif parameter.ndim == 1:
                value = 0.1 * torch.randn(parameter.shape, generator=generator)
            else:
                fan_in = parameter[0].numel()
                value = torch.randn(parameter.shape, generator=generator) / fan_in**0.5
            parameter.copy_(value.half().float())


def _smooth_images(generator: torch.Generator, size: int) -> torch.Tensor:
    """Low-frequency colour fields plus a little pixel noise, in [0, 1]."""
    coarse = torch.rand(BATCH_SIZE, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def _nearest_margin(latents: torch.Tensor, codebook: torch.Tensor) -> float:
    """Smallest gap between the best and second-best squared distance, relative to the typical distance."""
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    distances = torch.cdist(flat.double(), codebook.double()) ** 2
    best_two = distances.topk(2, dim=1, largest=False).values
    return float((best_two[:, 1] - best_two[:, 0]).min() / best_two[:, 0].mean())


def build_fixtures(reference_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    (vqgan_module,) = import_reference(reference_dir, "taming.models.vqgan")
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = vqgan_module.VQModel(ddconfig=DDCONFIG, lossconfig=None, n_embed=N_EMBED, embed_dim=EMBED_DIM).eval()
    _randomise(model, generator)
    images = _smooth_images(generator, DDCONFIG["resolution"])

    with torch.no_grad():
        # Codebook at the scale of the encoder outputs: Gaussian with their per-channel mean and spread. Redrawn
        # until every position's nearest entry wins by a clear margin, so float rounding cannot change an id.
        encoded = model.encoder(images)
        mean = encoded.mean(dim=(0, 2, 3))
        std = encoded.std(dim=(0, 2, 3))
        for _ in range(100):
            codebook = (mean + std * torch.randn(N_EMBED, EMBED_DIM, generator=generator)).half().float()
            margin = _nearest_margin(encoded, codebook)
            if margin > 1e-3:
                break
        else:
            raise RuntimeError("could not draw a codebook with well-separated nearest entries")
        model.quantize.embedding.weight.copy_(codebook)

        quantized, _, (_, _, flat_ids) = model.encode(images)
        token_ids = flat_ids.reshape(BATCH_SIZE, quantized.shape[2], quantized.shape[3])
        decoded = model.decode_code(token_ids)

    used = token_ids.unique().numel()
    print(f"ids use {used} of {N_EMBED} codes; nearest-entry margin {margin:.2e}")
    print(f"decoded range [{decoded.min():.3f}, {decoded.max():.3f}], latents std {encoded.std():.3f}")

    tensors = {f"state_dict.{key}": value.half().contiguous() for key, value in model.state_dict().items()}
    tensors.update(
        {
            "images": images.contiguous(),
            "token_ids": token_ids.long().contiguous(),
            "latents": quantized.contiguous(),
            "decoded": decoded.contiguous(),
        }
    )
    metadata = {
        "reference_ddconfig": json.dumps(DDCONFIG),
        "reference_n_embed": str(N_EMBED),
        "reference_embed_dim": str(EMBED_DIM),
        "config": json.dumps(OUR_CONFIG),
        "generator": "conversion/make_vqgan_fixtures.py",
        "torch_version": torch.__version__,
    }
    return tensors, metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_dir", required=True, help="checkout of github.com/LeapLabTHU/ENAT")
    parser.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"),
        help="folder to write vqgan_reference.safetensors into (default: tests/fixtures)",
    )
    args = parser.parse_args(argv)
    tensors, metadata = build_fixtures(args.reference_dir)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "vqgan_reference.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
