# Copyright 2025 The enat-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The f16 VQGAN tokenizer that MaskGIT released and ENAT uses to turn images into token grids and back."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from ..hub import ENATHubMixin

__all__ = ["MaskGITVQEncoderOutput", "MaskGITVQModel", "MaskGITVQModelOutput"]


@dataclass
class MaskGITVQEncoderOutput(BaseOutput):
    """
    Output of [`MaskGITVQModel.encode`].

    Args:
        token_ids (`torch.LongTensor` of shape `(batch_size, height // f, width // f)`):
            Index of the nearest codebook entry at every position of the latent grid (`f` is the downsampling factor).
        latents (`torch.Tensor` of shape `(batch_size, latent_channels, height // f, width // f)`):
            The quantized latents, i.e. the codebook entries of `token_ids`.
    """

    token_ids: torch.LongTensor
    latents: torch.Tensor


@dataclass
class MaskGITVQModelOutput(BaseOutput):
    """
    Output of [`MaskGITVQModel.forward`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            Reconstruction of the input in `[-1, 1]` (not clamped). Gradients reach the encoder through a
            straight-through estimator around the quantization.
        token_ids (`torch.LongTensor` of shape `(batch_size, height // f, width // f)`):
            The token ids the input was quantized to.
        quantization_loss (`torch.Tensor`, scalar):
            `codebook_loss + commitment_cost * commitment_loss`, with the codebook loss pulling the codebook towards
            the (detached) encoder outputs and the commitment loss pulling the encoder outputs towards the (detached)
            codebook entries.
    """

    sample: torch.Tensor
    token_ids: torch.LongTensor
    quantization_loss: torch.Tensor


class _Float32GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics and affine transform are always computed in float32.

    The squared activations of the large feature maps overflow float16, so the normalisation runs in float32 and the
    result is cast back to the input dtype. For float32 inputs this is exactly `nn.GroupNorm`.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        normed = F.group_norm(hidden_states.float(), self.num_groups, weight, bias, self.eps)
        return normed.to(hidden_states.dtype)


class _MaskGITResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice; convolutions have no bias.

    When the block keeps the width, its output is `x + h` with `h` the residual branch. When it changes the width, the
    released checkpoint's blocks discard the input entirely and return `h + skip_proj(h)`: the 1x1 projection is
    applied to the branch output `h`, not to `x`. This is kept as is, the weights were trained that way.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float):
        super().__init__()
        self.norm1 = _Float32GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _Float32GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.skip_proj = (
            nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        branch = self.conv1(F.silu(self.norm1(hidden_states)))
        branch = self.conv2(F.silu(self.norm2(branch)))
        if self.skip_proj is None:
            return hidden_states + branch
        return branch + self.skip_proj(branch)


class _MaskGITMidBlock(nn.Module):
    """Two width-preserving residual blocks at the lowest resolution (the checkpoint has no attention here)."""

    def __init__(self, channels: int, norm_num_groups: int, norm_eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_MaskGITResnetBlock(channels, channels, norm_num_groups, norm_eps) for _ in range(2)]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return hidden_states


class _MaskGITDownBlock(nn.Module):
    """`num_layers` residual blocks, then (unless it is the last level) 2x2 average pooling; no parameters to pool."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_downsample: bool,
        norm_num_groups: int,
        norm_eps: float,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                _MaskGITResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups, norm_eps)
                for i in range(num_layers)
            ]
        )
        self.add_downsample = add_downsample

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.add_downsample:
            hidden_states = F.avg_pool2d(hidden_states, kernel_size=2, stride=2)
        return hidden_states


class _NearestUpsample2D(nn.Module):
    """2x nearest-neighbour upsampling followed by a 3x3 convolution with bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class _MaskGITUpBlock(nn.Module):
    """`num_layers` residual blocks, then (unless it is the last level) a `_NearestUpsample2D`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_upsample: bool,
        norm_num_groups: int,
        norm_eps: float,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                _MaskGITResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups, norm_eps)
                for i in range(num_layers)
            ]
        )
        self.upsampler = _NearestUpsample2D(out_channels) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsampler is not None:
            hidden_states = self.upsampler(hidden_states)
        return hidden_states


class _MaskGITEncoder(nn.Module):
    """Image `(B, in_channels, H, W)` in `[0, 1]` -> continuous latents `(B, latent_channels, H / f, W / f)`."""

    def __init__(
        self,
        in_channels: int,
        block_channels: list[int],
        layers_per_block: int,
        latent_channels: int,
        norm_num_groups: int,
        norm_eps: float,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_channels[0], kernel_size=3, padding=1, bias=False)
        self.down_blocks = nn.ModuleList()
        previous = block_channels[0]
        for level, channels in enumerate(block_channels):
            self.down_blocks.append(
                _MaskGITDownBlock(
                    previous,
                    channels,
                    num_layers=layers_per_block,
                    add_downsample=level != len(block_channels) - 1,
                    norm_num_groups=norm_num_groups,
                    norm_eps=norm_eps,
                )
            )
            previous = channels
        self.mid_block = _MaskGITMidBlock(previous, norm_num_groups, norm_eps)
        self.norm_out = _Float32GroupNorm(norm_num_groups, previous, eps=norm_eps)
        self.conv_out = nn.Conv2d(previous, latent_channels, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(images)
        for block in self.down_blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.mid_block(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class _MaskGITDecoder(nn.Module):
    """Quantized latents `(B, latent_channels, h, w)` -> image `(B, out_channels, h * f, w * f)` in `[0, 1]`."""

    def __init__(
        self,
        out_channels: int,
        block_channels: list[int],
        layers_per_block: int,
        latent_channels: int,
        norm_num_groups: int,
        norm_eps: float,
    ):
        super().__init__()
        previous = block_channels[-1]
        self.conv_in = nn.Conv2d(latent_channels, previous, kernel_size=3, padding=1)
        self.mid_block = _MaskGITMidBlock(previous, norm_num_groups, norm_eps)
        # Deepest level first, i.e. in the order the blocks run.
        self.up_blocks = nn.ModuleList()
        for level, channels in reversed(list(enumerate(block_channels))):
            self.up_blocks.append(
                _MaskGITUpBlock(
                    previous,
                    channels,
                    num_layers=layers_per_block,
                    add_upsample=level != 0,
                    norm_num_groups=norm_num_groups,
                    norm_eps=norm_eps,
                )
            )
            previous = channels
        self.norm_out = _Float32GroupNorm(norm_num_groups, previous, eps=norm_eps)
        self.conv_out = nn.Conv2d(previous, out_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            hidden_states = block(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class _MaskGITVectorQuantizer(nn.Module):
    """A codebook `embedding` of `num_embeddings` vectors; latents are snapped to their nearest entry."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def nearest_ids(self, latents: torch.Tensor) -> torch.LongTensor:
        """`(B, C, h, w)` latents -> `(B, h, w)` ids of the nearest codebook entries (squared L2, float32)."""
        batch_size, channels, height, width = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, channels).float()
        codebook = self.embedding.weight.float()
        # |z - e|^2 expanded as |z|^2 + |e|^2 - 2 z.e; argmin keeps the first index on ties.
        distances = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(codebook**2, dim=1) - 2 * (flat @ codebook.t())
        return distances.argmin(dim=1).view(batch_size, height, width)

    def lookup(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """`(B, h, w)` ids -> `(B, C, h, w)` codebook entries."""
        return self.embedding(token_ids).permute(0, 3, 1, 2).contiguous()


class MaskGITVQModel(ENATHubMixin, ModelMixin, ConfigMixin):
    r"""
    The convolutional VQGAN of MaskGIT (f16, 1024 codes) that ENAT generates the tokens of.

    Unlike diffusers' [`VQModel`], it has no attention, no quant/post-quant convolutions, downsamples by average
    pooling, and the residual blocks that change width keep only their (1x1-projected) branch output. The defaults
    build the released `vqgan_jax_strongaug.ckpt` architecture; convert that checkpoint with
    `enat_diffusers.conversion.vqgan.convert_maskgit_vqgan_state_dict`.

    Images are in diffusers' `[-1, 1]` convention at the interface (the network itself works on `[0, 1]`).
    Computation follows the dtype of the weights; GroupNorm and the codebook search always run in float32.

    Parameters:
        in_channels (`int`, *optional*, defaults to 3): Channels of the input images.
        out_channels (`int`, *optional*, defaults to 3): Channels of the decoded images.
        hidden_channels (`int`, *optional*, defaults to 128): Width of the first level.
        channel_multipliers (`tuple[int]`, *optional*, defaults to `(1, 1, 2, 2, 4)`):
            Width of each level as a multiple of `hidden_channels`; every level but the last halves the resolution, so
            the downsampling factor is `2 ** (len(channel_multipliers) - 1)`.
        layers_per_block (`int`, *optional*, defaults to 2): Residual blocks per level, in the encoder and decoder.
        latent_channels (`int`, *optional*, defaults to 256): Dimension of the latents and codebook vectors.
        num_vq_embeddings (`int`, *optional*, defaults to 1024): Number of codebook entries (token ids).
        norm_num_groups (`int`, *optional*, defaults to 32): Groups of every GroupNorm.
        norm_eps (`float`, *optional*, defaults to 1e-6): Epsilon of every GroupNorm.
        commitment_cost (`float`, *optional*, defaults to 0.25): Weight of the commitment term in `forward`'s loss.
        sample_size (`int`, *optional*, defaults to 256):
            Image size the tokenizer was trained at (informational; any multiple of the downsampling factor works).
        force_upcast (`bool`, *optional*, defaults to `False`):
            As in diffusers' autoencoders: a float16 model decodes in float32 (and returns float32 images). Other
            dtypes are not affected. Off by default: GroupNorm, whose statistics overflow float16 first, always runs in
            float32 anyway.
    """

    _supports_gradient_checkpointing = False
    _card_tags = ("vqgan", "image-tokenizer")

    def _card_usage(self, repo_id: str) -> str:
        return f"""
from enat_diffusers import MaskGITVQModel

vqvae = MaskGITVQModel.from_pretrained("{repo_id}")
token_ids = vqvae.encode(images).token_ids  # images in [-1, 1], (B, 3, H, W)
"""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        hidden_channels: int = 128,
        channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4),
        layers_per_block: int = 2,
        latent_channels: int = 256,
        num_vq_embeddings: int = 1024,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        commitment_cost: float = 0.25,
        sample_size: int = 256,
        force_upcast: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("hidden_channels", hidden_channels),
            ("layers_per_block", layers_per_block),
            ("latent_channels", latent_channels),
            ("num_vq_embeddings", num_vq_embeddings),
            ("norm_num_groups", norm_num_groups),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        multipliers = list(channel_multipliers) if isinstance(channel_multipliers, (list, tuple)) else None
        if not multipliers or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in multipliers):
            raise ValueError(
                f"`channel_multipliers` must be a non-empty sequence of positive integers, got {channel_multipliers!r}."
            )
        block_channels = [hidden_channels * m for m in multipliers]
        if any(channels % norm_num_groups for channels in block_channels):
            raise ValueError(
                f"Every level width (`hidden_channels` * `channel_multipliers` = {block_channels}) must be divisible "
                f"by `norm_num_groups` ({norm_num_groups})."
            )

        self.encoder = _MaskGITEncoder(
            in_channels, block_channels, layers_per_block, latent_channels, norm_num_groups, norm_eps
        )
        self.quantize = _MaskGITVectorQuantizer(num_vq_embeddings, latent_channels)
        self.decoder = _MaskGITDecoder(
            out_channels, block_channels, layers_per_block, latent_channels, norm_num_groups, norm_eps
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """
        diffusers' [`~ModelMixin.from_pretrained`], refusing weights that are not finite.

        A NaN or infinite weight would make every decoded pixel NaN, which image conversion turns into black images
        without an error; a damaged file is better reported when it is loaded.

        Raises:
            `ValueError`: naming the first tensors with NaN or infinite values.
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` returns a tuple
        bad = [
            name for name, tensor in model.state_dict().items() if not tensor.is_meta and not tensor.isfinite().all()
        ]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ValueError(
                f"MaskGITVQModel weights loaded from {pretrained_model_name_or_path} contain NaN or infinite values "
                f"(in {shown}); the file is damaged or was saved from a diverged training run."
            )
        return loaded

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side (16 for the released model)."""
        return 2 ** (len(self.config.channel_multipliers) - 1)

    @property
    def codebook_size(self) -> int:
        """Number of valid token ids (1024 for the released model)."""
        return self.config.num_vq_embeddings

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}.")
        if not torch.is_floating_point(images):
            raise TypeError(f"`images` must be a floating-point tensor with values in [-1, 1], got {images.dtype}.")
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`images` must have shape (batch_size, {self.config.in_channels}, height, width), "
                f"got {tuple(images.shape)}."
            )
        factor = self.downsample_factor
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(
                f"`images` height and width must be multiples of the downsampling factor {factor}, "
                f"got {tuple(images.shape[2:])}."
            )

    def check_token_ids(self, token_ids: torch.Tensor, name: str = "token_ids") -> torch.LongTensor:
        """Token ids as `decode` takes them, checked (errors name the argument `name`) and returned as a long
        `(batch_size, height, width)` tensor on the model's device."""
        if not isinstance(token_ids, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(token_ids).__name__}.")
        if token_ids.dtype == torch.bool or token_ids.is_floating_point() or token_ids.is_complex():
            raise TypeError(f"`{name}` must be an integer tensor, got {token_ids.dtype}.")
        if token_ids.ndim == 2:
            side = math.isqrt(token_ids.shape[1])
            if side * side != token_ids.shape[1]:
                raise ValueError(
                    f"`{name}` of shape (batch_size, sequence_length) must describe a square grid, got sequence "
                    f"length {token_ids.shape[1]}; pass (batch_size, height, width) for other grids."
                )
            token_ids = token_ids.reshape(token_ids.shape[0], side, side)
        if token_ids.ndim != 3:
            raise ValueError(
                f"`{name}` must have shape (batch_size, height, width) or (batch_size, height * width), "
                f"got {tuple(token_ids.shape)}."
            )
        if token_ids.numel() == 0:
            raise ValueError(f"`{name}` must not be empty, got shape {tuple(token_ids.shape)}.")
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= self.config.num_vq_embeddings:
            raise ValueError(
                f"`{name}` must lie in [0, {self.config.num_vq_embeddings}), got values from {low} to {high}."
            )
        return token_ids.to(device=self.device, dtype=torch.long)

    def encode_continuous(self, images: torch.Tensor) -> torch.Tensor:
        """
        Encode images `(batch_size, in_channels, height, width)` in `[-1, 1]` into continuous, not yet quantized
        latents `(batch_size, latent_channels, height / f, width / f)`: what the codebook search of [`encode`] starts
        from, and the input of [`decode_latents`] when training the autoencoder without its codebook.
        """
        self._check_images(images)
        images = images.to(device=self.device, dtype=self.dtype)
        # The network was trained on images in [0, 1].
        return self.encoder((images + 1) / 2)

    @apply_forward_hook
    def encode(
        self, images: torch.Tensor, return_dict: bool = True
    ) -> MaskGITVQEncoderOutput | tuple[torch.LongTensor, torch.Tensor]:
        """
        Tokenize images.

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Floating-point images in `[-1, 1]`; height and width must be multiples of `downsample_factor`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`MaskGITVQEncoderOutput`] instead of a plain `(token_ids, latents)` tuple.

        Returns:
            [`MaskGITVQEncoderOutput`] or `tuple`: token ids `(batch_size, height / f, width / f)` and the quantized
            latents `(batch_size, latent_channels, height / f, width / f)`.
        """
        latents = self.encode_continuous(images)
        token_ids = self.quantize.nearest_ids(latents)
        quantized = self.quantize.lookup(token_ids)
        if not return_dict:
            return (token_ids, quantized)
        return MaskGITVQEncoderOutput(token_ids=token_ids, latents=quantized)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decode latents `(batch_size, latent_channels, h, w)` (usually codebook entries) into images
        `(batch_size, out_channels, h * f, w * f)` in `[-1, 1]` (not clamped), in the model's dtype (float32 for a float16
        model with `force_upcast`).
        """
        if not isinstance(latents, torch.Tensor) or not torch.is_floating_point(latents):
            raise TypeError("`latents` must be a floating-point torch.Tensor.")
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"`latents` must have shape (batch_size, {self.config.latent_channels}, height, width), "
                f"got {tuple(latents.shape)}."
            )
        if self.upcasts_decode:
            # Parameters are cast per call, as diffusers' pipelines upcast a float16 VAE around the decode: the model
            # stays float16 for the caller, and only this call pays for the float32 copy.
            parameters = {name: value.float() for name, value in self.decoder.named_parameters()}
            images = torch.func.functional_call(self.decoder, parameters, (latents.to(self.device, torch.float32),))
        else:
            images = self.decoder(latents.to(device=self.device, dtype=self.dtype))
        return images * 2 - 1

    @property
    def upcasts_decode(self) -> bool:
        """Whether decoding runs in float32 although the weights are float16 (`force_upcast` in the config)."""
        return self.config.force_upcast and self.dtype == torch.float16

    @apply_forward_hook
    def decode(self, token_ids: torch.LongTensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """
        Turn token ids back into images.

        Args:
            token_ids (`torch.LongTensor` of shape `(batch_size, height, width)` or `(batch_size, height * width)`):
                Integer ids in `[0, num_vq_embeddings)`; the flat form must describe a square grid (raster order).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a plain tuple.

        Returns:
            [`~models.autoencoders.vae.DecoderOutput`] or `tuple`: images `(batch_size, out_channels, height * f,
            width * f)` in `[-1, 1]`, not clamped, in the dtype of the model (float32 for a float16 model with
            `force_upcast`).

        Raises:
            `FloatingPointError`: when the decoded pixels are not all finite (NaN/inf weights, or float16 overflow).
        """
        token_ids = self.check_token_ids(token_ids)
        sample = self.decode_latents(self.quantize.lookup(token_ids))
        if not torch.isfinite(sample).all():
            # Clamped and converted to uint8, NaN would silently become black pixels.
            raise FloatingPointError(
                f"MaskGITVQModel.decode produced non-finite pixels ({self.dtype} weights): the weights contain "
                "NaN/inf, or the activations overflowed; a float16 model can decode in float32 with "
                "`force_upcast=True` in its config."
            )
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(
        self, images: torch.Tensor, return_dict: bool = True
    ) -> MaskGITVQModelOutput | tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
        """
        Reconstruct images through the codebook, for training.

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): Images in `[-1, 1]`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`MaskGITVQModelOutput`] instead of a `(sample, token_ids, quantization_loss)`
                tuple.

        Returns:
            [`MaskGITVQModelOutput`] or `tuple`: the reconstruction `(batch_size, out_channels, height, width)` in
            `[-1, 1]`, the token ids `(batch_size, height / f, width / f)` and the scalar quantization loss.
        """
        latents = self.encode_continuous(images)
        token_ids = self.quantize.nearest_ids(latents)
        quantized = self.quantize.lookup(token_ids)
        codebook_loss = F.mse_loss(quantized.float(), latents.detach().float())
        commitment_loss = F.mse_loss(latents.float(), quantized.detach().float())
        quantization_loss = codebook_loss + self.config.commitment_cost * commitment_loss
        # Straight-through: the decoder sees the codebook entries, the encoder receives the decoder's gradient.
        straight_through = latents + (quantized - latents).detach()
        sample = self.decode_latents(straight_through)
        if not return_dict:
            return (sample, token_ids, quantization_loss)
        return MaskGITVQModelOutput(sample=sample, token_ids=token_ids, quantization_loss=quantization_loss)
