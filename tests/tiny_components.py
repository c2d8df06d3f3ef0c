"""Tiny random ENAT components shared by the pipeline tests."""

import json
import os
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from enat_diffusers.models.transformer_enat import ENATTransformer2DModel
from enat_diffusers.models.vq_maskgit import MaskGITVQModel
from enat_diffusers.pipelines.pipeline_enat import ENATPipeline
from enat_diffusers.pipelines.pipeline_enat_text2img import ENATText2ImagePipeline
from enat_diffusers.schedulers.scheduling_enat import ENATScheduler
from enat_diffusers.testing_utils import randomize_modulation

CODEBOOK_SIZE = 16
GRID = 4
NUM_CLASSES = 5
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark", 3: "tiger shark", 4: "hammerhead"}


TEXT_WIDTH = 8
TEXT_LENGTH = 8


# The tiny class-conditional transformer every test builds on.
TINY_TRANSFORMER_CONFIG = {
    "sample_size": GRID,
    "codebook_size": CODEBOOK_SIZE,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_encoder_layers": 2,
    "num_decoder_layers": 1,
    "num_classes": NUM_CLASSES,
}


def tiny_transformer(seed: int = 0, **config) -> ENATTransformer2DModel:
    torch.manual_seed(seed)
    model = ENATTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, **config})
    randomize_modulation(model, std=0.2)  # as after training: no block is an identity map
    return model.eval()


def tiny_text_transformer(seed: int = 0, pooled: bool = True) -> ENATTransformer2DModel:
    return tiny_transformer(
        seed, num_classes=None, text_embed_dim=TEXT_WIDTH, pooled_text_embed_dim=TEXT_WIDTH if pooled else None
    )


def tiny_clip(folder: Path, seed: int = 0) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
    """A random CLIP text encoder and a character-level CLIP tokenizer written to `folder` (no network)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [f"{c}</w>" for c in letters]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=TEXT_LENGTH)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_WIDTH,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=TEXT_WIDTH,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    return text_encoder, tokenizer


def tiny_vqvae(seed: int = 0) -> MaskGITVQModel:
    torch.manual_seed(seed)
    return MaskGITVQModel(
        hidden_channels=8,
        channel_multipliers=(1, 2),
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=CODEBOOK_SIZE,
        norm_num_groups=4,
        sample_size=GRID * 2,
    ).eval()


def tiny_pipeline(scheduler=None, **kwargs) -> ENATPipeline:
    pipe = ENATPipeline(
        transformer=tiny_transformer(),
        vqvae=tiny_vqvae(),
        scheduler=scheduler or ENATScheduler(mask_token_id=CODEBOOK_SIZE),
        id2label=ID2LABEL,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_text_pipeline(folder: Path, pooled: bool = True, **kwargs) -> ENATText2ImagePipeline:
    text_encoder, tokenizer = tiny_clip(folder)
    pipe = ENATText2ImagePipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_text_transformer(pooled=pooled),
        vqvae=tiny_vqvae(),
        scheduler=ENATScheduler(mask_token_id=CODEBOOK_SIZE),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def public_config(config) -> dict:
    """A config without diffusers' private bookkeeping entries (`_name_or_path`, `_use_default_values`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


class TransformerCalls:
    """Records the batch size and whether a reuse state was passed, for every transformer call."""

    def __init__(self, transformer):
        self.calls = []
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        self.calls.append((input_ids.shape[0], kwargs.get("reuse_state") is not None))

    def remove(self):
        self._handle.remove()


class StartRecorder:
    """For editing runs: the model input of the first transformer call, and per step the index the callback sees
    and the number of mask tokens per row of its `latents` (use `recorder.callback` as `callback_on_step_end`)."""

    def __init__(self, pipe):
        self.first_input = None
        self.steps, self.counts = [], []
        pipe.transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        if self.first_input is None:
            self.first_input = args[0].clone()

    def callback(self, _pipe, step_index, _timestep, callback_kwargs):
        self.steps.append(step_index)
        self.counts.append((callback_kwargs["latents"] == CODEBOOK_SIZE).flatten(1).sum(1).tolist())  # mask id
        return {}


def fill_hub_cache(folder: Path, cache_dir: Path, repo_id: str) -> Path:
    """Places a saved folder where huggingface_hub caches a downloaded snapshot of `repo_id`."""
    revision = "0" * 40
    repo_cache = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_cache / "snapshots" / revision
    snapshot.parent.mkdir(parents=True)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(revision)
    os.symlink(folder, snapshot, target_is_directory=True)
    return cache_dir
