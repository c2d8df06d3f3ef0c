"""Benchmark ENAT sampling: FLOPs, speed and memory, against the same network without reuse, as a plain NAT, and aMUSEd.

    python examples/benchmark.py                                  # ENAT-L, 256 px (16x16 tokens), random weights
    python examples/benchmark.py --config ENAT-L-512 --batch_sizes 1
    python examples/benchmark.py --model path/to/enat-pipeline --rows enat amused --json out.json
    python examples/benchmark.py --device cuda --dtype bf16 --compile
    python examples/benchmark.py --rows enat --batch_sizes 1 --reference_dir /path/to/ENAT   # vs the reference
    python examples/benchmark.py --rows --precisions fp32 bf16 int8 --breakdown --matmul_rates   # end to end

Rows (`--rows`), all class-conditional sampling of `--num_inference_steps` steps with classifier-free guidance, VQ decode excluded:

* `enat`: `ENATPipeline(..., output_type="latent")`: visible tokens encoded without mask tokens, features reused.
* `no_reuse`: the same pipeline and network, but every step re-encodes all visible tokens (no reuse state is given).
* `plain_nat`: the same network as a plain NAT: every token, mask tokens included, through all encoder and decoder
  blocks with plain self-attention, at every step.
* `amused`: diffusers' `UVit2DModel` with the aMUSEd-256 transformer config (aMUSEd-512 for 32x32 grids), random
  weights, `--amused_steps` steps with `AmusedScheduler`, conditional and unconditional rows batched as
  `AmusedPipeline` does, random CLIP-sized text conditioning (77 x 768 hidden states, 768 pooled).
* `--editing` adds inpainting rows: `ENATInpaintPipeline(..., output_type="latent")` on random images (encoded by the
  VQ, whose FLOPs are not counted and whose time is) regenerating the last `--inpaint_fractions` of the tokens in
  raster order (a band at the bottom), `--samples_per_image` samples of each image (they share the kept tokens'
  first encoder pass), per `--kept_context_modes` (`fixed`, the default: the kept tokens' keys/values computed once
  per image and stream after the first step; `refreshed`: generation's rule, recomputed every step), and aMUSEd's
  inpainting path (`amused_inpaint`: the `amused` loop started from a partly masked grid with `starting_mask_ratio`,
  as `AmusedInpaintPipeline` runs it; it recomputes every token at every step, so its cost does not depend on the
  fraction: one row, at the largest fraction). Editing rows count per output image: at
  batch size B they edit B images, each with its samples; the json's `editing` section gives their FLOP and time
  ratios to generation (the `enat` row) and to `amused_inpaint`.
* `enat_compiled` (with `--compile`): the `enat` row with every transformer block compiled,
  `torch.compile(block, dynamic=True)` (what `transformer.compile_repeated_blocks(dynamic=True)` does in place). One
  compiled graph serves all the token counts of the steps; compiling the whole transformer instead recompiles at
  every step (the token counts become guards after the `.tolist()` sync) and exceeds dynamo's recompile limit.

Columns: forward GFLOPs per image of the transformer only (`torch.utils.flop_counter.FlopCounterMode` around every
transformer call: matmuls, convolutions and attention, both guidance streams, all steps; torch counts a
multiply-add as 2 FLOPs), seconds per image and images per second (median of `--repeats` runs, rows alternated),
peak memory of the sampling loop above the model weights (CUDA: `torch.cuda.max_memory_allocated`; CPU, where torch
keeps no allocator statistics: the peak total size of tensors created during the loop, tracked op by op), and
whether every logit and sampled id was finite/valid. The json also records the reuse-state shapes seen at every step
(one `(B, L, D)` features and `(B, L)` mask per guidance stream: it does not grow) and, per row, the attention part of
the FLOPs. Ratios to the `enat` row (FLOPs and time) are computed within the run.
`--config` also takes a json file of `ENATTransformer2DModel` arguments (optionally `"preset"`, and `"amused"`:
`UVit2DModel` arguments) for small test configurations.

`--precisions fp32 bf16 int8 ...` adds end-to-end rows (tokens to PIL images, VQ decode included) per precision, int8
through `quantize_for_cpu` (PyTorch's x86 engine; `torchao_int8*`: diffusers' `TorchAoConfig`, the `quant` extra),
`auto` this machine's `choose_precision` set up as `set_precision` does it (the VQ decoder channels-last on a CPU, and
int8 where `auto` is int8; the `int8` row keeps a float decoder, so the two rows separate the decoder's part): seconds per image, the decode's share, the fraction of
sampled tokens identical to the first precision's (same seeds); `--breakdown` adds where the time of one profiled
run goes (matmuls, attention, token grouping and other transformer ops, scheduler, guidance and pipeline, decode) and
`--matmul_rates` this machine's `nn.Linear` rate at the model's shapes in each precision, measured in the same run,
with the fraction that sampling reaches. `--busy_cores N` keeps N cores busy while measuring (a shared machine); the
json records the load average before and after and the OpenMP settings (docs: speed and memory, `OMP_WAIT_POLICY`).
Freed CPU memory is kept for reuse as in the scripts (`enable_cpu_memory_reuse`; `--cpu_memory_reuse off`: glibc's
own behaviour); `--cpu_memory_reuse both` runs every `--precisions` row without and with it (`<precision>+memory_reuse`),
alternated, the setting switched before each run.

`--reference_dir` also times the reference sampler (`NATSchedule.generate` with the reference `DiT`) against our
pipeline at batch 1, alternating runs, with identical random weights (converted by our conversion code), and checks
that both give the same logits on a teacher-forced reuse step. On a machine shared with other jobs, `--threads 1`
gives the steadiest timings; the json keeps every run, and the reference section also the ratio of the fastest runs.
"""

import argparse
import copy
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import torch
from diffusers import AmusedScheduler, UVit2DModel
from diffusers.utils import logging as diffusers_logging
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from enat_diffusers import script_utils
from enat_diffusers.conversion import convert_enat_transformer_state_dict
from enat_diffusers.cpu_memory import cpu_memory_reuse_enabled, disable_cpu_memory_reuse, enable_cpu_memory_reuse
from enat_diffusers.models.transformer_enat import (
    ENAT_PRESETS,
    ENATConditioning,
    ENATTransformer2DModel,
    ENATTransformer2DModelOutput,
)
from enat_diffusers.models.vq_maskgit import MaskGITVQModel
from enat_diffusers.pipelines.pipeline_enat import ENATPipeline
from enat_diffusers.pipelines.pipeline_enat_editing import KEPT_CONTEXT_MODES
from enat_diffusers.pipelines.pipeline_enat_inpaint import ENATInpaintPipeline
from enat_diffusers.quantization import (
    AUTO,
    CPUFeatures,
    choose_precision,
    quantize_decoder_for_cpu,
    quantize_for_cpu,
    set_vqvae_precision,
)
from enat_diffusers.schedulers.scheduling_enat import ENATScheduler
from enat_diffusers.script_utils import DTYPES
from enat_diffusers.testing_utils import randomize_modulation

ROWS = ("enat", "no_reuse", "plain_nat", "amused")
ROW_TITLES = {
    "enat": "ENAT, feature reuse",
    "no_reuse": "ENAT, no reuse",
    "plain_nat": "plain NAT (same net)",
    "amused": "aMUSEd",
    "enat_compiled": "ENAT, reuse, compiled",
    "amused_inpaint": "aMUSEd inpainting",
}
EDITING_FRACTIONS = (0.125, 0.25, 0.5)
EDITING_SAMPLES = (1, 4)
# --config name -> (preset, token grid side)
CONFIGS = {"ENAT-S": ("ENAT-S", 16), "ENAT-B": ("ENAT-B", 16), "ENAT-L": ("ENAT-L", 16), "ENAT-L-512": ("ENAT-L", 32)}
# diffusers' UVit2DModel defaults are the aMUSEd transformer; the 256 px model runs on 16x16 tokens without
# down/upsampling, the 512 px model on 32x32 tokens with them (scripts/convert_amused.py in diffusers).
AMUSED_CONFIGS = {16: {"sample_size": 16}, 32: {"sample_size": 32, "downsample": True, "upsample": True}}
AMUSED_TEXT_LENGTH = 77
AMUSED_MICRO_CONDS = (256.0, 256.0, 0.0, 0.0, 6.0)  # width, height, crop top-left, aesthetic score
REFERENCE_SAMPLING = {"mask_temp": 1.5, "samp_temp": 6.0}
MIB = 2**20
# --cpu_memory_reuse; with "both", the --precisions rows with reuse are named "<precision>+memory_reuse".
MEMORY_REUSE_MODES = ("on", "off", "both")
MEMORY_REUSE_SUFFIX = "+memory_reuse"
# Environment variables that decide how torch's CPU threads wait and how many there are (recorded in the json).
THREADING_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")

NOTES = {
    "gflops": "forward FLOPs of the transformer only, per image: FlopCounterMode around every transformer call "
    "(matmul, convolution, attention; a multiply-add counts 2), both guidance streams, all steps; VQ decode excluded. "
    "torch's counter has no formula for the CPU attention kernel; the benchmark adds one, so CPU and CUDA agree "
    "(attention_gflops_per_image in the json: the part that a plain FlopCounterMode misses on CPU)",
    "seconds": "wall time of the whole sampling loop (transformer, guidance, scheduler; VQ decode excluded), median "
    "of the repeats, rows alternated",
    "memory_cpu": "peak total size of the tensors created during the sampling loop (model weights excluded), tracked "
    "op by op with a TorchDispatchMode; torch keeps no CPU allocator statistics",
    "editing": "inpainting rows: ENATInpaintPipeline on random images, the last fraction of the tokens (raster "
    "order) regenerated, per output image (batch size B: B images, each with its samples); their time and memory "
    "include the VQ encode of the input, their FLOPs only the transformer. amused_inpaint: aMUSEd's loop from a "
    "partly masked grid (starting_mask_ratio), every token recomputed at every step",
    "memory_cuda": "torch.cuda.max_memory_allocated during the sampling loop minus the memory allocated before it",
}


# ----------------------------------------------------------------------------------------------------------------------
# command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config", help=f"one of {sorted(CONFIGS)} (default ENAT-L) or a json file of model arguments"
    )
    source.add_argument(
        "--model", help="an ENATPipeline folder or Hub id (class-conditional) instead of random weights"
    )
    parser.add_argument(
        "--rows", nargs="*", choices=ROWS, default=list(ROWS), help="rows to run (default: all; none: `--rows`)"
    )
    parser.add_argument("--batch_sizes", nargs="+", type=positive_int, help="default: 1 8 on CPU, 1 64 on CUDA")
    parser.add_argument("--num_inference_steps", type=positive_int, default=8, help="ENAT sampling steps")
    script_utils.add_deprecated_flag(parser, "--steps", "--num_inference_steps", removed_in="0.3.0")
    parser.add_argument("--amused_steps", type=positive_int, default=12, help="aMUSEd sampling steps")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="classifier-free guidance scale with diffusers' meaning (1 disables guidance: one stream; the paper's cfg is s - 1)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--compile", action="store_true", help="add the enat row with compiled blocks")
    parser.add_argument(
        "--editing",
        action="store_true",
        help="add inpainting rows (ENATInpaintPipeline) and aMUSEd's inpainting path, compared with generation",
    )
    parser.add_argument(
        "--inpaint_fractions",
        nargs="+",
        type=fraction,
        default=list(EDITING_FRACTIONS),
        help="with --editing: fractions of the tokens to regenerate (a band at the bottom)",
    )
    parser.add_argument(
        "--samples_per_image",
        nargs="+",
        type=positive_int,
        default=list(EDITING_SAMPLES),
        help="with --editing: samples per edited image (num_images_per_prompt)",
    )
    parser.add_argument(
        "--kept_context_modes",
        nargs="+",
        choices=KEPT_CONTEXT_MODES,
        default=["fixed"],
        help="with --editing: how the inpainting rows see the kept tokens (the pipelines' kept_context_mode)",
    )
    parser.add_argument(
        "--flops_only", action="store_true", help="count FLOPs and memory in one run per row; no timed runs"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per row and batch size")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row and batch size")
    parser.add_argument("--vq_decode", action="store_true", help="also measure the VQ decoder, separately")
    parser.add_argument("--reference_dir", help="checkout of LeapLabTHU/ENAT: time its sampler beside ours")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=[AUTO, *PRECISIONS],
        help="end to end (tokens to PIL, VQ decode included) in each precision, e.g. fp32 int8 auto; int8 is "
        "quantize_for_cpu (PyTorch's x86 engine, CPU), torchao_int8* load the transformer with diffusers' "
        "TorchAoConfig (the `quant` extra), auto is this machine's choose_precision set up as set_precision does (VQ "
        "decoder in the device's fastest memory format, int8 when auto is int8); the first one is the baseline",
    )
    parser.add_argument(
        "--vq_channels_last",
        action="store_true",
        help="with --precisions: the VQ decoder in channels-last memory format in every row (the auto row and the "
        "reference comparison's fastest path always take the device's format, decoder_memory_format)",
    )
    parser.add_argument(
        "--decode_variants",
        nargs="+",
        choices=sorted(DECODE_VARIANTS),
        default=["fp32", "fp32_channels_last"],
        help="with --vq_decode: the decoder's variants, timed alternately, with their pixel error vs the first",
    )
    parser.add_argument(
        "--vq_dtype",
        choices=sorted(DTYPES),
        help="with --precisions: dtype of the VQ decode in every row (default: the row's own dtype); fp32 keeps the "
        "decode fast on CPUs without native bf16 convolutions",
    )
    parser.add_argument("--breakdown", action="store_true", help="with --precisions: where the time goes, per image")
    parser.add_argument(
        "--matmul_rates",
        action="store_true",
        help="with --precisions: this machine's matmul rate at the model's shapes, and the fraction sampling reaches",
    )
    parser.add_argument(
        "--busy_cores",
        type=non_negative_int,
        default=0,
        help="keep this many cores busy (Python busy loops in other processes) while measuring: a shared machine",
    )
    parser.add_argument(
        "--reference_end_to_end",
        action="store_true",
        help="with --reference_dir: compare tokens to images, each side with its own VQ decoder (random weights)",
    )
    parser.add_argument(
        "--cpu_memory_reuse",
        choices=MEMORY_REUSE_MODES,
        default="on",
        help="on: freed CPU memory kept for the next tensors (enable_cpu_memory_reuse, as the scripts and the app run); "
        "off: glibc's own behaviour; both: every --precisions row twice, without and with it, alternated",
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this json file")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build / machine")
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 1:
        parser.error(f"--guidance_scale must be a finite number >= 1 (1 = no guidance), got {args.guidance_scale}")
    if (args.breakdown or args.matmul_rates or args.vq_dtype) and not args.precisions:
        parser.error(
            "--breakdown, --matmul_rates and --vq_dtype apply to the --precisions rows: give --precisions too"
        )
    args.auto_choice = choose_precision(args.device)
    if args.precisions:
        # `auto` is its own row: this machine's choice set up as `set_precision(pipe, "auto")` does it (decoder
        # memory format included); a precision named twice is measured once.
        args.precisions = list(dict.fromkeys(args.precisions))
        if args.device != "cpu" and any(
            PRECISIONS[precision_kind(name, args)][1] == X86_INT8 for name in args.precisions
        ):
            parser.error("--precisions int8 (PyTorch's x86 engine) runs on the CPU only: use --device cpu")
    if args.vq_decode and args.device != "cpu" and any(DECODE_VARIANTS[name].int8 for name in args.decode_variants):
        parser.error("--decode_variants int8 (PyTorch's x86 engine) runs on the CPU only: use --device cpu")
    if args.cpu_memory_reuse == "both" and not args.precisions:
        parser.error("--cpu_memory_reuse both doubles the --precisions rows: give --precisions too")
    if args.reference_end_to_end and args.reference_dir is None:
        parser.error("--reference_end_to_end needs --reference_dir")
    if args.busy_cores >= (os.cpu_count() or 1):
        parser.error(f"--busy_cores must leave a core for the measurement: this machine has {os.cpu_count()}")
    if args.compile and "enat" not in args.rows:
        parser.error("--compile compares the `enat` row with its compiled twin: keep `enat` in --rows")
    if args.editing and "enat" not in args.rows:
        parser.error("--editing compares inpainting with generation: keep `enat` in --rows")
    if args.batch_sizes is None:
        args.batch_sizes = [1, 64] if args.device == "cuda" else [1, 8]
    if args.model is None and args.config is None:
        args.config = "ENAT-L"
    if args.config is not None and args.config not in CONFIGS and not args.config.endswith(".json"):
        parser.error(f"--config must be one of {sorted(CONFIGS)} or a path to a .json file, got {args.config!r}")
    if args.reference_dir is not None and not (Path(args.reference_dir) / "libs" / "models.py").is_file():
        parser.error(
            f"--reference_dir must be a checkout of LeapLabTHU/ENAT (no libs/models.py in {args.reference_dir})"
        )
    return args


# ----------------------------------------------------------------------------------------------------------------------
# models


@dataclass
class Setup:
    """What the rows run on: the ENAT pipeline parts and the aMUSEd transformer config."""

    name: str
    transformer: ENATTransformer2DModel
    scheduler: ENATScheduler
    vqvae: MaskGITVQModel | None
    amused_config: dict
    random_weights: bool


def read_json_config(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--config {path}: cannot read a json object ({error})") from error
    if not isinstance(config, dict):
        raise SystemExit(f"--config {path}: expected a json object of ENATTransformer2DModel arguments")
    return config


def build_transformer_from_config(config_arg: str) -> tuple[ENATTransformer2DModel, dict, dict]:
    """Random-weight transformer of a named configuration or a json file; returns it, the aMUSEd overrides and the
    `MaskGITVQModel` arguments (json key `"vqvae"`; default: the released tokenizer's architecture)."""
    if config_arg in CONFIGS:
        preset, side = CONFIGS[config_arg]
        return ENATTransformer2DModel.from_preset(preset, sample_size=side), {}, {}
    config = read_json_config(config_arg)
    amused = config.pop("amused", {})
    vqvae = config.pop("vqvae", {})
    preset = config.pop("preset", None)
    if preset is not None and preset not in ENAT_PRESETS:
        raise SystemExit(f"--config {config_arg}: unknown preset {preset!r}; available: {sorted(ENAT_PRESETS)}")
    try:
        base = ENAT_PRESETS[preset] if preset else {}
        return ENATTransformer2DModel(**{**base, **config}), amused, vqvae
    except (TypeError, ValueError) as error:
        raise SystemExit(f"--config {config_arg}: invalid ENATTransformer2DModel arguments ({error})") from error


def load_setup(args: argparse.Namespace) -> Setup:
    if args.model is not None:
        try:
            pipe = ENATPipeline.from_pretrained(args.model)
        except (OSError, ValueError, TypeError) as error:
            raise SystemExit(f"--model {args.model}: cannot load an ENATPipeline ({error})") from error
        transformer, amused_overrides, random_weights, name = pipe.transformer, {}, False, args.model
        vqvae_config = None
        scheduler, vqvae = pipe.scheduler, pipe.vqvae
    else:
        torch.manual_seed(args.seed)
        transformer, amused_overrides, vqvae_config = build_transformer_from_config(args.config)
        random_weights, name = True, args.config
        scheduler = ENATScheduler(mask_token_id=transformer.config.codebook_size)
        vqvae = None
    if not transformer.is_class_conditional:
        raise SystemExit(f"{name}: the benchmark runs class-conditional ENAT models; this one is text-conditioned")
    if random_weights:
        randomize_modulation(transformer)
    side = transformer.config.sample_size
    if (args.vq_decode or args.precisions or args.editing) and vqvae is None:
        vqvae = MaskGITVQModel(
            **{"num_vq_embeddings": transformer.config.codebook_size, "sample_size": 16 * side, **vqvae_config}
        )
    amused_config = {**AMUSED_CONFIGS.get(side, {"sample_size": side}), **amused_overrides}
    return Setup(name, transformer, scheduler, vqvae, amused_config, random_weights)


def to_device(module: nn.Module | None, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    """Inference copy on `device`/`dtype`. Weights stop requiring grad: under `no_grad`, slices of a weight still
    report `requires_grad`, which trips the module tracking of `FlopCounterMode`."""
    if module is None:
        return None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# measuring


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's flop counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches to.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def attention_flops(counter: FlopCounterMode) -> int:
    return sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "attention" in str(op))


class Probe:
    """While `active`, counts the forward FLOPs of each transformer call and checks its outputs."""

    def __init__(self):
        self.start(active=False)

    def start(self, active: bool = True) -> None:
        self.active = active
        self.flops = 0
        self.attention_flops = 0
        self.calls = 0
        self.finite = True
        self.state_shapes = set()

    def count(self, run: Callable[[], object]) -> object:
        """Runs `run`, adding its FLOPs while active."""
        if not self.active:
            return run()
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            output = run()
        self.flops += counter.get_total_flops()
        self.attention_flops += attention_flops(counter)
        return output

    def call(self, run: Callable[[], object]) -> object:
        """A transformer call: counted, and its logits and reuse state checked."""
        if not self.active:
            return run()
        output = self.count(run)
        self.calls += 1
        logits = output if isinstance(output, torch.Tensor) else output.logits
        self.finite = self.finite and bool(torch.isfinite(logits).all())
        state = getattr(output, "reuse_state", None)
        if state is not None:
            self.state_shapes.add((tuple(state.features.shape), tuple(state.masking.shape)))
        return output


class PeakTensorMemory(TorchDispatchMode):
    """Peak total bytes of the tensor storages created while active; storages in `excluded` (weights) are ignored."""

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded
        self.live = {}  # storage address -> [bytes, live tensors using it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for value in tree_flatten(output)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return output

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address == 0 or address in self.excluded:
            return
        entry = self.live.get(address)
        if entry is None:
            entry = self.live[address] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]


def weight_addresses(modules: list[nn.Module]) -> set[int]:
    tensors = [t for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]]
    return {t.untyped_storage().data_ptr() for t in tensors}


def peak_memory(run: Callable[[], object], device: torch.device, excluded: set[int]) -> tuple[object, int]:
    """Runs `run()`; returns its result and the peak bytes it allocated (see NOTES)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    with PeakTensorMemory(excluded) as tracker:
        result = run()
    return result, tracker.peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# rows


def plain_nat_logits(
    transformer: ENATTransformer2DModel, input_ids: torch.LongTensor, conditioning: ENATConditioning
) -> torch.Tensor:
    """The ENAT network run as a plain NAT: all tokens through every block with self-attention only."""
    ids = input_ids.reshape(input_ids.shape[0], -1)
    hidden_states = transformer.embed(ids)
    for index, block in enumerate(transformer.blocks):
        hidden_states = block(hidden_states, conditioning.modulation[:, index])
    codebook = transformer.embed.word_embedding.weight[: transformer.config.codebook_size]
    logits = transformer.head(hidden_states, codebook)
    side = transformer.config.sample_size
    return logits.transpose(1, 2).reshape(ids.shape[0], -1, side, side)


class BenchmarkTransformer(nn.Module):
    """
    Stands in for `pipe.transformer`: the ENAT transformer with reuse (`"enat"`), without (`"no_reuse"`), or as a
    plain NAT (`"plain_nat"`), optionally with other (compiled) blocks swapped in; its `probe` watches the calls.
    """

    def __init__(self, transformer: ENATTransformer2DModel, mode: str, blocks: tuple[nn.ModuleList, ...] = ()):
        super().__init__()
        self.transformer = transformer
        self.mode = mode
        self.swapped_blocks = blocks
        self.probe = Probe()

    @property
    def config(self):
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def is_class_conditional(self) -> bool:
        return self.transformer.is_class_conditional

    @property
    def null_class_label(self) -> int:
        return self.transformer.null_class_label

    def forward(self, input_ids, class_labels=None, reuse_state=None, **kwargs):
        if self.mode == "plain_nat" and kwargs.get("conditioning") is None:
            # The plain NAT needs the condition in block form before its first step. ENAT's own first call returns it
            # (`output.conditioning`) and, with every token masked, runs only the decoder blocks: outside the probe,
            # so its FLOPs are not counted; its time (about one plain step's decoder share) is.
            kwargs["conditioning"] = self.transformer(input_ids, class_labels=class_labels).conditioning
        if not self.swapped_blocks:
            return self.probe.call(lambda: self._forward(input_ids, class_labels, reuse_state, **kwargs))
        original = (self.transformer.encoder_blocks, self.transformer.decoder_blocks)
        self.transformer.encoder_blocks, self.transformer.decoder_blocks = self.swapped_blocks
        try:
            return self.probe.call(lambda: self._forward(input_ids, class_labels, reuse_state, **kwargs))
        finally:
            self.transformer.encoder_blocks, self.transformer.decoder_blocks = original

    def prepare_kept_context(self, *args, **kwargs):
        """Counted with the calls: the kept tokens' keys/values (once per editing run) are transformer work."""
        return self.probe.count(lambda: self.transformer.prepare_kept_context(*args, **kwargs))

    def _forward(self, input_ids, class_labels, reuse_state, **kwargs):
        if self.mode == "plain_nat":
            conditioning = kwargs["conditioning"]
            return ENATTransformer2DModelOutput(
                logits=plain_nat_logits(self.transformer, input_ids, conditioning), conditioning=conditioning
            )
        if self.mode == "no_reuse":
            reuse_state = None
        return self.transformer(input_ids, class_labels=class_labels, reuse_state=reuse_state, **kwargs)


def compiled_blocks(transformer: ENATTransformer2DModel) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Compiled twins of the blocks (weights shared); dynamic shapes cover the token counts of all steps."""
    return tuple(
        nn.ModuleList([torch.compile(block, dynamic=True) for block in blocks])
        for blocks in (transformer.encoder_blocks, transformer.decoder_blocks)
    )


@dataclass
class Row:
    name: str
    sample: Callable[[int], torch.Tensor]  # batch size -> sampled token ids
    probe: Probe
    codebook_size: int
    twin_of: str | None = None  # compiled rows share the FLOP count of their eager twin
    model: nn.Module | None = None  # a model of its own (aMUSEd), besides the shared ENAT transformer
    samples_per_image: int = 1  # editing rows: output images per edited image (per batch item)
    inpaint_fraction: float | None = None  # editing rows: the fraction of the tokens regenerated
    kept_context_mode: str | None = None  # editing rows: the pipelines' kept_context_mode

    @property
    def title(self) -> str:
        if self.name in ROW_TITLES:
            return ROW_TITLES[self.name]
        return f"ENAT inpainting {self.inpaint_fraction:.1%}, {self.samples_per_image}/img, {self.kept_context_mode}"


def enat_row(name: str, setup: Setup, mode: str, args, device, blocks=()) -> Row:
    wrapper = BenchmarkTransformer(setup.transformer, mode, blocks)
    pipe = ENATPipeline(transformer=wrapper, vqvae=setup.vqvae, scheduler=setup.scheduler)
    pipe.set_progress_bar_config(disable=True)
    num_classes = setup.transformer.config.num_classes

    def sample(batch_size: int) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(args.seed)
        labels = [index % num_classes for index in range(batch_size)]
        output = pipe(
            class_labels=labels,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            output_type="latent",
            generator=generator,
        )
        return output.images

    twin = "enat" if blocks else None
    return Row(name, sample, wrapper.probe, setup.transformer.config.codebook_size, twin_of=twin)


def editing_mask(side: int, fraction: float) -> torch.BoolTensor:
    """`(side, side)` token mask: the last `fraction` of the tokens in raster order (a band at the bottom)."""
    count = round(fraction * side * side)
    if count < 1:
        raise SystemExit(f"--inpaint_fractions {fraction}: masks no token of a {side}x{side} grid; give a larger one")
    mask = torch.zeros(side * side, dtype=torch.bool)
    mask[-count:] = True
    return mask.reshape(side, side)


def inpaint_row(
    setup: Setup, fraction: float, samples: int, kept_context_mode: str, args, device: torch.device, dtype
) -> Row:
    """`ENATInpaintPipeline` with the benchmark's probe: `samples` samples of each of `batch_size` random images."""
    wrapper = BenchmarkTransformer(setup.transformer, "enat")
    pipe = ENATInpaintPipeline(transformer=wrapper, vqvae=setup.vqvae, scheduler=setup.scheduler)
    pipe.set_progress_bar_config(disable=True)
    config = setup.transformer.config
    factor = setup.vqvae.downsample_factor
    token_mask = editing_mask(config.sample_size, fraction)
    mask = token_mask.repeat_interleave(factor, 0).repeat_interleave(factor, 1)[None].to(device, dtype)

    def sample(batch_size: int) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(args.seed)
        size = pipe.image_size
        images = torch.rand(batch_size, 3, size, size, generator=generator, device=device, dtype=dtype)
        output = pipe(
            image=images,
            mask_image=mask,
            class_labels=[index % config.num_classes for index in range(batch_size)],
            num_images_per_prompt=samples,
            kept_context_mode=kept_context_mode,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            output_type="latent",
            generator=generator,
        )
        return output.images

    name = f"inpaint_{fraction:g}_x{samples}" + ("" if kept_context_mode == "fixed" else f"_{kept_context_mode}")
    return Row(
        name,
        sample,
        wrapper.probe,
        config.codebook_size,
        samples_per_image=samples,
        inpaint_fraction=fraction,
        kept_context_mode=kept_context_mode,
    )


def amused_row(
    setup: Setup, args, device: torch.device, dtype: torch.dtype, inpaint_fraction: float | None = None
) -> Row:
    """aMUSEd's sampling loop; with `inpaint_fraction`, its inpainting path: the grid starts as random tokens with
    that band masked and the scheduler reveals from `starting_mask_ratio`, as `AmusedInpaintPipeline` does."""
    torch.manual_seed(args.seed)
    model = to_device(UVit2DModel(**setup.amused_config), device, dtype)
    scheduler = AmusedScheduler(mask_token_id=model.config.vocab_size - 1)
    probe = Probe()
    guided = args.guidance_scale > 1

    def sample(batch_size: int) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(args.seed)
        streams = 2 * batch_size if guided else batch_size
        config = model.config
        text = torch.randn(streams, AMUSED_TEXT_LENGTH, config.encoder_hidden_size, device=device, dtype=dtype)
        pooled = torch.randn(streams, config.cond_embed_dim, device=device, dtype=dtype)
        micro_conds = torch.tensor([AMUSED_MICRO_CONDS], device=device, dtype=dtype).expand(streams, -1)
        side = config.sample_size
        latents = torch.full((batch_size, side, side), scheduler.config.mask_token_id, device=device)
        step_options = {}
        if inpaint_fraction is not None:
            kept = torch.randint(0, config.codebook_size, latents.shape, generator=generator, device=device)
            region = editing_mask(side, inpaint_fraction).to(device)
            latents = torch.where(region, latents, kept)
            step_options["starting_mask_ratio"] = region.float().mean().item()
        scheduler.set_timesteps(args.amused_steps, device=device)
        for timestep in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            logits = probe.call(lambda: model(model_input, text, pooled, micro_conds))  # noqa: B023 (called now)
            if guided:
                unconditional, conditional = logits.chunk(2)
                logits = unconditional + args.guidance_scale * (conditional - unconditional)
            latents = scheduler.step(logits.float(), timestep, latents, generator=generator, **step_options)
            latents = latents.prev_sample
        return latents

    name = "amused" if inpaint_fraction is None else "amused_inpaint"
    return Row(name, sample, probe, model.config.codebook_size, model=model, inpaint_fraction=inpaint_fraction)


def build_rows(setup: Setup, args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    rows = []
    for name in args.rows:
        if name == "amused":
            rows.append(amused_row(setup, args, device, dtype))
        else:
            rows.append(enat_row(name, setup, name, args, device))
        if name == "enat" and args.compile:
            rows.append(enat_row("enat_compiled", setup, "enat", args, device, compiled_blocks(setup.transformer)))
    if args.editing:
        for fraction in args.inpaint_fractions:
            rows.extend(
                inpaint_row(setup, fraction, samples, mode, args, device, dtype)
                for mode in args.kept_context_modes
                for samples in args.samples_per_image
            )
        rows.append(amused_row(setup, args, device, dtype, inpaint_fraction=max(args.inpaint_fractions)))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# running


def analyse(row: Row, batch_size: int, device: torch.device, excluded: set[int]) -> dict:
    """One sampling run with FLOP counting, memory tracking and output checks (also warms the row up)."""
    row.probe.start()
    try:
        ids, peak = peak_memory(lambda: row.sample(batch_size), device, excluded)
    finally:
        row.probe.active = False
    ids_valid = bool(((ids >= 0) & (ids < row.codebook_size)).all())
    images = batch_size * row.samples_per_image
    result = {
        "gflops_per_image": row.probe.flops / images / 1e9,
        "attention_gflops_per_image": row.probe.attention_flops / images / 1e9,
        "transformer_calls": row.probe.calls,
        "peak_memory_mib": peak / MIB,
        "peak_memory_mib_per_image": peak / MIB / images,
        "finite": row.probe.finite and ids_valid and ids.shape[0] == images,
    }
    if row.inpaint_fraction is not None:
        result["inpaint_fraction"] = row.inpaint_fraction
        result["samples_per_image"] = row.samples_per_image
        if row.kept_context_mode is not None:
            result["kept_context_mode"] = row.kept_context_mode
    if row.probe.state_shapes:
        result["reuse_state_shapes"] = sorted(
            [list(features), list(masking)] for features, masking in row.probe.state_shapes
        )
        result["reuse_state_constant"] = len(row.probe.state_shapes) == 1
    return result


def first_compiled_run(row: Row, batch_size: int, device: torch.device) -> dict:
    return {"first_call_seconds": timed(lambda: row.sample(batch_size), device)}


def measure_batch(rows: list[Row], batch_size: int, args, device: torch.device, excluded: set[int]) -> list[dict]:
    stats = {}
    for row in rows:
        if row.twin_of is None:
            stats[row.name] = analyse(row, batch_size, device, excluded)
        else:
            stats[row.name] = first_compiled_run(row, batch_size, device)
        print(f"  batch {batch_size}: {row.name} checked", file=sys.stderr, flush=True)
    for row in rows:
        if row.twin_of is not None and row.twin_of in stats:
            twin = stats[row.twin_of]
            shared = ("gflops_per_image", "attention_gflops_per_image", "transformer_calls", "finite")
            stats[row.name].update({key: twin[key] for key in shared})
    times = {row.name: [] for row in rows}
    if args.flops_only:
        return [summarise(row, batch_size, stats[row.name], []) for row in rows]
    for _ in range(args.warmup):
        for row in rows:
            row.sample(batch_size)
    for repeat in range(args.repeats):
        for row in rows:  # alternate rows so that load changes hit them alike
            times[row.name].append(timed(lambda: row.sample(batch_size), device))  # noqa: B023
        print(f"  batch {batch_size}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    return [summarise(row, batch_size, stats[row.name], times[row.name]) for row in rows]


def summarise(row: Row, batch_size: int, stats: dict, times: list[float]) -> dict:
    """One table row; per output image (`samples_per_image` of them per batch item); no times: timing skipped."""
    images = batch_size * row.samples_per_image
    median = statistics.median(times) if times else None
    return {
        "row": row.name,
        "title": row.title,
        "batch_size": batch_size,
        **stats,
        "seconds_per_image": median / images if times else None,
        "seconds_per_image_min": min(times) / images if times else None,
        "images_per_second": images / median if times else None,
        "times_seconds": times,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def ratios(results: list[dict]) -> dict:
    """Per batch size: FLOPs and time of each row relative to the `enat` row."""
    output = {}
    for batch_size in sorted({r["batch_size"] for r in results}):
        rows = {r["row"]: r for r in results if r["batch_size"] == batch_size}
        if "enat" not in rows:
            continue
        base = rows["enat"]
        output[str(batch_size)] = {
            name: {
                "flops_vs_enat": row["gflops_per_image"] / base["gflops_per_image"],
                "time_vs_enat": ratio(row["seconds_per_image"], base["seconds_per_image"]),
            }
            for name, row in rows.items()
            if name != "enat"
        }
    return output


def editing_ratios(results: list[dict]) -> dict:
    """Per batch size: FLOPs, time and memory per image of each inpainting row relative to generation (`enat`) and
    to aMUSEd's inpainting path."""
    output = {}
    for batch_size in sorted({r["batch_size"] for r in results}):
        rows = {r["row"]: r for r in results if r["batch_size"] == batch_size}
        bases = {name: rows[name] for name in ("enat", "amused_inpaint") if name in rows}
        table = {}
        for name, row in rows.items():
            if "samples_per_image" not in row or name == "amused_inpaint":
                continue
            table[name] = {}
            for base_name, base in bases.items():
                label = "generation" if base_name == "enat" else base_name
                table[name][f"flops_vs_{label}"] = ratio(row["gflops_per_image"], base["gflops_per_image"])
                table[name][f"time_vs_{label}"] = ratio(row["seconds_per_image"], base["seconds_per_image"])
                table[name][f"memory_vs_{label}"] = ratio(
                    row["peak_memory_mib_per_image"], base["peak_memory_mib_per_image"]
                )
        output[str(batch_size)] = table
    return output


def compile_gain(results: list[dict]) -> dict:
    gains = {}
    for batch_size in sorted({r["batch_size"] for r in results}):
        rows = {r["row"]: r for r in results if r["batch_size"] == batch_size}
        if "enat" in rows and "enat_compiled" in rows:
            gains[str(batch_size)] = {
                "eager_seconds_per_image": rows["enat"]["seconds_per_image"],
                "compiled_seconds_per_image": rows["enat_compiled"]["seconds_per_image"],
                "speedup": rows["enat"]["seconds_per_image"] / rows["enat_compiled"]["seconds_per_image"],
                "first_call_seconds": rows["enat_compiled"]["first_call_seconds"],
            }
    return gains


def measure_vq_decode(vqvae: MaskGITVQModel, side: int, args, device: torch.device) -> list[dict]:
    """The VQ decode (token ids to pixels) in each of `--decode_variants`, timed alternately per batch size, with
    the decoded pixels' error against the first variant (pixels in [0, 1]: max |diff| and PSNR)."""
    variants = {}
    for name in args.decode_variants:
        variant = DECODE_VARIANTS[name]
        model = to_device(copy.deepcopy(vqvae), device, variant.dtype).to(memory_format=variant.memory_format)
        variants[name] = quantize_decoder_for_cpu(model) if variant.int8 else model
    first = args.decode_variants[0]
    results = []
    for batch_size in args.batch_sizes:
        ids = torch.randint(0, vqvae.config.num_vq_embeddings, (batch_size, side, side), device=device)
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            pixels = {name: (model.decode(ids).sample.float() + 1) / 2 for name, model in variants.items()}
        times = {name: [] for name in variants}
        loads = []
        for _ in range(args.repeats):
            loads.append(machine_load())
            for name, model in variants.items():
                times[name].append(timed(lambda: model.decode(ids), device))  # noqa: B023
        for name in variants:
            median = statistics.median(times[name])
            error = (pixels[name] - pixels[first]).abs()
            mse = error.square().mean().item()
            results.append(
                {
                    "variant": name,
                    "batch_size": batch_size,
                    "gflops_per_image": counter.get_total_flops() / len(variants) / batch_size / 1e9,
                    "seconds_per_image": median / batch_size,
                    "speedup_vs_" + first: statistics.median(times[first]) / median,
                    "max_abs_pixel_error_vs_" + first: error.max().item(),
                    "psnr_db_vs_" + first: math.inf if mse == 0 else 10 * math.log10(1 / mse),
                    "times_seconds": times[name],
                    "load": loads,
                }
            )
    return results


# ----------------------------------------------------------------------------------------------------------------------
# precisions, end to end: dtypes and int8 quantization, tokens to PIL images


# --precisions name -> (dtype of the weights that are not quantized and of the computation, quantization: X86_INT8
# for `quantize_for_cpu` (what `--precision int8` of the scripts runs), else a torchao config class name).
# diffusers' torchao quantization computes in bfloat16 (it warns for other dtypes), hence bf16 for the torchao rows.
X86_INT8 = "x86"
PRECISIONS = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "int8": (torch.float32, X86_INT8),
    "torchao_int8": (torch.bfloat16, "Int8DynamicActivationInt8WeightConfig"),
    "torchao_int8_weight_only": (torch.bfloat16, "Int8WeightOnlyConfig"),
}


# --vq_decode variants: dtype, memory format, and whether the convolutions are int8 (`quantize_decoder_for_cpu`: static
# int8 through PyTorch's x86 engine, calibrated on random token grids; CPU only).
class DecodeVariant(NamedTuple):
    dtype: torch.dtype
    memory_format: torch.memory_format
    int8: bool = False


DECODE_VARIANTS = {
    "fp32": DecodeVariant(torch.float32, torch.contiguous_format),
    "fp32_channels_last": DecodeVariant(torch.float32, torch.channels_last),
    "bf16": DecodeVariant(torch.bfloat16, torch.contiguous_format),
    "bf16_channels_last": DecodeVariant(torch.bfloat16, torch.channels_last),
    "int8": DecodeVariant(torch.float32, torch.channels_last, int8=True),
}
# Profiler op names (prefix match) of each part of the breakdown; ops of the VQ decode, the scheduler step and the
# pipeline code around the transformer (guidance) are attributed by where they run, not by their name.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::_weight_int8pack_mm")
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")
TOKEN_GROUPING_OPS = (
    "aten::gather", "aten::scatter", "aten::index", "aten::masked_select", "aten::masked_scatter", "aten::nonzero",
    "aten::take_along_dim", "aten::cat", "aten::sort", "aten::argsort", "aten::where",
)  # fmt: skip
PHASES = ("transformer", "scheduler", "decode")  # record_function labels; the rest of the pipeline is "guidance"


class BusyCores:
    """Keeps `count` cores busy with Python busy loops in other processes while active: another job on the machine."""

    def __init__(self, count: int):
        self.count = count
        self.processes = []

    # The loop also ends when its parent is gone (its parent id changes), so a benchmark killed from outside leaves
    # no busy core behind to skew the next measurement. The parent's id is passed in rather than read by the child,
    # which could start after the parent was already killed and then wait on its new parent forever.
    LOOP = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    pass"

    def __enter__(self):
        command = [sys.executable, "-c", self.LOOP, str(os.getpid())]
        self.processes = [subprocess.Popen(command) for _ in range(self.count)]
        return self

    def __exit__(self, *exc_info):
        for process in self.processes:
            process.kill()
            process.wait()
        self.processes = []


def machine_load() -> dict:
    """1/5/15-minute load averages and runnable/total tasks (Linux), recorded beside every measurement."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return {"load_average": [float(value) for value in fields[:3]], "runnable_tasks": fields[3]}
    except OSError:
        return {"load_average": list(os.getloadavg())}


def torchao_config(name: str):
    quantization = script_utils.require_optional("torchao.quantization", "quant", "int8 rows (--precisions)")
    return getattr(quantization, name)()


def precision_kind(name: str, args) -> str:
    """The `PRECISIONS` entry of a `--precisions` name (`auto`: this machine's `choose_precision`)."""
    return args.auto_choice.precision if name == AUTO else name


def precision_transformer(setup: Setup, precision: str, folder: Path | None, device: torch.device) -> nn.Module:
    """The transformer in `precision`; int8 rows are loaded the way diffusers users quantize (`quantization_config`)."""
    dtype, quant = PRECISIONS[precision]
    if quant is None:
        return to_device(copy.deepcopy(setup.transformer), device, dtype)
    if quant == X86_INT8:
        return quantize_for_cpu(to_device(copy.deepcopy(setup.transformer), torch.device("cpu"), torch.float32))
    from diffusers import TorchAoConfig

    quantized = ENATTransformer2DModel.from_pretrained(
        folder, quantization_config=TorchAoConfig(torchao_config(quant)), dtype=dtype
    )
    return quantized.to(device).eval().requires_grad_(False)  # a quantized model refuses a dtype cast


def labelled(name: str, method: Callable) -> Callable:
    """`method`, running inside a profiler range called `name` (free when no profiler is active)."""

    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return method(*args, **kwargs)

    return run


class LabelledTransformer(nn.Module):
    """Stands in for `pipe.transformer` in the end-to-end rows: the model, its calls labelled for the breakdown."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, *args, **kwargs):
        with torch.profiler.record_function("transformer"):
            return self.model(*args, **kwargs)


def op_category(name: str) -> str:
    if name.startswith(MATMUL_OPS) or "linear" in name and "quantized" in name:
        return "matmuls"
    if name.startswith(ATTENTION_OPS):
        return "attention"
    if name.startswith(TOKEN_GROUPING_OPS):
        return "token_grouping"
    return "other_transformer_ops"


def breakdown(run: Callable[[], object], batch_size: int) -> dict:
    """Seconds per image of one profiled end-to-end run, by part (see NOTES["breakdown"])."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    parts = dict.fromkeys(("matmuls", "attention", "token_grouping", "other_transformer_ops", *PHASES[1:]), 0.0)
    phase_totals = dict.fromkeys(PHASES, 0.0)
    for event in profiler.events():
        if event.name in PHASES:
            phase_totals[event.name] += event.cpu_time_total
            continue
        phase, parent = None, event.cpu_parent
        while parent is not None and phase is None:
            phase = parent.name if parent.name in PHASES else None
            parent = parent.cpu_parent
        if phase == "transformer":
            parts[op_category(event.name)] += event.self_cpu_time_total
    seconds = {name: value / 1e6 / batch_size for name, value in parts.items()}
    seconds["scheduler"] = phase_totals["scheduler"] / 1e6 / batch_size
    seconds["decode"] = phase_totals["decode"] / 1e6 / batch_size
    seconds["guidance_and_pipeline"] = max(0.0, total / batch_size - sum(phase_totals.values()) / 1e6 / batch_size)
    return {"seconds_per_image": seconds, "profiled_seconds_per_image": total / batch_size}


def matmul_shapes(config, batch_size: int, guided: bool) -> list[tuple[int, int, int]]:
    """(rows, in, out) of the transformer's token matmuls at a typical step: half of the grid's tokens per stream."""
    hidden, ratio = config.hidden_size, config.mlp_ratio
    rows = (2 if guided else 1) * batch_size * config.sample_size**2 // 2
    widths = [(hidden, hidden), (hidden, 2 * hidden), (hidden, hidden), (hidden, int(hidden * ratio))]
    return [(rows, fan_in, fan_out) for fan_in, fan_out in [*widths, (int(hidden * ratio), hidden)]]


def matmul_rate(precision: str, shapes: list[tuple[int, int, int]], device: torch.device, repeats: int) -> dict:
    """GFLOP/s (2 per multiply-add, float32-equivalent for int8) of `nn.Linear` at the model's shapes, as the rows
    run them (same dtype, same quantization)."""
    dtype, quant = PRECISIONS[precision]
    flops = seconds = 0.0
    per_shape = []
    for rows, fan_in, fan_out in shapes:
        layer = nn.Sequential(nn.Linear(fan_in, fan_out)).to(device=device, dtype=dtype).eval().requires_grad_(False)
        if quant == X86_INT8:
            quantize_for_cpu(layer)
        elif quant is not None:
            from torchao.quantization import quantize_

            quantize_(layer, torchao_config(quant))
        inputs = torch.randn(rows, fan_in, device=device, dtype=dtype)
        with torch.no_grad():
            layer(inputs)
            best = min(timed(lambda: layer(inputs), device) for _ in range(repeats))  # noqa: B023
        shape_flops = 2 * rows * fan_in * fan_out
        flops, seconds = flops + shape_flops, seconds + best
        per_shape.append({"shape": [rows, fan_in, fan_out], "gflops_per_second": shape_flops / best / 1e9})
    return {"gflops_per_second": flops / seconds / 1e9, "per_shape": per_shape}


def decode_to_pil(pipe: ENATPipeline, token_ids: torch.LongTensor) -> list:
    """The decode part of the pipeline's output: VQ decode and conversion to PIL images."""
    return pipe.image_processor.postprocess(pipe.vqvae.decode(token_ids).sample.float(), output_type="pil")


@dataclass
class PrecisionRow:
    name: str
    pipe: ENATPipeline
    # With --cpu_memory_reuse both: whether the row runs with freed memory kept (set before each of its runs).
    memory_reuse: bool | None = None

    @property
    def precision(self) -> str:
        """The `--precisions` name the row runs."""
        return self.name.removesuffix(MEMORY_REUSE_SUFFIX)

    def prepare(self) -> None:
        if self.memory_reuse is True:
            enable_cpu_memory_reuse()
        elif self.memory_reuse is False:
            disable_cpu_memory_reuse()


def precision_rows(setup: Setup, args, device: torch.device) -> list[PrecisionRow]:
    vqvae = setup.vqvae
    folder = None
    if any(PRECISIONS[precision_kind(name, args)][1] not in (None, X86_INT8) for name in args.precisions):
        folder = Path(tempfile.mkdtemp(prefix="enat-benchmark-"))
        setup.transformer.save_pretrained(folder)  # fp32 weights to load with a quantization_config
    rows = []
    try:
        for name in args.precisions:
            kind = precision_kind(name, args)
            dtype = PRECISIONS[kind][0]
            vq = to_device(copy.deepcopy(vqvae), device, DTYPES[args.vq_dtype] if args.vq_dtype else dtype)
            if name == AUTO:
                vq = set_vqvae_precision(vq, kind, device)
            elif args.vq_channels_last:
                vq.to(memory_format=torch.channels_last)
            vq.decode = labelled("decode", vq.decode)
            scheduler = copy.deepcopy(setup.scheduler)
            scheduler.step = labelled("scheduler", scheduler.step)
            transformer = LabelledTransformer(precision_transformer(setup, kind, folder, device))
            pipe = ENATPipeline(transformer=transformer, vqvae=vq, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            if args.cpu_memory_reuse == "both":
                rows += [PrecisionRow(name, pipe, False), PrecisionRow(name + MEMORY_REUSE_SUFFIX, pipe, True)]
            else:
                rows.append(PrecisionRow(name, pipe))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def teacher_forced_logits(transformer: nn.Module, config, seed: int, device: torch.device) -> torch.Tensor:
    """Logits of one forward pass on fixed inputs (2 rows, half of the tokens masked), as float32."""
    generator = torch.Generator().manual_seed(seed)
    count = config.sample_size**2
    ids = torch.randint(0, config.codebook_size, (2, count), generator=generator)
    ids[:, torch.randperm(count, generator=generator)[: count // 2]] = config.codebook_size  # the mask token
    labels = torch.arange(2) % config.num_classes
    return transformer(ids.to(device), class_labels=labels.to(device)).logits.float()


def measure_precisions(setup: Setup, args, device: torch.device) -> dict:
    """End to end (tokens to PIL images) in every precision of `--precisions`, rows alternated; VQ decode share,
    agreement with the first precision, breakdown and the matmul rate of the model's shapes (see NOTES)."""
    rows = precision_rows(setup, args, device)
    num_classes = setup.transformer.config.num_classes
    config = setup.transformer.config
    results = []
    first = rows[0].name
    with torch.no_grad():
        logits = {row.name: teacher_forced_logits(row.pipe.transformer, config, args.seed, device) for row in rows}
    logit_quality = {
        row.name: {
            "logit_relative_error_vs_" + first: (
                (logits[row.name] - logits[first]).norm() / logits[first].norm()
            ).item(),
            "logit_argmax_agreement_vs_" + first: (logits[row.name].argmax(1) == logits[first].argmax(1))
            .float()
            .mean()
            .item(),
        }
        for row in rows
    }
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            labels = [index % num_classes for index in range(batch_size)]

            def call(row, output_type, labels=labels):
                row.prepare()
                return row.pipe(
                    class_labels=labels,
                    num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale,
                    output_type=output_type,
                    generator=torch.Generator(device).manual_seed(args.seed),
                )

            tokens, flops = {}, {}
            for row in rows:
                with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
                    tokens[row.name] = call(row, "latent").images
                flops[row.name] = counter.get_total_flops() / batch_size
                for _ in range(args.warmup):
                    call(row, "pil")
            times = {row.name: {"end_to_end": [], "decode": []} for row in rows}
            loads = []
            for repeat in range(args.repeats):
                loads.append(machine_load())
                for row in rows:
                    ids = tokens[row.name]
                    times[row.name]["end_to_end"].append(timed(lambda: call(row, "pil"), device))  # noqa: B023
                    times[row.name]["decode"].append(timed(partial(decode_to_pil, row.pipe, ids), device))
                print(f"  precisions, batch {batch_size}: repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            shapes = matmul_shapes(config, batch_size, args.guidance_scale > 1)
            for row in rows:
                end_to_end = statistics.median(times[row.name]["end_to_end"])
                decode = statistics.median(times[row.name]["decode"])
                result = {
                    "precision": row.name,
                    "batch_size": batch_size,
                    "end_to_end_seconds_per_image": end_to_end / batch_size,
                    "decode_seconds_per_image": decode / batch_size,
                    "decode_share": decode / end_to_end,
                    "sampling_seconds_per_image": max(end_to_end - decode, 0.0) / batch_size,
                    "images_per_second": batch_size / end_to_end,
                    "transformer_gflops_per_image": flops[row.name] / 1e9,
                    "identical_tokens_vs_" + first: (tokens[row.name] == tokens[first]).float().mean().item(),
                    **logit_quality[row.name],
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu_memory_reuse": cpu_memory_reuse_enabled() if row.memory_reuse is None else row.memory_reuse,
                    "times_seconds": times[row.name],
                    "load": loads,
                }
                if args.breakdown:
                    result["breakdown"] = breakdown(lambda: call(row, "pil"), batch_size)  # noqa: B023
                if args.matmul_rates:
                    rate = matmul_rate(precision_kind(row.precision, args), shapes, device, args.repeats)
                    # Sampling time is end-to-end minus a separately timed decode: on a tiny model, timing noise can
                    # leave nothing, and then there is no rate to report.
                    sampling = result["sampling_seconds_per_image"]
                    achieved = result["transformer_gflops_per_image"] / sampling if sampling > 0 else None
                    result["matmul_rate"] = rate
                    result["sampling_gflops_per_second"] = achieved
                    result["fraction_of_matmul_rate"] = (
                        None if achieved is None else achieved / rate["gflops_per_second"]
                    )
                results.append(result)
    speedups, sampling_speedups = {}, {}
    for batch_size in args.batch_sizes:
        by_name = {r["precision"]: r for r in results if r["batch_size"] == batch_size}
        speedups[str(batch_size)] = {
            name: by_name[first]["end_to_end_seconds_per_image"] / r["end_to_end_seconds_per_image"]
            for name, r in by_name.items()
        }
        sampling_speedups[str(batch_size)] = {
            name: ratio(by_name[first]["sampling_seconds_per_image"], r["sampling_seconds_per_image"] or None)
            for name, r in by_name.items()
        }
    return {
        "results": results,
        "auto_choice": vars(args.auto_choice),
        "speedup_vs_" + first: speedups,
        "sampling_speedup_vs_" + first: sampling_speedups,
    }


# ----------------------------------------------------------------------------------------------------------------------
# the reference implementation, side by side


def import_reference(reference_dir: str, *names: str) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conversion"))
    from reference_import import import_reference as import_from_checkout

    return import_from_checkout(reference_dir, *names)


def import_reference_modules(reference_dir: str):
    return import_reference(reference_dir, "libs.models", "libs.nat_misc")


def reference_vq_model(reference_dir: str, seed: int) -> nn.Module:
    """The reference's VQGAN (taming `VQModel` with its `vq-f16-jax.yaml` architecture), random weights."""
    import yaml

    (vqgan_module,) = import_reference(reference_dir, "taming.models.vqgan")
    params = yaml.safe_load((Path(reference_dir) / "vq-f16-jax.yaml").read_text())["model"]["params"]
    torch.manual_seed(seed)
    return vqgan_module.VQModel(
        ddconfig=params["ddconfig"], lossconfig=None, n_embed=params["n_embed"], embed_dim=params["embed_dim"]
    )


def reference_pair(models_module, config, seed: int) -> tuple[nn.Module, ENATTransformer2DModel]:
    """The reference `DiT` with random weights and our transformer holding the same weights (our conversion)."""
    torch.manual_seed(seed)
    args = SimpleNamespace(enc_dec=[config.num_encoder_layers, config.num_decoder_layers])
    reference = models_module.DiT(
        input_size=config.sample_size,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
        codebook_size=config.codebook_size,
        args=args,
    ).eval()
    with torch.no_grad():  # as `randomize_modulation`: no block is an identity map
        for block in reference.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.02)
            block.adaLN_modulation[1].bias.normal_(0, 0.02)
        reference.y_embedder.embedding_table.weight.normal_(0, 1.0)
    ours = ENATTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    shapes = {key: value.shape for key, value in ours.state_dict().items()}
    converted = convert_enat_transformer_state_dict(reference.state_dict(), shapes, config.num_encoder_layers)
    ours.load_state_dict(converted, strict=True)
    return reference, ours


def reveal(ids: torch.LongTensor, count: int, codebook_size: int, generator: torch.Generator) -> torch.LongTensor:
    """Unmasks `count` more masked tokens per row (random positions and ids)."""
    scores = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(ids != codebook_size, -1.0)
    chosen = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, scores.topk(count, dim=1).indices, True)
    values = torch.randint(0, codebook_size, ids.shape, generator=generator, device=ids.device)
    return torch.where(chosen, values, ids)


@torch.no_grad()
def teacher_forced_parity(reference: nn.Module, ours: ENATTransformer2DModel, device: torch.device) -> dict:
    """Logits of both implementations on the same three-step trajectory; the last step reuses features."""
    config = ours.config
    generator = torch.Generator(device).manual_seed(0)
    labels = torch.tensor([1, config.num_classes], device=device)
    ids = torch.full((2, config.sample_size**2), config.codebook_size, device=device)
    reference_state = our_state = None
    for count in (0, config.sample_size**2 // 8, config.sample_size**2 // 4):
        ids = reveal(ids, count, config.codebook_size, generator)
        reference_out = reference(ids, context=labels, prev_dict=reference_state, return_dict=True)
        our_out = ours(ids, class_labels=labels, reuse_state=our_state)
        reference_state, our_state = reference_out, our_out.reuse_state
    expected = reference_out["logits"].transpose(1, 2).reshape(our_out.logits.shape)
    return {
        "max_abs_logit_diff": (our_out.logits.float() - expected.float()).abs().max().item(),
        "max_abs_logit": expected.abs().max().item(),
    }


def check_reference_config(config) -> None:
    if config.num_classes != 1000:
        raise SystemExit(
            f"--reference_dir: the reference sampler hard-codes class 1000 as the null class; this model has "
            f"num_classes={config.num_classes}"
        )


def compare_with_reference(config, args, device: torch.device, dtype: torch.dtype) -> dict:
    """
    Times the reference sampler (`NATSchedule.generate`) and our pipeline at batch 1, alternating runs, on an
    architecture given by our transformer `config`, with the same random weights in both.
    """
    models_module, nat_misc = import_reference_modules(args.reference_dir)
    reference, ours = reference_pair(models_module, config, args.seed)
    reference, ours = to_device(reference, device, dtype), to_device(ours, device, dtype)
    parity = teacher_forced_parity(reference, ours, device)
    # The reference's cfg is the weight w of cond + w * (cond - uncond): diffusers' scale minus one.
    sampler_args = SimpleNamespace(**REFERENCE_SAMPLING, cfg_scale=args.guidance_scale - 1)
    schedule = nat_misc.NATSchedule(codebook_size=config.codebook_size, device=device, args=sampler_args)
    decode_reference, our_vqvae, output_type = (lambda z: z), None, "latent"
    if args.reference_end_to_end:
        reference_vqvae = to_device(reference_vq_model(args.reference_dir, args.seed), device, dtype)
        decode_reference = reference_vqvae.decode_code
        torch.manual_seed(args.seed)
        our_vqvae = to_device(MaskGITVQModel(sample_size=16 * config.sample_size), device, dtype)
        output_type = "pt"  # decoded and scaled to [0, 1]; the reference returns its decoder's output
    scheduler = ENATScheduler(mask_token_id=config.codebook_size)
    pipes = {"ours": ENATPipeline(transformer=ours, vqvae=our_vqvae, scheduler=scheduler)}
    # Our fastest path on this machine (`choose_precision`), when it is not the precision of `--dtype`.
    fastest = args.auto_choice.precision
    if PRECISIONS[fastest][:1] != (dtype,) or PRECISIONS[fastest][1] is not None:
        fast_dtype, quant = PRECISIONS[fastest]
        fast = to_device(copy.deepcopy(ours), device, fast_dtype)
        fast_vqvae = None if our_vqvae is None else to_device(copy.deepcopy(our_vqvae), device, fast_dtype)
        if fast_vqvae is not None:
            fast_vqvae = set_vqvae_precision(fast_vqvae, fastest, device)
        fast = quantize_for_cpu(fast) if quant == X86_INT8 else fast
        pipes["ours_" + fastest] = ENATPipeline(transformer=fast, vqvae=fast_vqvae, scheduler=copy.deepcopy(scheduler))
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    label = torch.tensor([1], device=device)

    def run_reference():
        schedule.generate(args.num_inference_steps, 1, reference, decode_reference, config.sample_size, context=label)

    def runner(pipe):
        return lambda: pipe(
            class_labels=[1],
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            output_type=output_type,
        )

    runs = {"reference": run_reference, **{name: runner(pipe) for name, pipe in pipes.items()}}
    times = {name: [] for name in runs}
    loads = []
    with torch.no_grad():
        for _ in range(max(args.warmup, 1)):
            for run in runs.values():
                run()
        for repeat in range(args.repeats):
            loads.append(machine_load())
            for name, run in runs.items():
                times[name].append(timed(run, device))
            print(f"  reference: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "batch_size": 1,
        "end_to_end": args.reference_end_to_end,
        "load": loads,
        "load_after": machine_load(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seconds_reference": medians["reference"],
        "seconds_ours": medians["ours"],
        "speedup": medians["reference"] / medians["ours"],
        # Other processes only ever add time: the ratio of the fastest runs is the least noisy estimate.
        "speedup_of_fastest_runs": min(times["reference"]) / min(times["ours"]),
        "times_seconds": times,
        "parity": parity,
    }
    for name in pipes.keys() - {"ours"}:
        result["fastest_path"] = {
            "precision": fastest,
            "seconds": medians[name],
            "speedup": medians["reference"] / medians[name],
            "speedup_of_fastest_runs": min(times["reference"]) / min(times[name]),
        }
    return result


# ----------------------------------------------------------------------------------------------------------------------
# report


def describe(setup: Setup, args, device: torch.device) -> dict:
    config = setup.transformer.config
    return {
        "name": setup.name,
        "random_weights": setup.random_weights,
        "token_grid": [config.sample_size, config.sample_size],
        "hidden_size": config.hidden_size,
        "encoder_layers": config.num_encoder_layers,
        "decoder_layers": config.num_decoder_layers,
        "parameters_millions": sum(p.numel() for p in setup.transformer.parameters()) / 1e6,
        "amused_config": setup.amused_config,
        "settings": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype,
            "num_inference_steps": args.num_inference_steps,
            "amused_steps": args.amused_steps,
            "guidance_scale": args.guidance_scale,
            "batch_sizes": args.batch_sizes,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "compile": args.compile,
            "editing": {"inpaint_fractions": args.inpaint_fractions, "samples_per_image": args.samples_per_image}
            if args.editing
            else None,
            "flops_only": args.flops_only,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def format_table(results: list[dict]) -> str:
    header = "| row | batch | GFLOPs/img | s/img | img/s | peak MiB | MiB/img | finite |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        memory = r.get("peak_memory_mib")
        memory_cells = "- | -" if memory is None else f"{memory:.1f} | {r['peak_memory_mib_per_image']:.1f}"
        timed_cells = "- | -"
        if r["seconds_per_image"] is not None:
            timed_cells = f"{r['seconds_per_image']:.3f} | {r['images_per_second']:.2f}"
        lines.append(
            f"| {r['title']} | {r['batch_size']} | {r['gflops_per_image']:.4g} | {timed_cells} | {memory_cells} | "
            f"{'yes' if r['finite'] else 'NO'} |"
        )
    return "\n".join(lines)


def times(value: float | None) -> str:
    return "" if value is None else f", {value:.2f}x time"


def print_report(report: dict) -> None:
    description = report["config"]
    settings = description["settings"]
    side = description["token_grid"][0]
    print(
        f"\n{description['name']} ({'random weights' if description['random_weights'] else 'trained weights'}, "
        f"{description['parameters_millions']:.1f}M parameters), {side}x{side} tokens, {settings['num_inference_steps']} steps "
        f"(aMUSEd {settings['amused_steps']}), guidance {settings['guidance_scale']}, {settings['device_name']} "
        f"{settings['dtype']}, torch {settings['torch']}, {settings['threads']} threads"
    )
    cpu = report["machine"]["cpu"]
    print(
        f"CPU capability {cpu['features']['capability']} ({cpu['features']}); precision auto on {settings['device']}: "
        f"{cpu['auto_precision']['precision']} ({cpu['auto_precision']['reason']})"
    )
    for key, note in report["notes"].items():
        print(f"  {key}: {note}")
    print(format_table(report["results"]))
    for batch_size, table in report["ratios"].items():
        parts = [f"{n}: {v['flops_vs_enat']:.2f}x FLOPs{times(v['time_vs_enat'])}" for n, v in table.items()]
        print(f"vs ENAT with reuse, batch {batch_size}: " + "; ".join(parts))
    for batch_size, table in report.get("editing", {}).items():
        print(f"editing vs generation and vs aMUSEd's inpainting, batch {batch_size} (per output image):")
        for name, values in table.items():
            parts = [
                f"{values[f'flops_vs_{base}']:.2f}x FLOPs{times(values[f'time_vs_{base}'])} of {base}"
                for base in ("generation", "amused_inpaint")
                if f"flops_vs_{base}" in values
            ]
            print(f"  {name}: " + "; ".join(parts))
    for batch_size, gain in report.get("compile", {}).items():
        print(
            f"compile, batch {batch_size}: {gain['speedup']:.2f}x vs eager "
            f"(first call incl. compilation {gain['first_call_seconds']:.1f} s)"
        )
    for r in report.get("vq_decode", []):
        first = next(key[len("speedup_vs_") :] for key in r if key.startswith("speedup_vs_"))
        print(
            f"VQ decode {r['variant']}, batch {r['batch_size']}: {r['gflops_per_image']:.4g} GFLOPs/img, "
            f"{r['seconds_per_image']:.3f} s/img, {r['speedup_vs_' + first]:.2f}x {first}, pixels vs {first}: max "
            f"|diff| {r['max_abs_pixel_error_vs_' + first]:.2e}, PSNR {r['psnr_db_vs_' + first]:.1f} dB"
        )
    precisions = report.get("precisions", {})
    for r in precisions.get("results", []):
        first = next(key[len("identical_tokens_vs_") :] for key in r if key.startswith("identical_tokens_vs_"))
        end_to_end = precisions[f"speedup_vs_{first}"][str(r["batch_size"])][r["precision"]]
        sampling = precisions[f"sampling_speedup_vs_{first}"][str(r["batch_size"])][r["precision"]]
        line = (
            f"{r['precision']}, batch {r['batch_size']}, end to end: {r['end_to_end_seconds_per_image']:.3f} s/img "
            f"(VQ decode {r['decode_share']:.0%}), {end_to_end:.2f}x {first} end to end, "
            f"{'-' if sampling is None else f'{sampling:.2f}x'} {first} sampling (tokens); vs {first}: "
            f"{r['identical_tokens_vs_' + first]:.1%} identical tokens, logits relative error "
            f"{r['logit_relative_error_vs_' + first]:.2e}, argmax agreement {r['logit_argmax_agreement_vs_' + first]:.1%}"
            f"; {r['transformer_gflops_per_image']:.4g} transformer GFLOPs/img"
        )
        if r.get("fraction_of_matmul_rate") is not None:
            line += (
                f", {r['sampling_gflops_per_second']:.0f} GFLOP/s = {r['fraction_of_matmul_rate']:.0%} of this "
                f"machine's {r['matmul_rate']['gflops_per_second']:.0f} GFLOP/s matmul rate at the model's shapes"
            )
        print(line)
        if "breakdown" in r:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown"]["seconds_per_image"].items())
            print(f"  seconds per image: {parts}")
    if "reference" in report:
        ref = report["reference"]
        print(
            f"reference sampler{' + its VQ decode' if ref['end_to_end'] else ''}, batch 1: "
            f"{ref['seconds_reference']:.3f} s, ours {ref['seconds_ours']:.3f} s: "
            f"{ref['speedup']:.2f}x faster (fastest runs: {ref['speedup_of_fastest_runs']:.2f}x); teacher-forced "
            "reuse-step logits "
            f"max |diff| {ref['parity']['max_abs_logit_diff']:.2e} (max |logit| {ref['parity']['max_abs_logit']:.2f})"
        )
        if "fastest_path" in ref:
            fast = ref["fastest_path"]
            print(
                f"  our fastest path here ({fast['precision']}): {fast['seconds']:.3f} s, {fast['speedup']:.2f}x the "
                f"reference (fastest runs: {fast['speedup_of_fastest_runs']:.2f}x)"
            )


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_rows(setup: Setup, args, device: torch.device, dtype: torch.dtype) -> dict:
    """The table: every row at every batch size, with ratios, compile gain and VQ decode."""
    setup.transformer = to_device(setup.transformer, device, dtype)
    setup.vqvae = to_device(setup.vqvae, device, dtype)
    rows = build_rows(setup, args, device, dtype)
    excluded = weight_addresses([setup.transformer, setup.vqvae, *[row.model for row in rows]])
    results = []
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            results.extend(measure_batch(rows, batch_size, args, device, excluded))
    ratio_table = ratios(results)
    notes = {key: NOTES[key] for key in ("gflops", "seconds")}
    notes["memory"] = NOTES["memory_cuda" if device.type == "cuda" else "memory_cpu"]
    report = {"config": describe(setup, args, device), "notes": notes, "results": results, "ratios": ratio_table}
    if args.editing:
        report["notes"]["editing"] = NOTES["editing"]
        report["editing"] = editing_ratios(results)
    if args.compile:
        report["compile"] = compile_gain(results)
    if args.vq_decode:
        with torch.no_grad():
            report["vq_decode"] = measure_vq_decode(setup.vqvae, setup.transformer.config.sample_size, args, device)
    return report


def run_benchmark(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setup = load_setup(args)
    config = setup.transformer.config
    if args.reference_dir is not None:
        check_reference_config(config)  # before the long part
    report = measure_rows(setup, args, device, dtype)
    if args.precisions:
        report["precisions"] = measure_precisions(setup, args, device)
    del setup  # the reference comparison builds its own pair of models
    gc.collect()
    if args.reference_dir is not None:
        report["reference"] = compare_with_reference(config, args, device, dtype)
    report["process_max_rss_mib"] = max_rss_mib()
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # casting random models with `.to(dtype)` warns once per model
    load_before = machine_load()
    memory_reuse_applied = enable_cpu_memory_reuse() if args.cpu_memory_reuse == "on" else False
    with BusyCores(args.busy_cores):
        report = run_benchmark(args)
    report["machine"] = {
        "busy_cores": args.busy_cores,
        "threading_environment": {name: os.environ.get(name) for name in THREADING_VARIABLES},
        "cpu_count": os.cpu_count(),
        "cpu_memory_reuse": {"mode": args.cpu_memory_reuse, "applied": memory_reuse_applied},
        "load_before": load_before,
        "load_after": machine_load(),
        "cpu": {"features": vars(CPUFeatures.detect()), "auto_precision": vars(args.auto_choice)},
    }
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
