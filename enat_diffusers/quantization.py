"""
Precision for the machine at hand: int8 on CPUs through PyTorch's x86 quantized engine, and the `"auto"` choice.

* `quantize_for_cpu(model)` replaces every `nn.Linear` of a float32 CPU model by PyTorch's dynamically quantized int8
  linear (`torch.ao.quantization.quantize_dynamic`, engine `"x86"`: int8 weights, activations quantized per call).
  On AVX2 CPUs this is the int8 path with fast kernels (FBGEMM); torchao's int8 configurations (`TorchAoConfig` in
  diffusers) run `torch._int_mm`, which has no fast AVX2 kernel, and end up slower than float32 there.
* `quantize_decoder_for_cpu(vqvae)` does the same for the VQ decoder's convolutions, which dynamic quantization does
  not cover: static int8 (activation ranges calibrated once on decoded token grids), same engine.
* `choose_precision(device)` picks the fastest measured precision for the device (see `choose_precision`).
* `set_precision(pipe, precision)` puts a pipeline in a precision, `"auto"` included: what the scripts and the app
  call for their `--precision` flag.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

# Precision names, shared by the scripts' `--precision` flag, the app and the benchmark.
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
AUTO = "auto"
PRECISION_CHOICES = (AUTO, *PRECISIONS)
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The quantized engine whose dynamic int8 linear has fast AVX2 / AVX-512 kernels (FBGEMM).
X86_ENGINE = "x86"
# Set on a model by `quantize_for_cpu` and `quantize_decoder_for_cpu`.
_QUANTIZED_MARK = "_enat_quantized_for_cpu"
# torch.ao.quantization warns on every call that it is deprecated (torchao's `quantize_` replaces it, but without a
# fast AVX2 kernel); quantized tensor creation warns likewise. Both stay silenced inside the quantizing calls only:
# docs/source/optimization/cpu.md states the status once.
_DEPRECATION_MESSAGES = (
    "torch.ao.quantization is deprecated",
    "torch.quantize_per_tensor, torch.quantize_per_channel",
)


@dataclass(frozen=True)
class CPUFeatures:
    """What decides the CPU precision: `torch.backends.cpu.get_cpu_capability()` (`"AVX2"`, `"AVX512"`, `"DEFAULT"`,
    ...), the AVX-512 BF16, VNNI and AMX extensions, and whether PyTorch's x86 int8 engine is usable."""

    capability: str
    avx512_bf16: bool = False
    vnni: bool = False
    amx: bool = False
    x86_int8: bool = False

    @classmethod
    def detect(cls) -> "CPUFeatures":
        def supported(name: str) -> bool:
            check = getattr(torch.cpu, name, None)
            return bool(check()) if check is not None else False

        return cls(
            capability=torch.backends.cpu.get_cpu_capability(),
            avx512_bf16=supported("_is_avx512_bf16_supported"),
            vnni=supported("_is_vnni_supported"),
            amx=supported("_is_amx_tile_supported"),
            x86_int8=x86_int8_available(),
        )


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision `choose_precision` picked (`precision`, one of `PRECISIONS`) and why (`reason`, one sentence)."""

    precision: str
    reason: str


def x86_int8_available() -> bool:
    """Whether this PyTorch has the x86 quantized engine and `torch.ao.quantization.quantize_dynamic`."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return X86_ENGINE in torch.backends.quantized.supported_engines


def choose_precision(device: str | torch.device = "cpu", cpu_features: CPUFeatures | None = None) -> PrecisionChoice:
    """
    The precision to run ENAT in on `device`: never one measured slower than float32 there, float32 when unsure.

    * CUDA: `bf16` where the GPU supports it, else `fp32`.
    * CPU with AMX or AVX-512 BF16: `bf16` (ENAT-L sampling 2.4x float32 at batch 1 on such a machine).
    * CPU with AVX2 (or AVX-512 with VNNI, no BF16) and PyTorch's x86 int8 engine: `int8` (`quantize_for_cpu` and
      `quantize_decoder_for_cpu`; ENAT-L end to end 1.7x to 1.9x float32 on an AVX2 CPU), as bf16 has no fast
      kernel there (about 0.25x).
    * Anything else (AVX-512 without VNNI or BF16, ARM, no vector extension, an int8 engine missing): `fp32`.

    Args:
        device: where the model runs.
        cpu_features: the CPU's features (default: this machine's, `CPUFeatures.detect()`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "a CUDA GPU with bfloat16 support")
        return PrecisionChoice("fp32", "a CUDA device without bfloat16 support")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"no measurements on {device.type} devices")
    features = cpu_features or CPUFeatures.detect()
    if features.amx or features.avx512_bf16:
        return PrecisionChoice("bf16", f"CPU {features.capability} with AMX or AVX-512 BF16: fast bfloat16 matmuls")
    if features.capability in ("AVX2", "AVX512") and (features.capability == "AVX2" or features.vnni):
        if features.x86_int8:
            return PrecisionChoice(
                "int8", f"CPU {features.capability} without bfloat16 kernels: int8 through PyTorch's x86 engine"
            )
        return PrecisionChoice("fp32", f"CPU {features.capability}, but this PyTorch has no x86 int8 engine")
    return PrecisionChoice("fp32", f"CPU {features.capability}: no faster precision measured")


def is_quantized_for_cpu(model: nn.Module) -> bool:
    """Whether `quantize_for_cpu` (or, for a VQ model, `quantize_decoder_for_cpu`) quantized `model`."""
    return getattr(model, _QUANTIZED_MARK, False)


def quantize_for_cpu(model: nn.Module) -> nn.Module:
    """
    Quantizes every `nn.Linear` of `model` to int8, in place, with PyTorch's x86 engine: int8 weights (per output
    channel), activations quantized dynamically at every call. Embeddings, norms and the tied logits head stay float32.

        pipe.transformer = quantize_for_cpu(pipe.transformer)

    For CPUs: the x86 engine's int8 linear runs 1.6x to 1.8x float32 on AVX2 (see the CPU page of the docs). The
    quantized model runs on the CPU in float32 only (its `to` refuses other devices and dtypes) and cannot be saved:
    save the float32 model and quantize after loading (11 s for ENAT-L on 2 cores). Quantizing a model twice returns
    it unchanged.

    Args:
        model: a float32 model on the CPU, e.g. `pipe.transformer`.

    Returns:
        `model`, quantized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if is_quantized_for_cpu(model):
        return model
    _check_quantizable(model, "quantize_for_cpu")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _x86_engine():
        quantize_dynamic(model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    _mark_quantized(model, "quantize_for_cpu")
    return model


def quantize_decoder_for_cpu(vqvae, calibration_token_ids: torch.LongTensor | None = None):
    """
    Quantizes the convolutions of a `MaskGITVQModel`'s decoder to int8, in place, with PyTorch's x86 engine: int8
    weights (per output channel) and int8 activations whose ranges are calibrated once, by decoding
    `calibration_token_ids`. Normalisations, activations and the encoder stay float32; decoding returns float32.

        pipe.vqvae = quantize_decoder_for_cpu(pipe.vqvae)

    The decoder is convolutions only, which `quantize_for_cpu` (dynamic int8) does not cover. On an AVX2 CPU the int8
    convolutions run about 1.8x float32, the whole decode 1.4x to 1.7x float32 (see the CPU page of the docs). Like
    `quantize_for_cpu`, the result runs on the CPU only and cannot be saved; quantizing twice returns it unchanged.
    Calibrating is one float32 decode with observers: about 5 s for MaskGIT's decoder on 2 cores.

    Args:
        vqvae (`MaskGITVQModel`): a float32 model on the CPU, e.g. `pipe.vqvae`.
        calibration_token_ids (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            token grids to calibrate on, e.g. ones the pipeline sampled (`output_type="latent"`). Default: one grid
            of uniformly random codebook ids at the model's `sample_size` (fixed seed); on the digits demo it gives
            a PSNR against float32 within 0.5 dB of calibrating on four grids or on sampled tokens (about 37 dB).

    Returns:
        `vqvae`, its decoder quantized.
    """
    from .models.vq_maskgit import MaskGITVQModel

    if not isinstance(vqvae, MaskGITVQModel):
        raise TypeError(f"`vqvae` must be a MaskGITVQModel, got {type(vqvae).__name__}.")
    if is_quantized_for_cpu(vqvae):
        return vqvae
    _check_quantizable(vqvae, "quantize_decoder_for_cpu")
    if calibration_token_ids is None:
        side = vqvae.config.sample_size // vqvae.downsample_factor
        generator = torch.Generator().manual_seed(0)
        calibration_token_ids = torch.randint(
            0, vqvae.codebook_size, (CALIBRATION_GRIDS, side, side), generator=generator
        )
    else:
        calibration_token_ids = vqvae.check_token_ids(calibration_token_ids, "calibration_token_ids")
    from torch.ao.quantization import HistogramObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # The x86 engine's defaults, with the 7-bit activation range spelled out as `quant_max` (what `reduce_range`
    # means, and what keeps AVX2's 16-bit intermediate sums from saturating).
    qconfig = QConfig(
        activation=HistogramObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=127),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    # Convolutions only: quantizing around the GroupNorms too adds a rounding and two copies per norm, for nothing.
    mapping = QConfigMapping().set_object_type(nn.Conv2d, qconfig)
    latents = vqvae.quantize.lookup(calibration_token_ids)
    with _x86_engine(), torch.no_grad():
        observed = prepare_fx(vqvae.decoder.eval(), mapping, example_inputs=(latents[:1],))
        for batch in latents.split(CALIBRATION_BATCH):
            observed(batch)
        vqvae.decoder = convert_fx(observed)
    _mark_quantized(vqvae, "quantize_decoder_for_cpu")
    return vqvae


# Calibration of `quantize_decoder_for_cpu`: random grids decoded by default (more did not lower the error: 4 grids
# were within 0.5 dB of 1 and cost 3x the time), and how many grids at a time.
CALIBRATION_GRIDS = 1
CALIBRATION_BATCH = 2


def _check_quantizable(model: nn.Module, function: str) -> None:
    if not x86_int8_available():
        raise RuntimeError(
            f"{function} needs PyTorch's x86 quantized engine (torch.ao.quantization), which this PyTorch "
            f"({torch.__version__}) does not have; run in float32 instead."
        )
    tensors = [*model.parameters(), *model.buffers()]
    devices = {tensor.device.type for tensor in tensors}
    dtypes = {tensor.dtype for tensor in tensors if tensor.is_floating_point()}
    if devices - {"cpu"} or dtypes - {torch.float32}:
        raise ValueError(
            f"{function} needs a float32 model on the CPU, got one with "
            f"{sorted(str(dtype) for dtype in dtypes)} on {sorted(devices)}: call model.to('cpu', torch.float32) first."
        )


@contextmanager
def _x86_engine():
    """PyTorch's x86 quantized engine, and its deprecation warnings silenced, for the duration."""
    previous_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = X86_ENGINE
    try:
        with warnings.catch_warnings():
            for message in _DEPRECATION_MESSAGES:
                warnings.filterwarnings("ignore", message=message.replace(".", r"\."))
            yield
    finally:
        torch.backends.quantized.engine = previous_engine


def _mark_quantized(model: nn.Module, function: str) -> None:
    setattr(model, _QUANTIZED_MARK, True)
    # Instance attributes: the pipeline's `save_pretrained` (and `push_to_hub`) and `to` go through them and stop here
    # with a sentence, instead of failing inside safetensors on the packed int8 weights, or moving the float
    # parameters while the packed int8 weights stay on the CPU (the next call would fail deep inside torch).
    model.save_pretrained = partial(_refuse_saving, function)
    model.to = partial(_move_on_cpu_only, model, model.to, function)


def _move_on_cpu_only(model: nn.Module, move, function: str, *args, **kwargs):
    """`model.to(...)` for a quantized model: CPU and float32 targets only (memory formats pass)."""
    targets = [*args, kwargs.get("device"), kwargs.get("dtype")]
    for target in targets:
        if isinstance(target, torch.Tensor):
            targets += [target.device, target.dtype]
    devices = [torch.device(target) for target in targets if isinstance(target, (str, int, torch.device))]
    dtypes = [target for target in targets if isinstance(target, torch.dtype)]
    wrong = [str(device) for device in devices if device.type != "cpu"]
    wrong += [str(dtype) for dtype in dtypes if dtype != torch.float32]
    if wrong:
        raise ValueError(
            f"this {type(model).__name__} was quantized with {function} and runs on the CPU in float32 only, not "
            f"{' '.join(wrong)}: load the model again to run it there"
        )
    return move(*args, **kwargs)


def _refuse_saving(function: str, *args, **kwargs):
    raise NotImplementedError(
        f"This model was quantized with {function} (PyTorch's int8 modules), which cannot be saved or loaded with "
        f"from_pretrained: save the float32 model and call {function} after loading it."
    )


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> PrecisionChoice:
    """`precision` (one of `PRECISION_CHOICES`) -> the concrete choice for `device` (`"auto"`: `choose_precision`)."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"`precision` must be one of {list(PRECISION_CHOICES)}, got {precision!r}.")
    if precision == AUTO:
        return choose_precision(device)
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ValueError(f"`precision='int8'` runs on the CPU only (quantize_for_cpu), got device {str(device)!r}.")
    return PrecisionChoice(precision, "requested")


def decoder_memory_format(device: str | torch.device) -> torch.memory_format:
    """The memory format a float VQ decoder runs fastest in on `device`: channels-last on CPUs (oneDNN's
    convolutions; 1.04x to 1.20x float32 contiguous for MaskGIT's decoder on an AVX2 CPU, pixels equal to 1e-4),
    contiguous elsewhere (not measured to pay on GPUs)."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def set_precision(pipe, precision: str = AUTO, device: str | torch.device | None = None) -> PrecisionChoice:
    """
    Moves an ENAT pipeline to `device` (default: the pipeline's) in `precision`: `"fp32"`, `"bf16"`, `"fp16"` cast
    every component; `"int8"` keeps float32 and quantizes the transformer (`quantize_for_cpu`) and the VQ decoder
    (`quantize_decoder_for_cpu`), CPU only; `"auto"` takes `choose_precision(device)`. A float VQ decoder also gets the
    device's fastest memory format (`decoder_memory_format`). Returns the choice (precision and reason).
    """
    device = torch.device(device) if device is not None else pipe.device
    choice = resolve_precision(precision, device)
    quantized = [name for name in ("transformer", "vqvae") if is_quantized_for_cpu(getattr(pipe, name))]
    if quantized and choice.precision != "int8":
        raise ValueError(
            f"the pipeline's {' and '.join(quantized)} {'is' if len(quantized) == 1 else 'are'} quantized to int8 and "
            f"cannot run in {choice.precision}: load the pipeline again"
        )
    dtype = _FLOAT_DTYPES.get(choice.precision, torch.float32)
    modules = [component for component in pipe.components.values() if isinstance(component, nn.Module)]
    # Cast only when needed: diffusers warns about every cast with `to(dtype)`.
    pipe.to(device=device, dtype=dtype if any(module.dtype != dtype for module in modules) else None)
    if choice.precision == "int8":
        pipe.transformer = quantize_for_cpu(pipe.transformer)
    pipe.vqvae = set_vqvae_precision(pipe.vqvae, choice.precision, device)
    return choice


def set_vqvae_precision(vqvae, precision: str, device: str | torch.device):
    """
    The VQ model, already in `precision`'s dtype on `device`, set up as `set_precision` leaves it: the device's
    fastest memory format (`decoder_memory_format`; the encoder, used by image editing, keeps it too) and, for
    `"int8"`, an int8 decoder (`quantize_decoder_for_cpu`). Returns `vqvae`, changed in place.
    """
    vqvae.to(memory_format=decoder_memory_format(device))
    if precision == "int8":
        vqvae = quantize_decoder_for_cpu(vqvae)
    return vqvae
