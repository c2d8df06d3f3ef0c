#!/usr/bin/env python
"""Train an ENAT transformer (EfficientNAT, NeurIPS 2024) with accelerate: from scratch, fine-tuned, or with LoRA.

The same script runs on one GPU, several GPUs or several machines: `accelerate launch` decides, the code does not
change. Images are tokenized once with the frozen MaskGIT VQ model into a token cache (`--cache_dir`); training then
reads only token ids. The recipe follows the ENAT paper (arXiv:2411.06959, its training details and appendix; the docs'
"LoRA and fine-tuning" page lists the settings): mask ratio ~ Beta(12, 3) (one
per batch), cross-entropy with label smoothing 0.1 on the masked tokens only, feature-reuse training (with probability
`--reuse_prob`, a "previous step" with more masked tokens goes through the EMA model, and the trained model gets its
reuse state), conditions dropped to the null class (class data) or the empty prompt (text data) with probability
`--cond_drop_prob`, AdamW with betas (0.99, 0.99) and weight decay 0.03, linear warm-up, EMA 0.9999 (reached through
diffusers' EMA warm-up unless --no-ema_warmup).

The paper trains with a total batch of 2048 at lr 4e-4 (ImageNet 512: batch 512, lr 1e-4). For another total batch
size (per-device batch x processes x accumulation), scale the rate linearly, or pass `--scale_lr` to let the script
do it (`--learning_rate` is then read as the rate for a total batch of 2048).

Commands (the ImageNet layout is one subfolder per class; `maskgit-vqgan` is a converted tokenizer folder, see the docs'
"Loading and conversion" page; `--model_config` takes a preset name, ENAT-S / ENAT-B / ENAT-L / ENAT-B-COCO, or a json file of
`ENATTransformer2DModel` config kwargs; sample_size, codebook_size and the conditioning widths follow from the data,
the VQ model and the text encoder when the config leaves them out):

    # 1 GPU (total batch 256 -> lr 5e-5 by linear scaling)
    accelerate launch --num_processes 1 examples/train_enat.py \
        --train_data_dir /data/imagenet/train --resolution 256 --random_flip \
        --vqvae_model_name_or_path maskgit-vqgan --model_config ENAT-L \
        --train_batch_size 256 --learning_rate 4e-4 --scale_lr --lr_warmup_steps 5000 --max_train_steps 500000 \
        --mixed_precision bf16 --checkpointing_steps 5000 --checkpoints_total_limit 3 \
        --validation_steps 5000 --validation_class_labels 207 360 387 974 --output_dir enat-l-256

    # 8 GPUs on one machine (8 x 256 = 2048: the paper's batch and lr)
    accelerate launch --multi_gpu --num_processes 8 examples/train_enat.py \
        --train_data_dir /data/imagenet/train --resolution 256 --random_flip \
        --vqvae_model_name_or_path maskgit-vqgan --model_config ENAT-L \
        --train_batch_size 256 --learning_rate 4e-4 --lr_warmup_steps 5000 --max_train_steps 500000 \
        --mixed_precision fp16 --checkpointing_steps 5000 --output_dir enat-l-256

    # 2 machines x 8 GPUs (16 x 128 = 2048); run on each machine with its own --machine_rank (0 and 1)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \
        --main_process_ip 10.0.0.1 --main_process_port 29500 examples/train_enat.py \
        --train_data_dir /data/imagenet/train --resolution 256 --random_flip \
        --vqvae_model_name_or_path maskgit-vqgan --model_config ENAT-L --cache_dir /shared/enat_tokens \
        --train_batch_size 128 --learning_rate 4e-4 --lr_warmup_steps 5000 --max_train_steps 500000 \
        --mixed_precision bf16 --output_dir /shared/enat-l-256

    # mixed precision: --mixed_precision fp16 (loss scaling by accelerate) or --mixed_precision bf16;
    # add --gradient_checkpointing and/or --gradient_accumulation_steps N when memory is short.

    # resume: the same command plus
        --resume_from_checkpoint latest          # or a checkpoint folder, e.g. enat-l-256/checkpoint-5000

    # teach a converted class-conditional pipeline your own classes (one subfolder per class) with LoRA; the class
    # embedding is resized to the new classes (+ null) and trained too; leave out --lora_rank for full fine-tuning.
    # Defaults fit short runs (warm-up at most 10% of the steps, EMA warm-up, LoRA lr 2e-3 on attention and
    # feed-forward); --new_classes extend --with_prior_preservation keeps the pretrained classes (see
    # docs/source/training/recipes.md for measured recipes)
    accelerate launch examples/train_enat.py \
        --pretrained_model_name_or_path enat-l-256 --train_data_dir my_classes --random_flip \
        --new_classes replace --lora_rank 16 --max_train_steps 2000 \
        --train_batch_size 32 --mixed_precision bf16 --output_dir enat-l-256-lora

    # a 🤗 dataset (Hub id, local data files, `save_to_disk` folder, or `imagefolder` with --train_data_dir)
    accelerate launch examples/train_enat.py --dataset_name USER/DATASET --image_column image --label_column label \
        --pretrained_model_name_or_path enat-l-256 --new_classes replace ...

    # text-to-image on COCO (one sample per caption) or on a folder of images with same-name .txt captions
    accelerate launch --multi_gpu --num_processes 8 examples/train_enat.py \
        --coco_captions_json annotations/captions_train2017.json --coco_images_dir train2017 \
        --resolution 256 --random_flip --vqvae_model_name_or_path maskgit-vqgan \
        --text_encoder_name_or_path openai/clip-vit-large-patch14 --model_config ENAT-B-COCO \
        --train_batch_size 64 --learning_rate 2e-4 --max_train_steps 150000 --mixed_precision bf16 \
        --validation_steps 5000 --validation_prompts "a red bus on a street" "a bowl of fruit" \
        --output_dir enat-b-coco

At the end, `--output_dir` holds a diffusers pipeline folder (EMA weights; LoRA fused into the weights) that loads
with `DiffusionPipeline.from_pretrained(output_dir)` after `import enat_diffusers`, plus `training_log.jsonl` (loss
and lr per optimizer step), `checkpoint-*` folders, `validation/*.png` grids (one labelled row per class or prompt,
upscaled), a model card (README.md: base model, data, method) and, for LoRA, the adapter alone in
`pytorch_lora_weights.safetensors` (keys prefixed `transformer.`, the LoRA config in diffusers' `lora_adapter_metadata`,
and with --new_classes the resized `transformer.class_embedding.weight` and the class names in `id2label` metadata), for
the pipelines' `load_lora_weights`. LoRA runs keep no EMA: the adapter weights themselves are saved, and the reuse
"previous step" comes from the trained model (no grad, eval mode). `--push_to_hub` creates the Hub repo at start-up
and uploads the folder at the end without the checkpoints and tracker logs.

The token cache holds token ids only (int16, per image; with `--random_flip` also of the mirrored image); labels and
captions come from the data listing, which is cheap. Its file name is a hash of the image files (path, size and
modification time of each), the resolution, `--random_flip` and the VQ model's config and weights, so a change of any
of them builds a new cache.

After a crash: checkpoints are complete or absent (written as `checkpoint-N.partial`, renamed when complete; older
ones are pruned only then), the token cache is complete or absent, `--resume_from_checkpoint latest` redoes the steps
after the newest checkpoint (the log keeps one line per step) and, after the last step, trains nothing. Captions are
encoded by the frozen text encoder at every step (no grad); a dropped caption is the empty prompt.
"""

import argparse
import contextlib
import copy
import csv
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import diffusers
import huggingface_hub
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from enat_diffusers import (
    ENAT_PRESETS,
    ENATClassNames,
    ENATPipeline,
    ENATScheduler,
    ENATText2ImagePipeline,
    ENATTransformer2DModel,
    MaskGITVQModel,
    encode_text,
)
from enat_diffusers.demo import resolve_pretrained_location
from enat_diffusers.script_utils import add_deprecated_flag, require_optional

logger = get_logger(__name__, log_level="INFO")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ATTENTION_LORA_TARGETS = ["to_q", "to_kv", "to_kv_context", "to_out"]
# Attention and feed-forward: in the digits recipes, attention alone learned new classes several times slower.
LORA_TARGET_MODULES = [*ATTENTION_LORA_TARGETS, "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP / BERT-style attention
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRAINING_LOG = "training_log.jsonl"
PAPER_TOTAL_BATCH_SIZE = 2048
DEFAULT_RESOLUTION = 256  # a new model's image size when --resolution is not given
FULL_LEARNING_RATE = 4e-4  # the paper's (at its total batch of 2048)
LORA_LEARNING_RATE = 2e-3  # LoRA updates are low-rank and start at zero: a higher rate, as in diffusers' LoRA scripts
PAPER_WARMUP_STEPS = 5000
WARMUP_FRACTION = 0.1  # the default warm-up is at most this share of the run's steps
EMA_WARMUP_POWER = 3 / 4  # diffusers' value for runs of fewer than a million steps
EMA_STALE_SHARE = 0.5  # warn when the saved EMA weights would still be more than this share the starting weights
TOKEN_CACHE_VERSION = 2  # 2: the key covers each image file's size and modification time
IGNORE_INDEX = -100
CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; renamed to checkpoint-N once complete
CHECKSUMS_FILE = "checksums.json"  # in each checkpoint: sha256 and size of every file, to tell a damaged one
RUN_INFO_FILE = "training_run.json"  # in each checkpoint: what a resume must match (classes, LoRA shape, class images)
SPACE_MARGIN = 1.1  # free space asked for, over the estimated size of what is written
DEPRECATED_FLAGS_REMOVED_IN = "0.3.0"
VALIDATION_CELL_SIZE = 128  # validation images are upscaled (nearest neighbour) to at least this many pixels
VALIDATION_LABEL_HEIGHT = 16  # the band above each grid row that names its class or prompt
# Errors of the Hub client: OSError covers connection, offline-mode and missing-token errors; the bases of
# HfHubHTTPError add the HTTP library's own (httpx's ConnectError is no OSError).
HUB_ERRORS = (OSError, *HfHubHTTPError.__bases__)


class InputError(ValueError):
    """A problem with the arguments or the data that one sentence explains (the command line prints no traceback)."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an ENAT transformer (class- or text-conditional).")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help='A 🤗 datasets dataset (pip install "enat-diffusers[train]"): a Hub id, a local folder of data files '
        "or one written by `save_to_disk`, or a builder such as `imagefolder` (with --train_data_dir as its data_dir). "
        "Class data with --label_column, text data with --caption_column. The token cache key reads the image bytes "
        "(or file size and time) of every row once per start.",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration name.")
    data.add_argument("--dataset_split", type=str, default="train", help="The split of --dataset_name to train on.")
    data.add_argument(
        "--image_column",
        type=str,
        default=None,
        help='--dataset_name: the image column (default: "image", else the first image column).',
    )
    data.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="--dataset_name: a column of captions (a string or a list of strings per row) -> text-conditional data.",
    )
    data.add_argument(
        "--label_column",
        type=str,
        default=None,
        help='--dataset_name: the class column (default: "label"): ClassLabel (its names become id2label), integer '
        "ids, or strings (class names, ids in sorted order).",
    )
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Class-conditional data: a folder with one subfolder of images per class (class ids in "
        "sorted folder-name order), or a flat image folder with --labels_file. With --dataset_name: the data_dir "
        "passed to `datasets.load_dataset`.",
    )
    data.add_argument(
        "--labels_file",
        type=str,
        default=None,
        help="json ({file_name: label}) or csv (file_name,label rows) with integer labels for the "
        "images of --train_data_dir (file names relative to it).",
    )
    data.add_argument(
        "--coco_captions_json",
        type=str,
        default=None,
        help="Text data: a COCO captions file (e.g. captions_train2017.json); one sample per caption.",
    )
    data.add_argument("--coco_images_dir", type=str, default=None, help="The COCO image folder (e.g. train2017).")
    data.add_argument(
        "--caption_data_dir",
        type=str,
        default=None,
        help="Text data: a folder of images with same-name .txt captions (one sample per non-empty line).",
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"Images are resized (shorter side) and center-cropped to this size; a multiple of the VQ "
        f"downsampling factor (default: the pretrained model's image size, else {DEFAULT_RESOLUTION}).",
    )
    data.add_argument(
        "--random_flip",
        action="store_true",
        help="Also tokenize horizontally flipped images and pick one of the two at random per sample.",
    )
    data.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="Where the token cache is written and looked up (default: <HF_HOME>/enat_token_cache). A cache is "
        "keyed by the image files (path, size, modification time), resolution, flips and VQ model; delete its file "
        "to force a rebuild.",
    )
    data.add_argument("--tokenize_batch_size", type=int, default=64, help="Images per VQ encoder batch when caching.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Image-loading workers when caching.")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="An ENAT pipeline (folder or Hub id) to fine-tune: its transformer, vqvae and scheduler.",
    )
    model.add_argument(
        "--vqvae_model_name_or_path",
        type=str,
        default=None,
        help="A MaskGITVQModel folder/Hub id, or a pipeline with a `vqvae` subfolder (default: the "
        "pretrained pipeline's).",
    )
    model.add_argument(
        "--model_config",
        type=str,
        default=None,
        help="A new transformer: a json file of ENATTransformer2DModel config kwargs, or a preset name. "
        "sample_size, codebook_size and num_classes default to what the data and VQ model imply.",
    )
    model.add_argument(
        "--text_encoder_name_or_path",
        type=str,
        default=None,
        help="Text data: a CLIP text encoder + tokenizer (default: the pretrained pipeline's).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained models on the Hub.")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--reuse_prob", type=float, default=0.5, help="Probability of a feature-reuse training step.")
    recipe.add_argument(
        "--cond_drop_prob",
        type=float,
        default=0.15,
        help="Probability of replacing a sample's condition by the null class / empty prompt.",
    )
    recipe.add_argument("--label_smoothing", type=float, default=0.1)
    recipe.add_argument(
        "--mask_ratio_beta",
        type=float,
        nargs=2,
        default=(12.0, 3.0),
        metavar=("ALPHA", "BETA"),
        help="The mask ratio of a batch is drawn from Beta(ALPHA, BETA).",
    )
    recipe.add_argument(
        "--ema_decay",
        type=float,
        default=0.9999,
        help="Decay of the EMA weights that are validated, used for reuse states and saved (not with LoRA): the "
        "constant decay with --no-ema_warmup, else the most the warm-up reaches.",
    )
    recipe.add_argument(
        "--ema_warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"EMA warm-up (diffusers' EMAModel use_ema_warmup, inv_gamma 1, power {EMA_WARMUP_POWER:g}): the decay "
        "grows as 1 - (1 + step)^-power up to --ema_decay (0.98 at step 200, 0.999 at 10k, 0.9999 at 215k), so short "
        "runs save what they learned. --no-ema_warmup: the paper's constant --ema_decay from the first step.",
    )
    recipe.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"Peak learning rate (default: {FULL_LEARNING_RATE:g}, with --lora_rank {LORA_LEARNING_RATE:g}).",
    )
    recipe.add_argument(
        "--scale_lr",
        action="store_true",
        help=f"Read --learning_rate as the rate for a total batch of {PAPER_TOTAL_BATCH_SIZE} and "
        "scale it linearly to the actual total batch size.",
    )
    recipe.add_argument("--adam_beta1", type=float, default=0.99)
    recipe.add_argument("--adam_beta2", type=float, default=0.99)
    recipe.add_argument("--adam_weight_decay", type=float, default=0.03)
    recipe.add_argument("--adam_epsilon", type=float, default=1e-8)
    recipe.add_argument("--max_grad_norm", type=float, default=None, help="Gradient clipping (off by default).")
    recipe.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant_with_warmup",
        help='A diffusers.optimization schedule: "constant_with_warmup", "cosine", "linear", ...',
    )
    recipe.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=None,
        help=f"Linear learning-rate warm-up steps (default: the paper's {PAPER_WARMUP_STEPS}, but at most "
        f"{WARMUP_FRACTION:.0%} of the run's steps).",
    )
    recipe.add_argument("--train_batch_size", type=int, default=64, help="Batch size per device.")
    recipe.add_argument("--num_train_epochs", type=int, default=100)
    recipe.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    recipe.add_argument("--gradient_accumulation_steps", type=int, default=1)
    recipe.add_argument("--gradient_checkpointing", action="store_true")
    recipe.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Defaults to the accelerate config.",
    )
    recipe.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help="Train a LoRA adapter of this rank on the pretrained transformer instead of all weights (with "
        "--new_classes, the resized class embedding is trained too).",
    )
    recipe.add_argument("--lora_alpha", type=float, default=None, help="LoRA scaling alpha (default: the rank).")
    recipe.add_argument(
        "--lora_target_modules",
        type=str,
        nargs="+",
        default=LORA_TARGET_MODULES,
        help=f"Module names that get LoRA layers (default: the attention projections {' '.join(ATTENTION_LORA_TARGETS)} "
        "and the feed-forward layers ff.net.0.proj ff.net.2; the adaLN modulation is adaln_modulation). A name "
        "matches a module whose name is it or ends with '.' + it, as in peft.",
    )
    recipe.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch.")
    recipe.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Text data with --lora_rank: also train a LoRA adapter (same rank, alpha, dropout) on the text encoder's "
        f"attention projections ({' '.join(TEXT_ENCODER_LORA_TARGET_MODULES)}); saved with `text_encoder.` keys in the "
        "same file and fused into the saved text encoder.",
    )
    recipe.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="bitsandbytes' 8-bit AdamW (optimizer states in 8 bits; needs bitsandbytes and, in practice, a GPU).",
    )

    classes = parser.add_argument_group("new classes (fine-tuning a class-conditional model)")
    classes.add_argument(
        "--new_classes",
        type=str,
        default=None,
        choices=["replace", "extend"],
        help="Teach the pretrained model the classes of the data (names from the class folders or the label "
        "column): `replace` resizes the class embedding to the data's classes (+ the null class); `extend` keeps "
        "the pretrained classes and appends the data's classes whose names are not among them (a data class named "
        "like a pretrained class trains that class). New rows start from --class_init; the null class keeps its "
        "pretrained embedding; id2label is written with the new names.",
    )
    classes.add_argument(
        "--class_init",
        type=str,
        nargs="+",
        default=["mean"],
        metavar="INIT",
        help='How new class embeddings start: "mean" (the mean of the pretrained class embeddings, null class '
        "excluded) and/or NEW=OLD pairs that copy a pretrained class (OLD: an id or a name), e.g. "
        '--class_init "rotated seven=seven" "rotated one=1". A class without a pair starts from the pretrained class '
        "of the same name, if there is one, else from the mean.",
    )

    prior = parser.add_argument_group("prior preservation (keeping the pretrained classes, as diffusers' DreamBooth)")
    prior.add_argument(
        "--with_prior_preservation",
        action="store_true",
        help="Also train on images of the pretrained classes that the data does not train (--class_data_dir, "
        "completed with images the pretrained model generates), so that they are not forgotten. With --new_classes "
        "extend or without --new_classes.",
    )
    prior.add_argument(
        "--class_data_dir",
        type=str,
        default=None,
        help="Images of the kept classes, one subfolder per class (named by a class name or id); classes with fewer "
        "than --num_class_images images get generated ones, written here (default: <output_dir>/class_images).",
    )
    prior.add_argument(
        "--num_class_images",
        type=int,
        default=20,
        help="Prior images per kept class (generated by the pretrained model where --class_data_dir has fewer).",
    )
    prior.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the loss on the prior images.")

    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Generate validation images every N steps with the EMA weights.",
    )
    validation.add_argument(
        "--validation_class_labels",
        type=str,
        nargs="+",
        default=None,
        help="Class ids or class names to generate (class data; default: the first four classes).",
    )
    validation.add_argument("--validation_prompts", type=str, nargs="+", default=None, help="Prompts (text data).")
    validation.add_argument("--num_validation_images", type=int, default=4, help="Images per class label / prompt.")
    validation.add_argument(
        "--validation_num_inference_steps", type=int, default=None, help="Default: the pipeline's default."
    )
    validation.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance scale as in diffusers (> 1: on). Default: the pipeline's default.",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=str, default="enat-model")
    output.add_argument(
        "--checkpointing_steps",
        type=int,
        default=1000,
        help="Save the full training state (accelerator.save_state) every N steps and at the last step. A checkpoint "
        "is written as checkpoint-N.partial and renamed when complete, so a kill never leaves a checkpoint that "
        "cannot be resumed.",
    )
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    output.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='"latest" (the newest complete checkpoint in --output_dir, if any) or a checkpoint folder. Steps after '
        "the checkpoint run again (and replace their lines in training_log.jsonl); resuming a finished run trains "
        "nothing and writes the same pipeline.",
    )
    output.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, under --output_dir.")
    output.add_argument("--report_to", type=str, default="none", help='"none", "tensorboard", "wandb" or "all".')
    output.add_argument("--tracker_project_name", type=str, default="train_enat")
    output.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    output.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: the output folder name).")
    output.add_argument("--hub_token", type=str, default=None)
    add_deprecated_flag(
        parser,
        "--validation_inference_steps",
        "--validation_num_inference_steps",
        removed_in=DEPRECATED_FLAGS_REMOVED_IN,
    )
    args = parser.parse_args(argv)
    args.base_model = args.pretrained_model_name_or_path  # as given (e.g. demo:digits), for the model card
    for flag in ("pretrained_model_name_or_path", "vqvae_model_name_or_path", "text_encoder_name_or_path"):
        if getattr(args, flag):  # demo:NAME -> the packaged demo pipeline, as in every script
            setattr(args, flag, resolve_pretrained_location(getattr(args, flag)))
    if args.learning_rate is None:
        args.learning_rate = FULL_LEARNING_RATE if args.lora_rank is None else LORA_LEARNING_RATE
    check_args(args)
    return args


def _data_sources(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The class-conditional and text-conditional data flags that were given."""
    if args.dataset_name:
        other = ("labels_file", "coco_captions_json", "coco_images_dir", "caption_data_dir")
        given = [flag for flag in other if getattr(args, flag)]
        if given:
            raise InputError(f"--dataset_name replaces {', '.join('--' + flag for flag in given)}; pass one source")
        return ([], ["dataset_name"]) if args.caption_column else (["dataset_name"], [])
    dataset_flags = [flag for flag in ("image_column", "caption_column", "label_column") if getattr(args, flag)]
    if dataset_flags:
        raise InputError(f"{', '.join('--' + flag for flag in dataset_flags)} name columns of --dataset_name")
    class_sources = [flag for flag in ("train_data_dir", "labels_file") if getattr(args, flag)]
    text_sources = [
        flag for flag in ("coco_captions_json", "coco_images_dir", "caption_data_dir") if getattr(args, flag)
    ]
    return class_sources, text_sources


def _check_data_args(args: argparse.Namespace) -> None:
    class_sources, text_sources = _data_sources(args)
    if not class_sources and not text_sources:
        raise InputError(
            "no training data: pass --dataset_name (a 🤗 dataset), --train_data_dir (class-conditional, optionally "
            "with --labels_file), or --coco_captions_json with --coco_images_dir, or --caption_data_dir "
            "(text-conditional)"
        )
    if class_sources and text_sources:
        raise InputError(
            f"pass either class-conditional data (--train_data_dir/--labels_file) or text data, not both; got "
            f"{', '.join('--' + flag for flag in class_sources + text_sources)}"
        )
    if args.labels_file and not args.train_data_dir:
        raise InputError("--labels_file needs --train_data_dir (the folder its file names are relative to)")
    if bool(args.coco_captions_json) != bool(args.coco_images_dir):
        raise InputError("--coco_captions_json and --coco_images_dir go together")
    if args.coco_captions_json and args.caption_data_dir:
        raise InputError("pass either --coco_captions_json/--coco_images_dir or --caption_data_dir, not both")
    if args.validation_prompts and class_sources:
        raise InputError(
            "--validation_prompts is for text data; class-conditional runs take --validation_class_labels"
        )
    if args.validation_class_labels and text_sources:
        raise InputError("--validation_class_labels is for class data; text runs take --validation_prompts")
    if text_sources and args.validation_steps and not args.validation_prompts:
        raise InputError("--validation_steps on text data needs --validation_prompts")


def _check_model_args(args: argparse.Namespace) -> None:
    if args.model_config and args.pretrained_model_name_or_path:
        raise InputError(
            "pass either --model_config (a new transformer) or --pretrained_model_name_or_path (fine-tuning), not both"
        )
    if not args.model_config and not args.pretrained_model_name_or_path:
        raise InputError("pass --model_config (a new transformer) or --pretrained_model_name_or_path (fine-tuning)")
    if not args.vqvae_model_name_or_path and not args.pretrained_model_name_or_path:
        raise InputError("pass --vqvae_model_name_or_path (or a --pretrained_model_name_or_path with a vqvae)")
    lora_options = [flag for flag, default in (("lora_alpha", None), ("lora_dropout", 0.0),
                    ("lora_target_modules", LORA_TARGET_MODULES)) if getattr(args, flag) != default]  # fmt: skip
    if args.lora_rank is None and lora_options:
        raise InputError(f"{', '.join('--' + flag for flag in lora_options)} configure LoRA: add --lora_rank")
    if args.lora_rank is not None:
        if not args.pretrained_model_name_or_path:
            raise InputError("--lora_rank fine-tunes a pretrained transformer: pass --pretrained_model_name_or_path")
        if args.lora_rank < 1:
            raise InputError(f"--lora_rank must be a positive integer, got {args.lora_rank}")
        if importlib.util.find_spec("peft") is None:
            raise InputError('--lora_rank needs peft: pip install "enat-diffusers[train]"')
        if args.lora_alpha is not None and not args.lora_alpha > 0:
            raise InputError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
        if not 0 <= args.lora_dropout < 1:
            raise InputError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.train_text_encoder and (args.lora_rank is None or not _data_sources(args)[1]):
        raise InputError("--train_text_encoder trains a text encoder LoRA: it needs --lora_rank and text data")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            "--use_8bit_adam needs bitsandbytes (8-bit optimizers, for CUDA GPUs): pip install bitsandbytes"
        )
    if args.new_classes:
        if not args.pretrained_model_name_or_path:
            raise InputError("--new_classes adds classes to a pretrained model: pass --pretrained_model_name_or_path")
        parse_class_init(args.class_init)
    elif args.class_init != ["mean"]:
        raise InputError("--class_init sets the embeddings of new classes: it goes with --new_classes")


def parse_class_init(values: list[str]) -> dict[str, str]:
    """--class_init -> {new class name: pretrained class (id or name)}; "mean" (the default for the rest) is no pair."""
    pairs = {}
    for value in values:
        if value == "mean":
            continue
        new, separator, old = value.partition("=")
        if not separator or not new.strip() or not old.strip():
            raise InputError(f'--class_init takes "mean" or NEW=OLD pairs (e.g. "rotated seven=seven"), got {value!r}')
        pairs[new.strip()] = old.strip()
    return pairs


def _check_number_args(args: argparse.Namespace) -> None:
    if args.resolution is not None and args.resolution < 1:
        raise InputError(f"--resolution must be a positive integer, got {args.resolution}")
    for flag in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "tokenize_batch_size",
        "num_train_epochs",
        "checkpointing_steps",
        "num_validation_images",
    ):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    for flag in ("max_train_steps", "validation_steps", "checkpoints_total_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if (args.lr_warmup_steps or 0) < 0 or args.dataloader_num_workers < 0:
        raise InputError("--lr_warmup_steps and --dataloader_num_workers must be >= 0")
    if not 0 <= args.reuse_prob <= 1:
        raise InputError(f"--reuse_prob must be in [0, 1], got {args.reuse_prob}")
    for flag in ("cond_drop_prob", "label_smoothing", "ema_decay"):
        if not 0 <= getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if min(args.mask_ratio_beta) <= 0:
        raise InputError(f"--mask_ratio_beta needs two positive numbers, got {args.mask_ratio_beta}")
    if not args.learning_rate > 0:
        raise InputError(f"--learning_rate must be > 0, got {args.learning_rate}")


def _check_output_args(args: argparse.Namespace) -> None:
    report_to = args.report_to
    needed = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": [], "none": []}
    if report_to not in needed:
        raise InputError(f"--report_to must be one of {sorted(needed)}, got {report_to!r}")
    missing = [package for package in needed[report_to] if importlib.util.find_spec(package) is None]
    if missing:
        raise InputError(f"--report_to {report_to} needs {missing[0]}: pip install {missing[0]}")
    resume = args.resume_from_checkpoint
    if resume and resume != "latest" and _checkpoint_path(args) is None:
        raise InputError(f"--resume_from_checkpoint {resume!r} is neither 'latest' nor a checkpoint folder")


def _check_prior_args(args: argparse.Namespace) -> None:
    if not args.with_prior_preservation:
        given = [flag for flag, default in (("class_data_dir", None), ("num_class_images", 20),
                 ("prior_loss_weight", 1.0)) if getattr(args, flag) != default]  # fmt: skip
        if given:
            raise InputError(
                f"{', '.join('--' + flag for flag in given)} configure prior preservation: add --with_prior_preservation"
            )
        return
    if not args.pretrained_model_name_or_path or _data_sources(args)[1]:
        raise InputError(
            "--with_prior_preservation keeps the classes of a pretrained class-conditional model: it needs "
            "--pretrained_model_name_or_path and class data"
        )
    if args.new_classes == "replace":
        raise InputError(
            "--with_prior_preservation keeps the pretrained classes, which --new_classes replace drops; use "
            "--new_classes extend"
        )
    if args.num_class_images < 1:
        raise InputError(f"--num_class_images must be a positive integer, got {args.num_class_images}")
    if not args.prior_loss_weight > 0:
        raise InputError(f"--prior_loss_weight must be > 0, got {args.prior_loss_weight}")
    if args.class_data_dir and not os.path.isdir(args.class_data_dir):
        raise InputError(f"--class_data_dir {args.class_data_dir!r} is not a folder")


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no file reads: which flags go together, and value ranges."""
    _check_data_args(args)
    _check_model_args(args)
    _check_number_args(args)
    _check_prior_args(args)
    _check_output_args(args)


# ----------------------------------------------------------------------------------------------------------------------
# Data listing
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The samples of a run. Images are listed once; several samples (captions) may share an image."""

    image_paths: list[str]  # image files, or for a 🤗 dataset a name per row ("dataset[split][row]")
    image_index: list[int]  # per sample: its image in `image_paths`
    conditions: list  # per sample: a class id (int) or a caption (str)
    text: bool
    id2label: dict[int, str] | None = None
    image_rows: object = None  # a 🤗 dataset: its image column alone, undecoded ({"bytes", "path"} per row)
    prior: list[bool] | None = None  # per sample: a prior-preservation image (--with_prior_preservation)
    prior_plan: "PriorPlan | None" = None  # the kept classes' images, before the missing ones are generated

    def open_image(self, index: int):
        """What `Image.open` takes for image `index`: a file path or a file-like object."""
        if self.image_rows is None:
            return self.image_paths[index]
        entry = next(iter(self.image_rows[index].values()))
        return io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"]

    def __len__(self) -> int:
        return len(self.image_index)


def is_hidden(path: Path, root: Path) -> bool:
    """Whether a part of `path` below `root` is hidden (`.ipynb_checkpoints`, `.DS_Store`, ...): never data."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                  and not is_hidden(path, folder))  # fmt: skip


def visible_subfolders(root: Path) -> list[Path]:
    """The subfolders of `root` that are not hidden, sorted by name: the class folders."""
    return sorted(path for path in root.iterdir() if path.is_dir() and not is_hidden(path, root))


def _require_dir(path: str, flag: str) -> Path:
    if not os.path.isdir(path):
        raise InputError(f"--{flag} {path!r} is not a folder")
    return Path(path)


def _require_files(paths: list[Path], flag: str) -> None:
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise InputError(f"{len(missing)} image(s) named by --{flag} do not exist, e.g. {missing[:3]}")


def list_class_folders(root: Path) -> TrainingData:
    class_dirs = visible_subfolders(root)  # hidden folders (.ipynb_checkpoints) are no classes
    if not class_dirs:
        raise InputError(
            f"--train_data_dir {str(root)!r} has no class subfolders; give one subfolder per class or a --labels_file"
        )
    paths, labels, empty = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        paths += [str(path) for path in files]
        labels += [label] * len(files)
        if not files:
            empty.append(class_dir.name)
    if empty:
        # A class without images would still get an id (and shift nothing), but it could never be learned.
        raise InputError(
            f"--train_data_dir {str(root)!r}: the class folder(s) {empty} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
        )
    id2label = {label: class_dir.name for label, class_dir in enumerate(class_dirs)}
    class_name_ids(id2label, f"the class folders of --train_data_dir {str(root)!r}")  # names of two folders collide
    return TrainingData(paths, list(range(len(paths))), labels, text=False, id2label=id2label)


def _read_labels_file(labels_file: str) -> dict[str, object]:
    if labels_file.endswith(".json"):
        with open(labels_file) as handle:
            mapping = json.load(handle)
        if not isinstance(mapping, dict):
            raise InputError(f"--labels_file {labels_file!r} must hold a json object {{file_name: label}}")
        return mapping
    with open(labels_file, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and not rows[0][-1].strip().lstrip("-").isdigit():
        rows = rows[1:]  # a header row
    if any(len(row) != 2 for row in rows):
        raise InputError(f"--labels_file {labels_file!r}: every csv row must be `file_name,label`")
    return {name.strip(): label.strip() for name, label in rows}


def list_labeled_images(root: Path, labels_file: str) -> TrainingData:
    mapping = _read_labels_file(labels_file)
    names = sorted(mapping)
    try:
        labels = [int(mapping[name]) for name in names]
    except (TypeError, ValueError) as error:
        raise InputError(f"--labels_file {labels_file!r}: labels must be integers ({error})") from None
    if any(label < 0 for label in labels):
        raise InputError(f"--labels_file {labels_file!r}: labels must be >= 0")
    paths = [root / name for name in names]
    _require_files(paths, "labels_file")
    return TrainingData([str(path) for path in paths], list(range(len(paths))), labels, text=False)


def list_coco_captions(captions_json: str, images_dir: Path) -> TrainingData:
    with open(captions_json) as handle:
        coco = json.load(handle)
    try:
        files = {image["id"]: image["file_name"] for image in coco["images"]}
        pairs = [(annotation["image_id"], annotation["caption"].strip()) for annotation in coco["annotations"]]
    except (KeyError, TypeError) as error:
        raise InputError(
            f"--coco_captions_json {captions_json!r} is not a COCO captions file (missing {error})"
        ) from None
    image_ids = sorted({image_id for image_id, _ in pairs})
    unknown = [image_id for image_id in image_ids if image_id not in files]
    if unknown:
        raise InputError(f"--coco_captions_json: captions refer to unknown image ids, e.g. {unknown[:3]}")
    position = {image_id: index for index, image_id in enumerate(image_ids)}
    paths = [images_dir / files[image_id] for image_id in image_ids]
    _require_files(paths, "coco_images_dir")
    return TrainingData(
        [str(path) for path in paths], [position[image_id] for image_id, _ in pairs], [c for _, c in pairs], text=True
    )


def list_caption_folder(root: Path) -> TrainingData:
    paths, image_index, captions = [], [], []
    missing = []
    for path in _image_files(root):
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            missing.append(str(caption_file))
            continue
        lines = [line.strip() for line in caption_file.read_text().splitlines() if line.strip()]
        image_index += [len(paths)] * len(lines)
        captions += lines
        paths.append(str(path))
    if missing:
        raise InputError(f"--caption_data_dir: {len(missing)} image(s) have no caption file, e.g. {missing[:3]}")
    return TrainingData(paths, image_index, captions, text=True)


def _load_dataset(args: argparse.Namespace):
    datasets = require_optional("datasets", "train", "--dataset_name")
    name = args.dataset_name
    try:
        if os.path.isdir(name) and any(
            os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")
        ):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, args.dataset_config_name, data_dir=args.train_data_dir)
    except Exception as error:  # load_dataset reports a missing or unreachable dataset with many error types
        message = (str(error).strip().splitlines() or [""])[0]
        raise InputError(f"--dataset_name {name!r} cannot be loaded ({type(error).__name__}: {message})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if args.dataset_split not in loaded:
            raise InputError(f"--dataset_split {args.dataset_split!r} is not a split of {name!r}: {sorted(loaded)}")
        loaded = loaded[args.dataset_split]
    return datasets, loaded


def _dataset_column(features, flag: str, value: str | None, default: str | None, what: str) -> str:
    column = value or default
    if column not in features:
        raise InputError(
            f"--{flag} {column!r}: the dataset has no such column ({what}); its columns: {list(features)}"
        )
    return column


def list_dataset(args: argparse.Namespace) -> TrainingData:
    """A 🤗 dataset: images from --image_column, class labels from --label_column or captions from --caption_column."""
    datasets, dataset = _load_dataset(args)
    features = dataset.features
    first_image = next((name for name, feature in features.items() if isinstance(feature, datasets.Image)), None)
    image_column = _dataset_column(
        features, "image_column", args.image_column, "image" if "image" in features else first_image, "images"
    )
    if not isinstance(features[image_column], datasets.Image):
        raise InputError(f"--image_column {image_column!r} is a {type(features[image_column]).__name__}, not images")
    rows = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    names = [f"{args.dataset_name}[{args.dataset_split}][{row}]" for row in range(len(dataset))]
    if args.caption_column:
        column = _dataset_column(features, "caption_column", args.caption_column, None, "captions")
        image_index, captions = [], []
        for row, value in enumerate(dataset[column]):
            lines = [value] if isinstance(value, str) else list(value or [])
            lines = [line.strip() for line in lines if isinstance(line, str) and line.strip()]
            image_index += [row] * len(lines)
            captions += lines
        return TrainingData(names, image_index, captions, text=True, image_rows=rows)
    column = _dataset_column(features, "label_column", args.label_column, "label", "class labels; or pass "
                             "--caption_column for text data")  # fmt: skip
    values, feature = dataset[column], features[column]
    if isinstance(feature, datasets.ClassLabel):
        id2label = dict(enumerate(feature.names))
    elif all(isinstance(value, str) for value in values):
        id2label = dict(enumerate(sorted(set(values))))
        values = [{name: i for i, name in id2label.items()}[value] for value in values]
    elif all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values):
        id2label = None
    else:
        raise InputError(f"--label_column {column!r} must hold class ids (integers >= 0), class names or a ClassLabel")
    return TrainingData(names, list(range(len(values))), list(values), text=False, id2label=id2label, image_rows=rows)


def list_training_data(args: argparse.Namespace) -> TrainingData:
    if args.dataset_name:
        data = list_dataset(args)
    elif args.labels_file:
        data = list_labeled_images(_require_dir(args.train_data_dir, "train_data_dir"), args.labels_file)
    elif args.train_data_dir:
        data = list_class_folders(_require_dir(args.train_data_dir, "train_data_dir"))
    elif args.coco_captions_json:
        data = list_coco_captions(args.coco_captions_json, _require_dir(args.coco_images_dir, "coco_images_dir"))
    else:
        data = list_caption_folder(_require_dir(args.caption_data_dir, "caption_data_dir"))
    if not len(data):
        raise InputError("the training data holds no samples (images with labels or captions)")
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Images and the token cache
# ----------------------------------------------------------------------------------------------------------------------


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes of 16-bit grey PNGs (and 32-bit ints)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. 16-bit grey images are scaled (65535 -> 255) rather than clipped, which PIL's
    `convert("RGB")` does (a 16-bit PNG would turn near-white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(source, resolution: int, name: str | None = None) -> torch.Tensor:
    """RGB image (a path or a file-like `source`, called `name` in errors), shorter side resized to `resolution`,
    center crop -> `(3, resolution, resolution)` in [-1, 1]."""
    try:
        with Image.open(source) as image:
            image = to_rgb(image)  # decodes: a truncated or damaged file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"cannot read the image {name or source} ({error}); fix or remove it") from None
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (pixels / 127.5 - 1.0).permute(2, 0, 1)


class ImageDataset(Dataset):
    """The images of the training data (files or 🤗 dataset rows), loaded for tokenization."""

    def __init__(self, data: TrainingData, resolution: int):
        self.data, self.resolution = data, resolution

    def __len__(self) -> int:
        return len(self.data.image_paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, load_image(self.data.open_image(index), self.resolution, self.data.image_paths[index])


def _image_identity(data: TrainingData):
    """Bytes that change when an image changes: path, size and modification time of each file; for a 🤗 dataset the
    bytes of each row's image (or its file's path, size and time)."""
    if data.image_rows is None:
        for path in data.image_paths:
            stat = os.stat(path)
            yield f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode()
        return
    for batch in data.image_rows.iter(batch_size=256):
        for entry in next(iter(batch.values())):
            if entry.get("bytes"):
                yield hashlib.sha256(entry["bytes"]).digest()
            else:
                stat = os.stat(entry["path"])
                yield f"{os.path.abspath(entry['path'])}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode()


def token_cache_path(args: argparse.Namespace, data: TrainingData, vqvae: MaskGITVQModel) -> Path:
    """The cache file: named by a hash of the image list (path, size and modification time of every file), the
    resolution, flips and the VQ model (config + weights). An image replaced or edited in place gets a new size or
    modification time and so a new cache; to force a rebuild otherwise, delete the file or pass another --cache_dir."""
    digest = hashlib.sha256()
    settings = {"version": TOKEN_CACHE_VERSION, "resolution": args.resolution, "random_flip": args.random_flip}
    settings["vq_config"] = {key: value for key, value in vqvae.config.items() if not key.startswith("_")}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for identity in _image_identity(data):
        digest.update(identity)
    for name, tensor in vqvae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    cache_dir = args.cache_dir or os.path.join(huggingface_hub.constants.HF_HOME, "enat_token_cache")
    return Path(os.path.expanduser(cache_dir)) / f"enat_tokens_{digest.hexdigest()[:24]}.safetensors"


@torch.no_grad()
def tokenize_images(vqvae: MaskGITVQModel, data: TrainingData, args, accelerator: Accelerator) -> dict:
    """Encodes every image (and its mirror image with --random_flip), split across processes; every process gets
    all token ids: `{"token_ids": (N, h, w)[, "flipped_token_ids": (N, h, w)]}` as int16 (int32 for large codebooks)."""
    side = args.resolution // vqvae.downsample_factor
    dtype = torch.int16 if vqvae.codebook_size <= torch.iinfo(torch.int16).max else torch.int32
    names = ["token_ids", "flipped_token_ids"] if args.random_flip else ["token_ids"]
    num_images = len(data.image_paths)
    tokens = {name: torch.zeros(num_images, side, side, dtype=dtype) for name in names}
    # Padding gives every process the same number of equally sized batches, as `gather` needs.
    with accelerator.split_between_processes(list(range(num_images)), apply_padding=True) as shard:
        dataset = Subset(ImageDataset(data, args.resolution), shard)
    loader = DataLoader(dataset, batch_size=args.tokenize_batch_size, num_workers=args.dataloader_num_workers)
    for indices, images in tqdm(loader, desc="Tokenizing", disable=not accelerator.is_local_main_process):
        images = images.to(accelerator.device)
        variants = [images, images.flip(-1)][: len(names)]
        encoded = [vqvae.encode(variant).token_ids for variant in variants]
        indices, *encoded = accelerator.gather([indices.to(accelerator.device), *encoded])
        for name, token_ids in zip(names, encoded, strict=True):
            tokens[name][indices.cpu()] = token_ids.cpu().to(dtype)
    return tokens


def _exists_on_every_process(path: Path, accelerator: Accelerator) -> bool:
    found = torch.tensor([int(path.is_file())], device=accelerator.device)
    return bool(accelerator.gather(found).all())


def load_or_build_token_cache(vqvae: MaskGITVQModel, data: TrainingData, args, accelerator: Accelerator) -> dict:
    path = token_cache_path(args, data, vqvae)
    if _exists_on_every_process(path, accelerator):
        logger.info(f"Using the token cache {path}")
        return load_file(path)
    logger.info(f"Tokenizing {len(data.image_paths)} images into {path}")
    tokens = tokenize_images(vqvae, data, args, accelerator)
    if accelerator.is_local_main_process:  # one writer per machine, in case the cache folder is not shared
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{accelerator.process_index}.partial")
        metadata = {"resolution": str(args.resolution), "num_images": str(len(data.image_paths))}
        save_file(tokens, partial, metadata=metadata)
        os.replace(partial, path)  # a build that stops half-way never leaves a cache behind
    accelerator.wait_for_everyone()
    return tokens


class TokenDataset(Dataset):
    """Samples from the token cache: `token_ids` `(V, h, w)` (V = 2 with flips: original, mirrored) and `condition`."""

    def __init__(self, tokens: dict, data: TrainingData):
        names = [name for name in ("token_ids", "flipped_token_ids") if name in tokens]
        self.variants = torch.stack([tokens[name] for name in names], dim=1)
        self.image_index, self.conditions, self.prior = data.image_index, data.conditions, data.prior

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, index: int) -> dict:
        item = {"token_ids": self.variants[self.image_index[index]].long(), "condition": self.conditions[index]}
        if self.prior is not None:
            item["prior"] = self.prior[index]
        return item


def pick_variants(token_ids: torch.LongTensor) -> torch.LongTensor:
    """`(B, V, h, w)` -> `(B, h*w)`: one random variant (original or mirrored) per row. Drawn in the training step,
    not the data loader, so that the random stream is the same whether or not a run was resumed."""
    choice = torch.randint(token_ids.shape[1], (token_ids.shape[0],)).to(token_ids.device)
    return token_ids[torch.arange(token_ids.shape[0], device=token_ids.device), choice].flatten(1)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def _component_source(args: argparse.Namespace, name: str | None, subfolder: str) -> tuple[str, str | None]:
    """(name or path, subfolder) of a component: a model folder/repo of its own (`config.json` at the top), or the
    `subfolder` of a pipeline; without `name`, the `subfolder` of --pretrained_model_name_or_path."""
    if name is None:
        return args.pretrained_model_name_or_path, subfolder
    if os.path.isdir(name):
        return name, None if os.path.isfile(os.path.join(name, "config.json")) else subfolder
    try:
        huggingface_hub.hf_hub_download(name, "config.json", revision=args.revision)
        return name, None
    except (OSError, ValueError):  # not found, offline, or not a repo id: from_pretrained reports it
        return name, subfolder


def _vqvae_source(args: argparse.Namespace) -> tuple[str, str | None]:
    return _component_source(args, args.vqvae_model_name_or_path, "vqvae")


def load_vqvae_config(args: argparse.Namespace) -> dict:
    name, subfolder = _vqvae_source(args)
    config = MaskGITVQModel.load_config(name, subfolder=subfolder, revision=args.revision)
    if config.get("_class_name", "MaskGITVQModel") != "MaskGITVQModel":
        raise InputError(f"the VQ model at {name!r} is a {config['_class_name']}, not a MaskGITVQModel")
    return config


def vq_downsample_factor(vq_config: dict) -> int:
    return 2 ** (len(vq_config["channel_multipliers"]) - 1)


def load_vqvae(args: argparse.Namespace) -> MaskGITVQModel:
    name, subfolder = _vqvae_source(args)
    return (
        MaskGITVQModel.from_pretrained(name, subfolder=subfolder, revision=args.revision).eval().requires_grad_(False)
    )


def load_text_encoder(
    args: argparse.Namespace,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The frozen text encoder and its tokenizer: a text encoder folder/repo (a full CLIP checkpoint loads as
    `CLIPTextModelWithProjection`) or the `text_encoder`/`tokenizer` of a pipeline."""
    name, subfolder = _component_source(args, args.text_encoder_name_or_path, "text_encoder")
    folder_kwargs = {"revision": args.revision, **({"subfolder": subfolder} if subfolder else {})}
    tokenizer_kwargs = {"revision": args.revision, **({"subfolder": "tokenizer"} if subfolder else {})}
    config = transformers.AutoConfig.from_pretrained(name, **folder_kwargs)
    architecture = (config.architectures or ["CLIPModel"])[0]
    model_class = getattr(transformers, architecture, None)
    if architecture == "CLIPModel" or model_class is None:
        model_class = transformers.CLIPTextModelWithProjection
    text_encoder = model_class.from_pretrained(name, **folder_kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, **tokenizer_kwargs)
    return text_encoder.eval().requires_grad_(False), tokenizer


def text_embedding_dims(text_encoder, tokenizer) -> tuple[int, int | None]:
    """Widths of the text encoder's hidden states and pooled embedding (None without one)."""
    with torch.no_grad():
        encoded = encode_text(text_encoder, tokenizer, [""], text_encoder.device)
    pooled = encoded["pooled_text_embeds"]
    return encoded["encoder_hidden_states"].shape[-1], None if pooled is None else pooled.shape[-1]


def _read_model_config(model_config: str) -> dict:
    if os.path.isfile(model_config):
        with open(model_config) as handle:
            return json.load(handle)
    if model_config in ENAT_PRESETS:
        return dict(ENAT_PRESETS[model_config])
    raise InputError(
        f"--model_config {model_config!r} must be a json file of transformer config kwargs or a preset name "
        f"({', '.join(ENAT_PRESETS)})"
    )


def transformer_config(
    args: argparse.Namespace,
    vq_config: dict,
    data: TrainingData,
    text_dims: tuple[int, int | None] | None,
    class_plan: "ClassPlan | None" = None,
) -> dict:
    """The transformer config, with sample_size, codebook_size, num_classes (class data) or text_embed_dim and
    pooled_text_embed_dim (text data) filled in from the VQ model, the data and the text encoder for a new model, and
    checked against them. A pretrained model's num_classes is that of `class_plan` (--new_classes)."""
    if args.pretrained_model_name_or_path:
        config = dict(
            ENATTransformer2DModel.load_config(
                args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision
            )
        )
        if class_plan is not None:
            config["num_classes"] = class_plan.num_classes
    else:
        config = _read_model_config(args.model_config)
        accepted = set(inspect.signature(ENATTransformer2DModel.__init__).parameters) - {"self"}
        unknown = sorted(key for key in config if key not in accepted and not key.startswith("_"))
        if unknown:
            raise InputError(
                f"--model_config has unknown keys {unknown}; ENATTransformer2DModel takes {sorted(accepted)}"
            )
        config.setdefault("sample_size", args.resolution // vq_downsample_factor(vq_config))
        config.setdefault("codebook_size", vq_config["num_vq_embeddings"])
        if data.text:
            config.setdefault("num_classes", None)
            config.setdefault("text_embed_dim", text_dims[0])
            config.setdefault("pooled_text_embed_dim", text_dims[1])
        else:
            config.setdefault("num_classes", max(data.conditions) + 1)
    check_transformer_config(config, args, vq_config, data)
    if data.text:
        check_text_dims(config, text_dims)
    return config


def _config_values(config: dict) -> dict:
    """`config` with the constructor's defaults for missing keys."""
    defaults = {name: p.default for name, p in inspect.signature(ENATTransformer2DModel.__init__).parameters.items()}
    return {key: config.get(key, default) for key, default in defaults.items() if key != "self"}


def check_text_dims(config: dict, text_dims: tuple[int, int | None]) -> None:
    value = _config_values(config)
    if value["text_embed_dim"] != text_dims[0]:
        raise InputError(
            f"the transformer's text_embed_dim ({value['text_embed_dim']}) differs from the text encoder's hidden "
            f"width ({text_dims[0]})"
        )
    pooled = value["pooled_text_embed_dim"]
    if pooled is not None and pooled != text_dims[1]:
        raise InputError(
            f"the transformer's pooled_text_embed_dim ({pooled}) differs from the text encoder's pooled width "
            f"({text_dims[1]})"
        )


def check_transformer_config(config: dict, args: argparse.Namespace, vq_config: dict, data: TrainingData) -> None:
    value = _config_values(config)
    factor = vq_downsample_factor(vq_config)
    if args.resolution // factor != value["sample_size"]:
        raise InputError(
            f"--resolution {args.resolution} gives a {args.resolution // factor}x{args.resolution // factor} token grid "
            f"with this VQ model (factor {factor}), but the transformer's sample_size is {value['sample_size']}"
        )
    if value["codebook_size"] != vq_config["num_vq_embeddings"]:
        raise InputError(
            f"the transformer's codebook_size ({value['codebook_size']}) differs from the VQ model's "
            f"num_vq_embeddings ({vq_config['num_vq_embeddings']})"
        )
    if data.text and value["text_embed_dim"] is None:
        raise InputError("text data needs a text-conditioned transformer (text_embed_dim set, num_classes None)")
    if not data.text:
        if value["num_classes"] is None or max(data.conditions) >= value["num_classes"]:
            raise InputError(
                f"the data has labels up to {max(data.conditions)}, but the transformer has num_classes="
                f"{value['num_classes']}"
                + (
                    "; to train other classes, pass --new_classes replace or extend"
                    if args.pretrained_model_name_or_path
                    else ""
                )  # fmt: skip
            )
        bad = [label for label in args.validation_class_labels or [] if label.isdigit() and
               not 0 <= int(label) < value["num_classes"]]  # fmt: skip
        if bad:
            raise InputError(f"--validation_class_labels must be in [0, {value['num_classes'] - 1}], got {bad}")


def class_names_of(id2label: dict | None, source: str = "the class names") -> ENATClassNames:
    """The class names of `id2label` (comma-separated synonyms) as the pipelines read them ([`ENATClassNames`]),
    which refuses a name listed for two classes; `source` says where the names come from."""
    try:
        return ENATClassNames(id2label)
    except ValueError as error:
        raise InputError(f"{source}: {error} (a comma separates synonyms of one class)") from None


def class_name_ids(id2label: dict | None, source: str = "the class names") -> dict[str, int]:
    """Every name of `id2label` -> its class id (`class_names_of(...).mapping`)."""
    return class_names_of(id2label, source).mapping


def resolve_validation_class_labels(labels: list[str] | None, id2label: dict | None) -> list[int] | None:
    """--validation_class_labels as class ids: ids stay, names are resolved as the pipelines resolve them
    (case-insensitive when unambiguous, close matches named when unknown)."""
    if not labels:
        return None
    names = class_names_of(id2label)
    try:
        return names.ids([int(label) if label.isdigit() else label for label in labels])
    except ValueError as error:
        raise InputError(f"--validation_class_labels: {error}") from None


@dataclass
class ClassPlan:
    """How --new_classes turns the pretrained class embedding into the run's."""

    num_classes: int
    id2label: dict[int, str]
    sources: list[int | None]  # per class of the new model: the pretrained class whose row it starts from, or None
    data_ids: list[int]  # per class of the data (its label): the class id in the new model


def _pretrained_class(value: str, names: dict[str, int], num_classes: int) -> int:
    class_id = int(value) if value.isdigit() else names.get(value)
    if class_id is None or not 0 <= class_id < num_classes:
        raise InputError(
            f"--class_init: {value!r} is not a class of the pretrained model (ids 0..{num_classes - 1} or names "
            f"such as {sorted(names)[:5]})"
        )
    return class_id


def plan_new_classes(args: argparse.Namespace, data: TrainingData, num_classes: int, id2label: dict | None):
    """The classes of the fine-tuned model (--new_classes) and where each class embedding row starts from: an explicit
    --class_init pair, else the pretrained class of the same name, else the mean of the pretrained classes."""
    if data.text:
        raise InputError("--new_classes is for class-conditional data, not captions")
    if not data.id2label:
        raise InputError(
            "--new_classes needs class names: one folder per class (--train_data_dir) or a --label_column with names"
        )
    if num_classes is None:
        raise InputError("--new_classes needs a class-conditional pretrained transformer (num_classes is not set)")
    names = class_name_ids(id2label)
    pairs = parse_class_init(args.class_init)
    data_names = [data.id2label[label] for label in sorted(data.id2label)]
    unknown = sorted(set(pairs) - set(data_names))
    if unknown:
        raise InputError(f"--class_init names {unknown}, which are not classes of the data ({data_names[:10]})")

    def source(name: str) -> int | None:
        if name in pairs:
            return _pretrained_class(pairs[name], names, num_classes)
        return names.get(name)

    if args.new_classes == "replace":
        new_id2label = dict(enumerate(data_names))
        sources = [source(name) for name in data_names]
        data_ids = list(range(len(data_names)))
    else:  # extend: pretrained classes keep their ids (and rows); unknown names are appended
        new_id2label = {int(key): str(value) for key, value in (id2label or {}).items()}
        new_id2label.update(
            {class_id: str(class_id) for class_id in range(num_classes) if class_id not in new_id2label}
        )
        sources, data_ids = list(range(num_classes)), []
        for name in data_names:
            if name in names and name not in pairs:
                data_ids.append(names[name])
                continue
            data_ids.append(len(sources))
            new_id2label[len(sources)] = name
            sources.append(source(name) if name in pairs else None)
        # e.g. a folder "rotated seven, seven": a new class that would share the name "seven" with a pretrained one
        class_name_ids(
            new_id2label,
            "--new_classes extend (a data class named exactly like a pretrained class trains that class; other "
            "names must differ from the pretrained ones)",
        )
    return ClassPlan(len(sources), new_id2label, sources, data_ids)


@dataclass
class PriorPlan:
    """The prior-preservation images of the kept classes (--with_prior_preservation): those found in
    --class_data_dir and how many the pretrained model still has to generate per class."""

    folder: Path
    images: dict[int, list[str]]  # kept class id -> image files found
    folder_names: dict[int, str]  # kept class id -> its subfolder of `folder` (existing, or the class id)
    missing: dict[int, int]  # kept class id -> images to generate

    @property
    def num_missing(self) -> int:
        return sum(self.missing.values())


def plan_prior_images(args: argparse.Namespace, kept: list[int], id2label: dict | None) -> PriorPlan:
    """Which images of the kept classes `kept` --class_data_dir holds (subfolders named by a class name or id) and
    which are missing. A subfolder that names no kept class is refused."""
    folder = Path(args.class_data_dir or Path(args.output_dir) / "class_images")
    names = class_name_ids(id2label)
    images, folder_names = {class_id: [] for class_id in kept}, {class_id: str(class_id) for class_id in kept}
    for subfolder in visible_subfolders(folder) if folder.is_dir() else []:
        class_id = names.get(subfolder.name, int(subfolder.name) if subfolder.name.isdigit() else None)
        if class_id not in images:
            raise InputError(
                f"--class_data_dir {str(folder)!r}: the subfolder {subfolder.name!r} names no class that prior "
                f"preservation keeps (the pretrained classes the data does not train: ids {kept[:10]}"
                f"{'...' if len(kept) > 10 else ''}); rename or remove it"
            )
        images[class_id] += [str(path) for path in _image_files(subfolder)]
        folder_names[class_id] = subfolder.name
    missing = {class_id: max(0, args.num_class_images - len(found)) for class_id, found in images.items()}
    images = {class_id: found[: args.num_class_images] for class_id, found in images.items()}
    return PriorPlan(folder, images, folder_names, missing)


def kept_classes(num_pretrained: int, data: TrainingData) -> list[int]:
    """The pretrained classes (ids below `num_pretrained`) that the data does not train."""
    trained = set(data.conditions)
    return [class_id for class_id in range(num_pretrained) if class_id not in trained]


@torch.no_grad()
def generate_prior_images(args: argparse.Namespace, plan: PriorPlan, device) -> None:
    """Completes `plan` with images of the kept classes drawn by the pretrained pipeline (seeded), written to their
    class subfolders (each file complete or absent)."""
    pipeline = diffusers.DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    pipeline.to(device).set_progress_bar_config(disable=True)
    labels = [class_id for class_id, count in plan.missing.items() for _ in range(count)]
    logger.info(f"Generating {len(labels)} prior-preservation images of {len(plan.missing)} classes in {plan.folder}")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    batch_size = args.tokenize_batch_size
    for start in tqdm(range(0, len(labels), batch_size), desc="Prior images"):
        batch = labels[start : start + batch_size]
        for class_id, image in zip(batch, pipeline(class_labels=batch, generator=generator).images, strict=True):
            subfolder = plan.folder / plan.folder_names[class_id]
            subfolder.mkdir(parents=True, exist_ok=True)
            path = subfolder / f"generated_{len(plan.images[class_id]):05d}.png"
            image.save(path.with_suffix(".partial"), format="PNG")
            os.replace(path.with_suffix(".partial"), path)
            plan.images[class_id].append(str(path))
    plan.missing = dict.fromkeys(plan.missing, 0)


def add_prior_samples(data: TrainingData, plan: PriorPlan) -> None:
    """Appends the kept classes' images to `data` as samples marked `prior`."""
    data.prior = data.prior or [False] * len(data)
    for class_id, paths in sorted(plan.images.items()):
        for path in paths:
            data.image_index.append(len(data.image_paths))
            data.image_paths.append(path)
            data.conditions.append(class_id)
            data.prior.append(True)


def build_transformer(args: argparse.Namespace, config: dict) -> ENATTransformer2DModel:
    if args.pretrained_model_name_or_path:
        return ENATTransformer2DModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision
        )
    return ENATTransformer2DModel.from_config(config)


def check_lora_target_modules(targets: list[str], config: dict) -> None:
    """Every --lora_target_modules name must match a linear layer (peft only fails when none matches)."""
    with torch.device("meta"):  # the module names only: no memory, no initialisation cost
        model = ENATTransformer2DModel.from_config(config)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    unmatched = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear)]
    if unmatched:
        leaves = sorted({re.sub(r"^\w+\.\d+\.", "", name) for name in linear})  # without the block prefix
        raise InputError(f"--lora_target_modules {unmatched} match no linear layer of the transformer; e.g. {leaves}")


def lora_config(args: argparse.Namespace, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha or args.lora_rank,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def add_text_encoder_lora(text_encoder, args: argparse.Namespace) -> None:
    """A trainable LoRA adapter on the frozen text encoder's attention projections (--train_text_encoder)."""
    from peft import inject_adapter_in_model  # (transformers' add_adapter wants a newer peft than the lora extra)

    text_encoder.requires_grad_(False)
    inject_adapter_in_model(lora_config(args, TEXT_ENCODER_LORA_TARGET_MODULES), text_encoder)


def fused_text_encoder(text_encoder, args: argparse.Namespace):
    """A plain text encoder (no LoRA layers) with the trained adapter merged into its weights, for the saved
    pipeline: the adapter is merged in place, then the weights move to a freshly loaded text encoder."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in text_encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {key.replace(".base_layer.", "."): value for key, value in text_encoder.state_dict().items()
             if "lora_" not in key}  # fmt: skip
    fresh, _ = load_text_encoder(args)
    fresh.load_state_dict(state)
    return fresh.to(text_encoder.device)


def add_lora_adapter(model: ENATTransformer2DModel, args: argparse.Namespace, train_class_embedding: bool) -> None:
    """Freezes the transformer and adds a trainable LoRA adapter (--lora_rank, --lora_alpha, --lora_target_modules,
    --lora_dropout); a resized class embedding (new classes) stays trainable, as new rows cannot be learned in a
    low-rank update of the old ones."""
    model.requires_grad_(False)
    model.add_adapter(lora_config(args, args.lora_target_modules))
    if train_class_embedding:
        model.class_embedding.requires_grad_(True)


def create_ema(model: torch.nn.Module, decay: float, device, warmup: bool = True) -> tuple[torch.nn.Module, EMAModel]:
    """The EMA of the trained weights: diffusers' `EMAModel` (updated after every optimizer step and saved with the
    checkpoints) and a frozen eval-mode copy of the transformer that runs with those weights (the reuse "previous
    step", validation, the final pipeline). The copy costs one more set of weights in memory: `EMAModel` keeps its
    own shadow tensors, and reuse training needs the EMA weights inside a module at every step.

    With `warmup` the decay grows as 1 - (1 + t)^-EMA_WARMUP_POWER up to `decay` (EMAModel's use_ema_warmup), so
    the EMA follows the weights in short runs; without, `min_decay=decay` makes it constant from the first step, as in
    the paper's recipe. EMAModel's first update copies the weights after the first optimizer step."""
    ema_model = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    if warmup:
        ema = EMAModel(ema_model.parameters(), decay=decay, use_ema_warmup=True, inv_gamma=1.0,
                       power=EMA_WARMUP_POWER, foreach=True)  # fmt: skip
    else:
        ema = EMAModel(ema_model.parameters(), decay=decay, min_decay=decay, foreach=True)
    return ema_model, ema


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------------


class ClassConditioning:
    """Class labels; a dropped label becomes the null class."""

    def __init__(self, null_class_label: int):
        self.null_class_label = null_class_label

    def drop(self, labels: torch.LongTensor, probability: float) -> torch.LongTensor:
        dropped = torch.rand(labels.shape).to(labels.device) < probability
        return labels.masked_fill(dropped, self.null_class_label)

    def model_kwargs(self, labels: torch.LongTensor) -> dict:
        return {"class_labels": labels}


class TextConditioning:
    """Captions, encoded on the fly by the frozen text encoder; a dropped caption becomes the empty prompt."""

    def __init__(self, text_encoder, tokenizer, device=None, trainable: bool = False):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.device, self.trainable = device, trainable  # trainable: a text encoder LoRA gets gradients

    def drop(self, prompts: list[str], probability: float) -> list[str]:
        dropped = (torch.rand(len(prompts)) < probability).tolist()
        return ["" if drop else prompt for prompt, drop in zip(prompts, dropped, strict=True)]

    def model_kwargs(self, prompts: list[str]) -> dict:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return encode_text(self.text_encoder, self.tokenizer, list(prompts), self.device)


# ----------------------------------------------------------------------------------------------------------------------
# Masking and loss
# ----------------------------------------------------------------------------------------------------------------------


def sample_masking(batch_size: int, num_tokens: int, beta: tuple[float, float], device) -> torch.BoolTensor:
    """One mask ratio ~ Beta for the batch; round(L * ratio) clamped to [1, L-1] random positions masked per row."""
    ratio = torch.distributions.Beta(*map(float, beta)).sample().item()
    num_masked = min(max(round(num_tokens * ratio), 1), num_tokens - 1)
    ranks = torch.rand(batch_size, num_tokens).argsort(dim=1).to(device)  # a random permutation per row
    return ranks < num_masked


def sample_previous_masking(masking: torch.BoolTensor) -> torch.BoolTensor:
    """A "previous sampling step" for reuse training: re-masks round(u * V) of the V visible tokens of every row
    (u ~ U(0, 1), one per batch), so every token masked now was masked then."""
    num_visible = int((~masking[0]).sum())
    num_remasked = round(torch.rand(()).item() * num_visible)
    scores = torch.rand(masking.shape).to(masking.device).masked_fill(masking, 2.0)  # masked tokens sort last
    remasked = torch.zeros_like(masking).scatter_(1, scores.argsort(dim=1)[:, :num_remasked], True)
    return masking | remasked


def masked_token_loss(
    logits: torch.Tensor,
    token_ids: torch.LongTensor,
    masking: torch.BoolTensor,
    label_smoothing: float,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy (with label smoothing) averaged over the masked tokens only. `logits` `(B, K, h, w)`.
    `row_weights` `(B,)`: each row's tokens count this much (prior preservation); the average stays over the masked
    tokens, so weights of 1 give the plain loss."""
    targets = token_ids.masked_fill(~masking, IGNORE_INDEX)
    if row_weights is None:
        return F.cross_entropy(
            logits.flatten(2).float(), targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
        )
    per_token = F.cross_entropy(
        logits.flatten(2).float(),
        targets,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return (per_token * row_weights[:, None].to(per_token)).sum() / masking.sum().clamp(min=1)


@torch.no_grad()
def previous_step_state(reuse_model, input_ids, masking, condition_kwargs, mask_token_id, accelerator):
    """Runs `reuse_model` (EMA, eval mode, no grad) on a more masked copy of `input_ids`; returns its reuse state."""
    previous_ids = input_ids.masked_fill(sample_previous_masking(masking), mask_token_id)
    with accelerator.autocast(), eval_mode(reuse_model):
        return reuse_model(previous_ids, **condition_kwargs).reuse_state


def training_loss(model, reuse_model, batch: dict, conditioning, args, accelerator) -> torch.Tensor:
    """The loss of one micro-batch: mask, maybe build a reuse state with `reuse_model`, predict the masked tokens."""
    token_ids = pick_variants(batch["token_ids"])
    with accelerator.autocast():
        condition_kwargs = conditioning.model_kwargs(conditioning.drop(batch["condition"], args.cond_drop_prob))
    mask_token_id = accelerator.unwrap_model(model).mask_token_id
    masking = sample_masking(*token_ids.shape, args.mask_ratio_beta, token_ids.device)
    input_ids = token_ids.masked_fill(masking, mask_token_id)
    reuse_state = None
    if torch.rand(()).item() < args.reuse_prob:
        reuse_state = previous_step_state(
            reuse_model, input_ids, masking, condition_kwargs, mask_token_id, accelerator
        )
    logits = model(input_ids, **condition_kwargs, reuse_state=reuse_state).logits
    row_weights = None
    if "prior" in batch:  # prior-preservation rows weigh --prior_loss_weight
        row_weights = torch.where(batch["prior"].to(logits.device), args.prior_loss_weight, 1.0)
    return masked_token_loss(logits, token_ids, masking, args.label_smoothing, row_weights)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


class TrainingProgress:
    """The optimizer step count, saved and restored with the accelerator state."""

    def __init__(self):
        self.global_step = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete `checkpoint-N` folders of `output_dir`, oldest (smallest N) first. Folders still being written
    (`checkpoint-N.partial`) are not checkpoints."""
    if not os.path.isdir(output_dir):
        return []
    steps = {
        path: path.name.removeprefix(CHECKPOINT_PREFIX) for path in Path(output_dir).glob(CHECKPOINT_PREFIX + "*")
    }
    found = [path for path, step in steps.items() if path.is_dir() and step.isdigit()]
    return sorted(found, key=lambda path: int(steps[path]))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Records the size and sha256 of every file of `folder` in its CHECKSUMS_FILE (written last)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != CHECKSUMS_FILE)
    sums = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": file_sha256(path)} for path in files
    }
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True))


def checkpoint_damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files against its CHECKSUMS_FILE (None: intact, or written by a version of
    this script without checksums, which cannot be told)."""
    sums_file = folder / CHECKSUMS_FILE
    if not sums_file.is_file():
        return None
    try:
        sums = json.loads(sums_file.read_text())
    except ValueError:
        return f"its {CHECKSUMS_FILE} is unreadable"
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} differs from what was written (checksum mismatch)"
    return None


def select_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint to resume from (None: a new run), its files checked against their checksums: with "latest", a
    damaged checkpoint is skipped with a warning that names it, for the previous one; a named one must be intact."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint != "latest":
        checkpoint = _checkpoint_path(args)
        problem = checkpoint_damage(checkpoint)
        if problem:
            raise InputError(f"--resume_from_checkpoint {str(checkpoint)!r} is damaged: {problem}")
        return checkpoint
    damaged = []
    for checkpoint in reversed(list_checkpoints(args.output_dir)):
        problem = checkpoint_damage(checkpoint)
        if problem is None:
            if damaged:
                warnings.warn(
                    f"--resume_from_checkpoint latest: {'; '.join(damaged)}; resuming from {checkpoint} instead",
                    UserWarning,
                    stacklevel=2,
                )
            return checkpoint
        damaged.append(f"the checkpoint {checkpoint} is damaged ({problem})")
    if damaged:
        raise InputError(
            f"--resume_from_checkpoint latest: every checkpoint is damaged ({'; '.join(damaged)}); remove them to "
            "start anew"
        )
    return None


def _checkpoint_path(args: argparse.Namespace) -> Path | None:
    """The checkpoint --resume_from_checkpoint names (None: start a new run)."""
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (Path(args.resume_from_checkpoint), Path(args.output_dir) / args.resume_from_checkpoint):
        if candidate.is_dir():
            return candidate
    return None


def prune_checkpoints(args: argparse.Namespace) -> None:
    """Removes what a kill left half-written and, with --checkpoints_total_limit, all but the newest checkpoints."""
    for partial in Path(args.output_dir).glob(f"{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}"):
        shutil.rmtree(partial)
    if args.checkpoints_total_limit is not None:
        checkpoints = list_checkpoints(args.output_dir)
        for old in checkpoints[: max(0, len(checkpoints) - args.checkpoints_total_limit)]:
            logger.info(f"Removing checkpoint {old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
            shutil.rmtree(old)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuses to start writing `what` (about `needed` bytes) into `folder` when its disk has less room."""
    free = shutil.disk_usage(folder).free
    if free < needed * SPACE_MARGIN:
        raise InputError(
            f"not enough free disk space in {folder} for {what}: about {_gigabytes(int(needed * SPACE_MARGIN))} "
            f"needed, {_gigabytes(free)} free; free some space or pass an --output_dir on a larger disk"
        )


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def estimated_checkpoint_size(model: torch.nn.Module, ema: EMAModel | None, output_dir: str) -> int:
    """The newest checkpoint's size, or before the first: the weights, AdamW's two float32 moments of the trained
    ones and the EMA's copy of them."""
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        return folder_size(checkpoints[-1])
    trained = tensor_bytes(p.float() for p in model.parameters() if p.requires_grad)
    return tensor_bytes(model.state_dict().values()) + 2 * trained + (trained if ema is not None else 0)


def class_image_digests(data: TrainingData) -> dict[str, str]:
    """Per class id: a digest of its image files (name and size of each; prior images left out), which tells when
    class folders were swapped or renamed. Empty for 🤗 datasets and text data."""
    if data.text or data.image_rows is not None:
        return {}
    files: dict[int, list[str]] = {}
    for sample, (image, condition) in enumerate(zip(data.image_index, data.conditions, strict=True)):
        if data.prior and data.prior[sample]:
            continue
        path = data.image_paths[image]
        files.setdefault(int(condition), []).append(f"{os.path.basename(path)}\0{os.path.getsize(path)}")
    return {str(class_id): hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
            for class_id, names in sorted(files.items())}  # fmt: skip


def describe_run(args: argparse.Namespace, data: TrainingData, config: dict) -> dict:
    """What a checkpoint records of its run and a resume must match: the classes, the LoRA shape and which images
    each class was trained on."""
    info = {
        "num_classes": config.get("num_classes"),
        "lora_rank": args.lora_rank,
        "lora_target_modules": sorted(args.lora_target_modules) if args.lora_rank is not None else None,
        "train_text_encoder": args.train_text_encoder,
    }
    if not data.text:
        id2label = pipeline_settings(args, data).get("id2label") or data.id2label or {}
        info["id2label"] = {str(key): str(value) for key, value in sorted(id2label.items())}
        info["class_images"] = class_image_digests(data)
    return info


def check_resume_matches(checkpoint: Path | None, info: dict) -> None:
    """Refuses, in one sentence, to resume a checkpoint whose run had other classes, another LoRA shape or class
    images under other class ids (folders swapped); warns when the images of a class changed."""
    if checkpoint is None or not (checkpoint / RUN_INFO_FILE).is_file():
        return  # a new run, or a checkpoint of an older train_enat.py (nothing recorded to compare)
    saved = json.loads((checkpoint / RUN_INFO_FILE).read_text())
    changes = [f"{key} {saved.get(key)} -> {info.get(key)}"
               for key in ("num_classes", "lora_rank", "lora_target_modules", "train_text_encoder")
               if saved.get(key) != info.get(key)]  # fmt: skip
    old_names, new_names = saved.get("id2label") or {}, info.get("id2label") or {}
    changes += [f"class {key}: {old_names.get(key)!r} -> {new_names.get(key)!r}"
                for key in sorted(set(old_names) | set(new_names), key=int)
                if old_names.get(key) != new_names.get(key)]  # fmt: skip
    old_images, new_images = saved.get("class_images") or {}, info.get("class_images") or {}
    trained_as = {digest: class_id for class_id, digest in old_images.items()}
    swapped = [f"the images of class {key} ({new_names.get(key)!r}) are those the checkpoint trained as class "
               f"{trained_as[digest]} ({old_names.get(trained_as[digest])!r})"
               for key, digest in new_images.items() if trained_as.get(digest, key) != key]  # fmt: skip
    if changes or swapped:
        shown = (swapped + changes)[:4]
        more = f" and {len(swapped + changes) - 4} more" if len(swapped + changes) > 4 else ""
        raise InputError(
            f"cannot resume {checkpoint}: it was trained with other classes or settings ({'; '.join(shown)}{more}); "
            "resume with the data and settings it was trained with, or start a new run in another --output_dir"
        )
    changed = [key for key, digest in new_images.items() if old_images.get(key) not in (None, digest)]
    if changed:
        warnings.warn(
            f"resuming {checkpoint} with other images in classes {changed[:10]} than it was trained on",
            UserWarning,
            stacklevel=2,
        )


def pipeline_tensors(pipeline):
    """The weights of the pipeline's models (what `save_pretrained` writes, to within configs)."""
    return [tensor for component in pipeline.components.values() if isinstance(component, torch.nn.Module)
            for tensor in component.state_dict().values()]  # fmt: skip


def write_run_info(folder: Path, run_info: dict) -> None:
    (folder / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=1, sort_keys=True))


def save_checkpoint(
    accelerator: Accelerator,
    args: argparse.Namespace,
    global_step: int,
    run_info: dict | None = None,
    needed_bytes: int = 0,
) -> Path:
    """Writes `checkpoint-N` so that a kill at any moment leaves only complete checkpoints behind: every process
    writes its part into `checkpoint-N.partial`, which is renamed once all parts are there; older checkpoints are
    pruned only after that (the output folder is shared by the processes, as accelerate's save_state expects). The
    checkpoint also holds `run_info` (RUN_INFO_FILE) and the checksums of its files (CHECKSUMS_FILE, written last).
    A disk with less than `needed_bytes` free is refused before writing."""
    final = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{global_step}"
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # from a run killed while writing this step
    if accelerator.is_main_process and needed_bytes:
        check_free_space(args.output_dir, needed_bytes, f"the checkpoint of step {global_step}")
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_run_info(partial, run_info or {})
            write_checksums(partial)
    except OSError as error:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise InputError(
            f"writing the checkpoint of step {global_step} to {args.output_dir} failed ({error.strerror or error}); "
            "free some disk space (or pass an --output_dir on a larger disk) and resume with "
            "--resume_from_checkpoint latest"
        ) from None
    if accelerator.is_main_process:
        if final.exists():  # the same step from an earlier run: the new state replaces it
            stale = final.with_name(final.name + ".stale")
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
        prune_checkpoints(args)
    accelerator.wait_for_everyone()
    logger.info(f"Saved state to {final}")
    return final


# ----------------------------------------------------------------------------------------------------------------------
# Pipelines: validation and the final folder
# ----------------------------------------------------------------------------------------------------------------------


def warn_about_renamed_classes(args: argparse.Namespace, data: TrainingData) -> None:
    """Without --new_classes, class folder i trains the pretrained class i under the folder's name: say so when the
    names differ (fine-tuning ImageNet classes on folders named after them is fine; other classes need
    --new_classes)."""
    index = diffusers.DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    names = {int(key): str(value) for key, value in (index.get("id2label") or {}).items()}
    renamed = [f"{names[i]!r} -> {name!r}" for i, name in sorted(data.id2label.items())
               if i in names and name not in class_name_ids({i: names[i]})]  # fmt: skip
    if renamed:
        warnings.warn(
            f"without --new_classes, the data's classes train the pretrained classes of the same ids under new names "
            f"({', '.join(renamed[:3])}{', ...' if len(renamed) > 3 else ''}); pass --new_classes replace or extend "
            "to give the model these classes instead",
            UserWarning,
            stacklevel=2,
        )


def pipeline_settings(args: argparse.Namespace, data: TrainingData) -> dict:
    """Pipeline config entries: those of the pretrained pipeline, with the class names of the data."""
    settings = {}
    if args.pretrained_model_name_or_path:
        index = diffusers.DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
        keys = ("default_num_inference_steps", "default_guidance_scale") + (() if data.text else ("id2label",))
        settings = {key: index[key] for key in keys if index.get(key) is not None}
    if data.id2label and args.pretrained_model_name_or_path and not args.new_classes and not data.text:
        settings["id2label"] = fine_tuned_id2label(settings.get("id2label"), data.id2label)
    elif data.id2label:
        settings["id2label"] = data.id2label
    return settings


def fine_tuned_id2label(pretrained: dict | None, data_id2label: dict[int, str]) -> dict[int, str]:
    """Without --new_classes the model keeps every pretrained class: the pretrained names, where the data names a
    class differently its name instead (a data name that is a synonym of that class keeps the pretrained entry).
    Refuses names that would then belong to two classes."""
    merged = {int(key): str(value) for key, value in (pretrained or {}).items()}
    for class_id, name in data_id2label.items():
        if name not in class_name_ids({class_id: merged.get(class_id, "")}):
            merged[class_id] = name
    class_name_ids(
        merged,
        "without --new_classes (class folder i trains pretrained class i under the folder's name; --new_classes "
        "extend trains classes by name)",
    )
    return dict(sorted(merged.items()))


def load_scheduler(args: argparse.Namespace, codebook_size: int) -> ENATScheduler:
    if args.pretrained_model_name_or_path:
        return ENATScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
        )
    return ENATScheduler(mask_token_id=codebook_size)


def make_pipeline(transformer, components: dict, settings: dict):
    """An ENATText2ImagePipeline when `components` hold a text encoder, else an ENATPipeline."""
    pipeline_class = ENATText2ImagePipeline if "text_encoder" in components else ENATPipeline
    pipeline = pipeline_class(transformer=transformer, **components, **settings)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def validation_inputs(pipeline, args: argparse.Namespace) -> dict:
    """The conditions of the validation images: prompts, or class ids (default: the first four classes)."""
    if isinstance(pipeline, ENATText2ImagePipeline):
        return {"prompt": args.validation_prompts, "num_images_per_prompt": args.num_validation_images}
    labels = args.validation_class_labels or list(range(min(4, pipeline.transformer.config.num_classes)))
    return {"class_labels": labels, "num_images_per_prompt": args.num_validation_images}


def validation_row_labels(pipeline, args: argparse.Namespace) -> list[str]:
    """What each grid row shows: its prompt, or its class id and first class name."""
    inputs = validation_inputs(pipeline, args)
    if "prompt" in inputs:
        return list(inputs["prompt"])
    id2label = {int(key): str(value) for key, value in (pipeline.config.get("id2label") or {}).items()}
    return [f"{label}: {id2label[label].split(',')[0]}" if label in id2label else str(label)
            for label in inputs["class_labels"]]  # fmt: skip


def validation_grid(images: list[Image.Image], row_labels: list[str], columns: int) -> Image.Image:
    """One row per class / prompt under a band that names it; images upscaled (nearest neighbour, an integer factor)
    to at least VALIDATION_CELL_SIZE pixels, so that small images stay readable."""
    scale = max(1, math.ceil(VALIDATION_CELL_SIZE / min(images[0].size)))
    width, height = images[0].width * scale, images[0].height * scale
    row_height = VALIDATION_LABEL_HEIGHT + height
    grid = Image.new("RGB", (columns * width, len(row_labels) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(row_labels):
        while len(label) > 1 and draw.textlength(label) > grid.width - 4:
            label = label[:-4] + "..."
        draw.text((2, row * row_height + 2), label, fill="black")
        for column in range(columns):
            image = images[row * columns + column].convert("RGB")
            cell = image.resize((width, height), Image.Resampling.NEAREST)
            grid.paste(cell, (column * width, row * row_height + VALIDATION_LABEL_HEIGHT))
    return grid


def generate_validation_images(pipeline, args: argparse.Namespace, accelerator: Accelerator) -> list:
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    with accelerator.autocast():
        return pipeline(
            **validation_inputs(pipeline, args),
            num_inference_steps=args.validation_num_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            generator=generator,
        ).images


def log_validation(pipeline, args: argparse.Namespace, accelerator: Accelerator, global_step: int) -> Path:
    """Generates the validation images, saves them as one grid (a row per class / prompt) and logs them."""
    with eval_mode(pipeline.transformer):
        images = generate_validation_images(pipeline, args, accelerator)
    grid = validation_grid(images, validation_row_labels(pipeline, args), args.num_validation_images)
    path = Path(args.output_dir) / "validation" / f"step-{global_step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), global_step, None, dataformats="NHWC"
            )
    logger.info(f"Saved validation images to {path}")
    return path


def lora_file_contents(
    transformer: ENATTransformer2DModel, id2label: dict | None, text_encoder=None
) -> tuple[dict, dict]:
    """Tensors and metadata of `pytorch_lora_weights.safetensors`, in the format the pipelines' `load_lora_weights`
    reads: `transformer.<peft key>` tensors (and `text_encoder.<peft key>` with a text encoder LoRA), diffusers'
    `lora_adapter_metadata` (the LoRA configs, keys prefixed `transformer.` / `text_encoder.`), and for new classes
    the whole resized `transformer.class_embedding.weight` with the class names in `id2label`."""
    from peft.utils import get_peft_model_state_dict

    state_dict, config = {}, {}
    for prefix, module in (("transformer", transformer), ("text_encoder", text_encoder)):
        if module is None:
            continue
        state_dict.update({f"{prefix}.{key}": value for key, value in get_peft_model_state_dict(module).items()})
        module_config = module.peft_config[next(iter(module.peft_config))].to_dict()
        config.update({f"{prefix}.{key}": sorted(value) if isinstance(value, set) else value
                       for key, value in module_config.items()})  # fmt: skip
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True, default=str)}
    if getattr(transformer, "class_embedding", None) is not None and transformer.class_embedding.weight.requires_grad:
        state_dict["transformer.class_embedding.weight"] = transformer.class_embedding.weight
        metadata["id2label"] = json.dumps({str(key): value for key, value in sorted((id2label or {}).items())})
    return {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}, metadata


def save_lora_weights(
    transformer: ENATTransformer2DModel, output_dir: str, id2label: dict | None, text_encoder=None
) -> None:
    tensors, metadata = lora_file_contents(transformer, id2label, text_encoder)
    save_file(tensors, os.path.join(output_dir, LORA_WEIGHT_NAME), metadata=metadata)


def final_transformer(
    model, ema_model, args: argparse.Namespace, accelerator: Accelerator, id2label: dict | None, text_encoder=None
):
    """The weights to ship: the EMA weights, or the trained model with its LoRA adapter (and the text encoder's, if
    trained) saved and then fused."""
    if ema_model is not None:
        return ema_model
    transformer = accelerator.unwrap_model(model)
    if args.lora_rank is not None:
        save_lora_weights(transformer, args.output_dir, id2label, text_encoder)
        transformer.fuse_lora()
        transformer.unload_lora()
    return transformer.eval()


def data_source(args: argparse.Namespace) -> str:
    if getattr(args, "dataset_name", None):
        config = f" ({args.dataset_config_name})" if args.dataset_config_name else ""
        return f"the dataset `{args.dataset_name}`{config}"
    folder = args.train_data_dir or args.caption_data_dir or args.coco_images_dir
    return f"the images in `{Path(folder).name}`"


def training_summary(args: argparse.Namespace, data: TrainingData, global_step: int) -> str:
    """The "Training" section of the model card: base model, data, method."""
    start = f"`{args.base_model}`" if args.base_model else f"a new transformer ({args.model_config})"
    if args.lora_rank:
        alpha = args.lora_alpha or args.lora_rank
        method = (
            f"LoRA (rank {args.lora_rank}, alpha {alpha:g}, dropout {args.lora_dropout:g}, on "
            f"{', '.join(args.lora_target_modules)}; fused into the weights of this folder, the adapter alone in "
            f"`{LORA_WEIGHT_NAME}`)"
        )
    else:
        ema = f"EMA with warm-up up to {args.ema_decay}" if args.ema_warmup else f"EMA {args.ema_decay}"
        method = f"all weights, {ema}"
    kind = "captions" if data.text else "class labels"
    lines = [
        f"Trained with `examples/train_enat.py` of enat-diffusers from {start} on {data_source(args)}: {global_step} "
        f"steps, {len(data)} samples ({len(data.image_paths)} images, {kind}) at {args.resolution} px, learning "
        f"rate {args.learning_rate}, {method}, reuse probability {args.reuse_prob}."
    ]
    if args.new_classes:
        names = ", ".join(f"{key}: {value}" for key, value in sorted((data.id2label or {}).items()))
        lines.append(
            f"Classes ({args.new_classes} the pretrained ones; new embeddings from {args.class_init}): {names}."
        )
    if args.lora_rank and args.base_model:
        lines.append(
            f"To apply the adapter to the base model: `pipe = DiffusionPipeline.from_pretrained({args.base_model!r})` "
            "then `pipe.load_lora_weights(<this folder or repo>)`."
        )
    return "\n## Training\n\n" + "\n\n".join(lines) + "\n"


def _hub_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def create_hub_repo(args: argparse.Namespace) -> str:
    """Creates the Hub repo of --push_to_hub (or finds it) at start-up, so that an unreachable Hub or a missing token
    stops the run before any training; returns its id."""
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        return huggingface_hub.HfApi(token=args.hub_token).create_repo(name, exist_ok=True).repo_id
    except HUB_ERRORS as error:
        raise InputError(
            f"--push_to_hub: cannot create the Hub repo {name!r} ({_hub_error(error)}); check the connection and the "
            "token (`hf auth login` or --hub_token), or train without --push_to_hub and upload the output folder later"
        ) from None


def push_to_hub(args: argparse.Namespace, repo_id: str) -> None:
    """Uploads --output_dir with its model card (without checkpoints and tracker logs)."""
    try:
        huggingface_hub.HfApi(token=args.hub_token).upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{args.logging_dir}/*"],
        )
    except HUB_ERRORS as error:
        raise InputError(
            f"training finished and the pipeline is saved in {args.output_dir}, but the upload to {repo_id} failed "
            f"({_hub_error(error)}); upload it later with `hf upload {repo_id} {args.output_dir}`"
        ) from None
    logger.info(f"Uploaded {args.output_dir} to {repo_id}")


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
        # The same shuffling on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Steps without a reuse state leave the reuse projection unused.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_info()
    else:
        diffusers.utils.logging.set_verbosity_error()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def prepare_data(args: argparse.Namespace) -> tuple[TrainingData, dict, dict, ClassPlan | None]:
    """Lists the data and reads the model configs (and, for text data, loads the text encoder), checking they fit,
    before any heavy work. Returns the data (labels in the ids of the trained model), the transformer config, the text
    components (empty for class data) and, with --new_classes, the plan of the new class embedding."""
    vq_config = load_vqvae_config(args)
    factor = vq_downsample_factor(vq_config)
    if args.resolution is None:  # the size the pretrained transformer draws, else the paper's
        args.resolution = DEFAULT_RESOLUTION
        if args.pretrained_model_name_or_path:
            pretrained = ENATTransformer2DModel.load_config(
                args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision
            )
            args.resolution = pretrained["sample_size"] * factor
    if args.resolution % factor:
        raise InputError(f"--resolution {args.resolution} must be a multiple of the VQ downsampling factor {factor}")
    data = list_training_data(args)
    text_components, text_dims = {}, None
    if data.text:
        text_encoder, tokenizer = load_text_encoder(args)
        text_components = {"text_encoder": text_encoder, "tokenizer": tokenizer}
        text_dims = text_embedding_dims(text_encoder, tokenizer)
    class_plan = None
    if args.new_classes:
        pretrained = ENATTransformer2DModel.load_config(
            args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision
        )
        index = diffusers.DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
        class_plan = plan_new_classes(args, data, pretrained.get("num_classes"), index.get("id2label"))
        data.conditions = [class_plan.data_ids[label] for label in data.conditions]
        data.id2label = class_plan.id2label
    if args.with_prior_preservation:
        pretrained = ENATTransformer2DModel.load_config(
            args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision
        )
        index = diffusers.DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
        kept = kept_classes(pretrained.get("num_classes") or 0, data)
        if not kept:
            raise InputError(
                "--with_prior_preservation: the data trains every pretrained class; there is none to keep"
            )
        data.prior_plan = plan_prior_images(args, kept, index.get("id2label"))
    config = transformer_config(args, vq_config, data, text_dims, class_plan)
    if args.lora_rank is not None:
        check_lora_target_modules(args.lora_target_modules, config)
    if not data.text and args.pretrained_model_name_or_path and not args.new_classes and data.id2label:
        warn_about_renamed_classes(args, data)
    if not data.text:
        id2label = pipeline_settings(args, data).get("id2label")
        args.validation_class_labels = resolve_validation_class_labels(args.validation_class_labels, id2label)
    return data, config, text_components, class_plan


def count_train_steps(args: argparse.Namespace, num_samples: int, num_processes: int) -> int:
    """--max_train_steps, else --num_train_epochs of optimizer steps over `num_samples` samples."""
    batches = math.ceil(num_samples / args.train_batch_size)
    steps_per_epoch = math.ceil(batches / num_processes / args.gradient_accumulation_steps)
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch


def warmup_steps(args: argparse.Namespace, max_train_steps: int) -> int:
    """--lr_warmup_steps, or by default the paper's warm-up capped to WARMUP_FRACTION of the run."""
    if args.lr_warmup_steps is not None:
        return args.lr_warmup_steps
    return min(PAPER_WARMUP_STEPS, math.floor(WARMUP_FRACTION * max_train_steps))


def warn_about_no_op_settings(args: argparse.Namespace, max_train_steps: int) -> None:
    """Warns, before any training, about settings under which the run would save (nearly) what it started from."""
    warmup = warmup_steps(args, max_train_steps)
    if warmup >= max_train_steps and args.lr_scheduler != "constant":
        warnings.warn(
            f"--lr_warmup_steps {warmup} is not shorter than the run ({max_train_steps} steps): the learning rate "
            f"rises to only {max_train_steps / warmup:.0%} of --learning_rate by the last step; leave out "
            f"--lr_warmup_steps (default: at most {WARMUP_FRACTION:.0%} of the run) or give fewer",
            UserWarning,
            stacklevel=2,
        )
    if args.lora_rank is None and not args.ema_warmup:
        start_share = args.ema_decay ** max(0, max_train_steps - 1)  # EMAModel's first update copies the weights
        if start_share > EMA_STALE_SHARE:
            warnings.warn(
                f"--ema_decay {args.ema_decay} with --no-ema_warmup over {max_train_steps} steps: the saved (EMA) "
                f"weights would still be {start_share:.0%} the weights of the first step, so the run would save "
                f"about what it started from; drop --no-ema_warmup (the EMA warm-up follows short runs) or lower "
                f"--ema_decay below {EMA_STALE_SHARE ** (1 / max(1, max_train_steps - 1)):.4f}",
                UserWarning,
                stacklevel=2,
            )


def peak_learning_rate(args: argparse.Namespace, total_batch_size: int) -> float:
    """--learning_rate, scaled to the total batch size with --scale_lr."""
    if args.scale_lr:
        return args.learning_rate * total_batch_size / PAPER_TOTAL_BATCH_SIZE
    return args.learning_rate


def create_optimizer(models: list[torch.nn.Module], args: argparse.Namespace, learning_rate: float):
    parameters = [parameter for model in models for parameter in model.parameters() if parameter.requires_grad]
    optimizer_class = torch.optim.AdamW
    if args.use_8bit_adam:  # checked to import with the arguments
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def build_models(
    args: argparse.Namespace, config: dict, device, class_plan: ClassPlan | None = None
) -> tuple[ENATTransformer2DModel, torch.nn.Module | None, EMAModel | None]:
    """The transformer to train (with new classes and a LoRA adapter if asked), its EMA copy and the EMA (both None
    with LoRA)."""
    model = build_transformer(args, config)
    if class_plan is not None:
        model.resize_class_embedding(sources=class_plan.sources)
    if args.lora_rank is not None:
        add_lora_adapter(model, args, train_class_embedding=class_plan is not None)
    ema_model, ema = (None, None)
    if args.lora_rank is None:
        ema_model, ema = create_ema(model, args.ema_decay, device, warmup=args.ema_warmup)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train(), ema_model, ema


def create_conditioning(data: TrainingData, text_components: dict, model, device, text_encoder=None):
    """`text_encoder`: the text encoder as prepared by accelerate (when it trains a LoRA), else the frozen one."""
    if not data.text:
        return ClassConditioning(model.null_class_label)
    trainable = text_encoder is not None
    text_encoder = text_encoder if trainable else text_components["text_encoder"].to(device)
    return TextConditioning(text_encoder, text_components["tokenizer"], device=device, trainable=trainable)


def create_train_dataloader(tokens: dict, data: TrainingData, args: argparse.Namespace) -> DataLoader:
    # A generator of its own keeps the loader from drawing on the global random state (see `pick_variants`).
    generator = torch.Generator().manual_seed(args.seed)
    return DataLoader(TokenDataset(tokens, data), batch_size=args.train_batch_size, shuffle=True, generator=generator)


@dataclass
class TrainingRun:
    """Everything the training loop touches, after `accelerator.prepare`."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    ema: EMAModel | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: DataLoader
    conditioning: object
    progress: TrainingProgress
    max_train_steps: int
    pipeline_parts: tuple[dict, dict]  # components and settings of the validation / final pipelines
    learning_rate: float  # after warm-up (and --scale_lr)
    hub_repo_id: str | None = None
    checkpoint: Path | None = None  # the checkpoint to resume from (checked intact and matching)
    run_info: dict | None = None  # recorded in every checkpoint (`describe_run`)

    @property
    def reuse_model(self) -> torch.nn.Module:
        """The model that computes the "previous step" of reuse training: the EMA model, else the trained one."""
        return self.ema_model if self.ema_model is not None else self.accelerator.unwrap_model(self.model)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataloader) / self.args.gradient_accumulation_steps)


def resume(run: TrainingRun) -> None:
    """Loads --resume_from_checkpoint (model, optimizer, lr scheduler, EMA, step count, random states), if any."""
    args = run.args
    checkpoint = run.checkpoint
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info("No checkpoint to resume from: starting a new training run.")
    if checkpoint is not None:
        logger.info(f"Resuming from checkpoint {checkpoint}")
        try:
            run.accelerator.load_state(str(checkpoint))
        except (OSError, RuntimeError, ValueError, SafetensorError) as error:
            message = (str(error).strip().splitlines() or [""])[0]
            raise InputError(
                f"the checkpoint {checkpoint} cannot be loaded ({type(error).__name__}: {message}); remove it to "
                "resume from the previous one"
            ) from None
        if run.ema is not None and run.ema.optimization_step != run.progress.global_step:
            # EMAModel.load_state_dict ignores a state without its keys: a checkpoint of an older train_enat.py (the
            # EMA saved as a module state dict) would silently restart the EMA from the current weights.
            raise InputError(
                f"checkpoint {checkpoint} holds no EMA state of diffusers' EMAModel at step {run.progress.global_step} "
                "(written by an older train_enat.py?); resume it with the script version that wrote it"
            )
        if run.ema is not None:  # the EMA state loads on the CPU
            run.ema.to(run.accelerator.device)
            run.ema.copy_to(run.ema_model.parameters())
        logger.info(
            f"Resumed at step {run.progress.global_step}: learning rate now {run.lr_scheduler.get_last_lr()[0]:.3g}"
        )
    if run.accelerator.is_main_process:
        # Steps logged after the checkpoint by the run that stopped are trained (and logged) again.
        truncate_log(run.args, run.progress.global_step)


def optimization_step(run: TrainingRun, batch: dict) -> float:
    """Forward and backward of one micro-batch (an optimizer step once gradients are accumulated); returns its loss
    averaged over processes."""
    args, accelerator = run.args, run.accelerator
    with accelerator.accumulate(run.model):
        loss = training_loss(run.model, run.reuse_model, batch, run.conditioning, args, accelerator)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
    return accelerator.gather(loss.detach()).mean().item()


def after_optimizer_step(run: TrainingRun, epoch: int, loss: float, progress_bar) -> None:
    """EMA update, step count, logs, checkpoint and validation after each optimizer step."""
    args, accelerator = run.args, run.accelerator
    if run.ema is not None:
        run.ema.step(accelerator.unwrap_model(run.model).parameters())
        run.ema.copy_to(run.ema_model.parameters())
    run.progress.global_step += 1
    step = run.progress.global_step
    logs = {"loss": loss, "lr": run.lr_scheduler.get_last_lr()[0]}
    progress_bar.update(1)
    progress_bar.set_postfix(**logs)
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        append_log(args, {"step": step, "epoch": epoch, **logs})
    if step % args.checkpointing_steps == 0 or step == run.max_train_steps:
        # Also at the last step: a rerun of a finished run (or after a kill while saving the outputs) resumes there
        # and trains nothing.
        needed = estimated_checkpoint_size(accelerator.unwrap_model(run.model), run.ema, args.output_dir)
        save_checkpoint(accelerator, args, step, run.run_info, needed)
    if args.validation_steps and step % args.validation_steps == 0 and accelerator.is_main_process:
        log_validation(make_pipeline(run.reuse_model, *run.pipeline_parts), args, accelerator, step)


def train(run: TrainingRun) -> None:
    """Runs optimizer steps from the current step count to `max_train_steps`, continuing a resumed epoch where the
    checkpoint left it."""
    args, accelerator = run.args, run.accelerator
    if run.progress.global_step >= run.max_train_steps:
        logger.info(
            f"Step {run.progress.global_step} reached --max_train_steps {run.max_train_steps}: nothing to train"
        )
        return
    first_epoch, resumed_steps = divmod(run.progress.global_step, run.steps_per_epoch)
    progress_bar = tqdm(
        range(run.max_train_steps),
        initial=run.progress.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(first_epoch, math.ceil(run.max_train_steps / run.steps_per_epoch)):
        run.dataloader.set_epoch(epoch)
        loader = run.dataloader
        if epoch == first_epoch and resumed_steps:
            loader = accelerator.skip_first_batches(loader, resumed_steps * args.gradient_accumulation_steps)
        losses = []  # of the micro-batches of this optimizer step (fewer at the end of an epoch)
        for batch in loader:
            losses.append(optimization_step(run, batch))
            if accelerator.sync_gradients:
                after_optimizer_step(run, epoch, sum(losses) / len(losses), progress_bar)
                losses = []
                if run.progress.global_step >= run.max_train_steps:
                    break
        if run.progress.global_step >= run.max_train_steps:
            break
    progress_bar.close()


def save_outputs(run: TrainingRun, data: TrainingData) -> None:
    """Writes the pipeline folder (and the LoRA adapter) to --output_dir and pushes it if asked."""
    args, accelerator = run.args, run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        components, settings = run.pipeline_parts
        text_encoder = components.get("text_encoder") if args.train_text_encoder else None
        transformer = final_transformer(run.model, run.ema_model, args, accelerator, settings.get("id2label"),
                                        text_encoder)  # fmt: skip
        if text_encoder is not None:
            components = {**components, "text_encoder": fused_text_encoder(text_encoder, args)}
        pipeline = make_pipeline(transformer, components, settings)
        check_free_space(args.output_dir, tensor_bytes(pipeline_tensors(pipeline)), "the final pipeline")
        try:
            pipeline.save_pretrained(args.output_dir)
        except OSError as error:
            raise InputError(
                f"writing the pipeline to {args.output_dir} failed ({error.strerror or error}); free some disk space "
                "and rerun with --resume_from_checkpoint latest (it trains nothing more and writes the pipeline)"
            ) from None
        repo_id = run.hub_repo_id or Path(args.output_dir).resolve().name
        summary = training_summary(args, data, run.progress.global_step)
        card = pipeline.model_card(repo_id, token=args.hub_token, local=not args.push_to_hub)  # no Hub unless pushing
        (Path(args.output_dir) / "README.md").write_text(card + summary)
        logger.info(f"Saved the pipeline and its model card to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(args, run.hub_repo_id)
    accelerator.end_training()


def append_log(args: argparse.Namespace, record: dict) -> None:
    with open(os.path.join(args.output_dir, TRAINING_LOG), "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(args: argparse.Namespace, global_step: int) -> None:
    """Keeps the records of steps up to `global_step` in the training log (none for a new run), so that every step
    appears once after a resume."""
    path = Path(args.output_dir) / TRAINING_LOG
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # e.g. a line cut short by a kill
            if json.loads(line)["step"] <= global_step:
                kept.append(line)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)


def log_run_info(run: TrainingRun, data: TrainingData, total_batch_size: int) -> None:
    loggable = {key: value for key, value in vars(run.args).items() if isinstance(value, (int, float, str, bool))}
    run.accelerator.init_trackers(run.args.tracker_project_name, loggable)
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(data)} ({len(data.image_paths)} images)")
    logger.info(f"  Instantaneous batch size per device = {run.args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    # The optimizer's rate at this point is the start of the warm-up (0), not the rate being trained with.
    scaled = f", scaled from {run.args.learning_rate:.3g} by --scale_lr" if run.args.scale_lr else ""
    logger.info(
        f"  Learning rate = {run.learning_rate:.3g} ({run.args.lr_scheduler}, "
        f"{warmup_steps(run.args, run.max_train_steps)} warm-up "
        f"steps{scaled})"
    )
    logger.info(f"  Total optimization steps = {run.max_train_steps}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data, config, text_components, class_plan = prepare_data(args)
    checkpoint = select_checkpoint(args)  # intact (a damaged "latest" falls back to the previous one) ...
    run_info = describe_run(args, data, config)
    check_resume_matches(checkpoint, run_info)  # ... and of the same classes, LoRA shape and class images
    accelerator = create_accelerator(args)
    warn_about_no_op_settings(args, count_train_steps(args, len(data), accelerator.num_processes))
    hub_repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            hub_repo_id = create_hub_repo(args)

    if data.prior_plan is not None:
        if data.prior_plan.num_missing and accelerator.is_main_process:
            generate_prior_images(args, data.prior_plan, accelerator.device)
        accelerator.wait_for_everyone()
        if data.prior_plan.num_missing:  # the other processes list what the main process wrote
            data.prior_plan = plan_prior_images(
                args, list(data.prior_plan.images), pipeline_settings(args, data).get("id2label")
            )
        add_prior_samples(data, data.prior_plan)
    set_seed(args.seed)  # the same initial weights on every process
    vqvae = load_vqvae(args).to(accelerator.device)
    tokens = load_or_build_token_cache(vqvae, data, args, accelerator)
    model, ema_model, ema = build_models(args, config, accelerator.device, class_plan)
    trained = [model]
    if args.train_text_encoder:
        add_text_encoder_lora(text_components["text_encoder"], args)
        trained.append(text_components["text_encoder"])
    dataloader = create_train_dataloader(tokens, data, args)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    max_train_steps = count_train_steps(args, len(data), accelerator.num_processes)
    learning_rate = peak_learning_rate(args, total_batch_size)
    optimizer = create_optimizer(trained, args, learning_rate)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(args, max_train_steps) * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    *trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(*trained, optimizer, dataloader, lr_scheduler)
    model = trained[0]
    text_encoder = trained[1] if args.train_text_encoder else None
    conditioning = create_conditioning(
        data, text_components, accelerator.unwrap_model(model), accelerator.device, text_encoder
    )
    progress = TrainingProgress()
    for state in (progress, ema):  # saved and restored with the checkpoints
        if state is not None:
            accelerator.register_for_checkpointing(state)

    components = {"vqvae": vqvae, "scheduler": load_scheduler(args, config["codebook_size"]), **text_components}
    pipeline_parts = (components, pipeline_settings(args, data))
    run = TrainingRun(
        args=args,
        accelerator=accelerator,
        model=model,
        ema_model=ema_model,
        ema=ema,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataloader=dataloader,
        conditioning=conditioning,
        progress=progress,
        max_train_steps=max_train_steps,
        pipeline_parts=pipeline_parts,
        learning_rate=learning_rate,
        hub_repo_id=hub_repo_id,
        checkpoint=checkpoint,
        run_info=run_info,
    )
    if accelerator.is_main_process:  # before the first step: room for a checkpoint and the final pipeline
        pipeline_bytes = tensor_bytes(model.state_dict().values()) + tensor_bytes(vqvae.state_dict().values())
        checkpoint_bytes = estimated_checkpoint_size(accelerator.unwrap_model(model), ema, args.output_dir)
        check_free_space(args.output_dir, checkpoint_bytes + pipeline_bytes, "a checkpoint and the final pipeline")
    log_run_info(run, data, total_batch_size)
    set_seed(args.seed, device_specific=True)  # different masks and dropout on every process
    resume(run)
    train(run)
    save_outputs(run, data)


def exit_with_sentence(error: InputError) -> None:
    """Ends the process with the one sentence of `error`. Under `accelerate launch` on several processes, the sentence
    also goes to torch's error file, so that the launcher's failure summary names it as the root cause (instead of the
    last warning printed); a one-process `accelerate launch` reports the exit after it (`--quiet` leaves that out)."""
    message = f"train_enat.py: error: {error}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps({"message": record}))
    elif "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by accelerate launch for the script
        message += (
            "\n(that is the error; accelerate launch reports the exit below: `accelerate launch --quiet` or "
            "`python` leaves that out)"
        )
    raise SystemExit(message)


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        exit_with_sentence(error)
