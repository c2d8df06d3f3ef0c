"""LoRA loading for the ENAT pipelines, in the shape of diffusers' pipeline LoRA loaders (e.g. `SanaLoraLoaderMixin`):
`load_lora_weights`, `unload_lora_weights`, `fuse_lora`, `unfuse_lora`, `save_lora_weights`.

File format (what examples/train_enat.py writes): `<dir>/pytorch_lora_weights.safetensors` with keys
`transformer.<peft key>` as `peft.get_peft_model_state_dict(transformer)` gives them (no adapter name), optionally
`text_encoder.<peft key>` for a text encoder LoRA, diffusers' `lora_adapter_metadata` (the LoRA configs, keys
prefixed `transformer.` / `text_encoder.`) optionally in the safetensors metadata. A class
embedding resized for new classes travels in the same file as `transformer.class_embedding.weight`, the full
`(num_classes + 1, hidden_size)` tensor (last row: the null class), with the label set as json in the metadata entry
`id2label`.
"""

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE, LoraBaseMixin
from diffusers.utils import get_adapter_name, logging
from safetensors import safe_open

logger = logging.get_logger(__name__)

TRANSFORMER_PREFIX = "transformer"
TEXT_ENCODER_PREFIX = "text_encoder"
CLASS_EMBEDDING_KEY = f"{TRANSFORMER_PREFIX}.class_embedding.weight"
ID2LABEL_METADATA_KEY = "id2label"


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(
            'LoRA needs the optional package peft: pip install "enat-diffusers[lora]" (from a checkout: '
            'pip install -e ".[lora]")'
        ) from None


def _lora_file(location: str | os.PathLike, weight_name: str | None, **hub_kwargs) -> str:
    """The safetensors file of a LoRA given as a file, a folder or a Hub repo id."""
    weight_name = weight_name or LORA_WEIGHT_NAME_SAFE
    path = Path(location)
    if path.is_file():
        return str(path)
    if path.is_dir():
        subfolder = hub_kwargs.get("subfolder")
        candidate = path / (subfolder or "") / weight_name
        if not candidate.is_file():
            raise FileNotFoundError(f"no LoRA weights {weight_name!r} in {candidate.parent}")
        return str(candidate)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(str(location), weight_name, **{k: v for k, v in hub_kwargs.items() if v is not None})


class ENATLoraLoaderMixin(LoraBaseMixin):
    """
    LoRA for the transformer of an ENAT pipeline (and the text encoder of the text-to-image one). `fuse_lora`,
    `unfuse_lora`, `set_adapters` and friends are diffusers' own (`LoraBaseMixin`), acting on both.
    """

    _lora_loadable_modules = [TRANSFORMER_PREFIX, TEXT_ENCODER_PREFIX]
    transformer_name = TRANSFORMER_PREFIX

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor], **kwargs
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """
        Reads a LoRA: returns its tensors and its safetensors metadata (empty for a dict). `kwargs`: `weight_name`
        (default `pytorch_lora_weights.safetensors`), and for Hub repos `subfolder`, `revision`, `cache_dir`, `token`,
        `local_files_only`.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            return dict(pretrained_model_name_or_path_or_dict), {}
        weight_name = kwargs.pop("weight_name", None)
        hub_kwargs = {
            name: kwargs.pop(name, None)
            for name in ("subfolder", "revision", "cache_dir", "token", "local_files_only")
        }
        if kwargs:
            raise TypeError(f"unexpected arguments for loading a LoRA: {sorted(kwargs)}")
        file = _lora_file(pretrained_model_name_or_path_or_dict, weight_name, **hub_kwargs)
        if not file.endswith(".safetensors"):
            raise ValueError(f"ENAT LoRA weights are read from safetensors files only (no pickle), got {file}")
        with safe_open(file, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            metadata = dict(handle.metadata() or {})
        return tensors, metadata

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """
        Loads a LoRA of the transformer (a folder or file written by `save_lora_weights` / examples/train_enat.py,
        a Hub repo id, or a state dict with `transformer.`-prefixed peft keys) through the transformer's
        `load_lora_adapter`. A class embedding in the file replaces the transformer's (its `num_classes` follows) and
        the file's `id2label` becomes the pipeline's; `unload_lora_weights` restores both. `text_encoder.`-prefixed
        keys (a text encoder LoRA, `train_enat.py --train_text_encoder`) go into the pipeline's text encoder under
        the same adapter name (diffusers' `load_lora_into_text_encoder`); a pipeline without a text encoder refuses
        them.
        """
        _require_peft()
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        class_embedding = state_dict.pop(CLASS_EMBEDDING_KEY, None)
        prefixes = tuple(f"{prefix}." for prefix in self._lora_loadable_modules)
        foreign = [key for key in state_dict if "lora" not in key or not key.startswith(prefixes)]
        if foreign:
            raise ValueError(
                f"not an ENAT LoRA: keys must be `{TRANSFORMER_PREFIX}.<peft lora key>` (or "
                f"`{TEXT_ENCODER_PREFIX}.<peft lora key>`, {CLASS_EMBEDDING_KEY}), got "
                f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}"
            )
        text_encoder_state = {
            key: state_dict.pop(key) for key in list(state_dict) if key.startswith(TEXT_ENCODER_PREFIX)
        }
        if not state_dict:
            raise ValueError("the LoRA holds no `transformer.` LoRA weights")
        if text_encoder_state and getattr(self, TEXT_ENCODER_PREFIX, None) is None:
            raise ValueError(
                f"the LoRA holds text encoder weights (`{TEXT_ENCODER_PREFIX}.` keys), but this "
                f"{type(self).__name__} has no text encoder: load it into the text-to-image pipeline it was trained for"
            )
        if text_encoder_state and hotswap:
            raise ValueError("`hotswap=True` is for transformer LoRAs only; this one also holds text encoder weights")
        lora_config = (
            json.loads(metadata[LORA_ADAPTER_METADATA_KEY]) if LORA_ADAPTER_METADATA_KEY in metadata else None
        )
        id2label = json.loads(metadata[ID2LABEL_METADATA_KEY]) if ID2LABEL_METADATA_KEY in metadata else None
        if class_embedding is not None:
            self._replace_class_embedding(class_embedding, id2label)
        elif id2label is not None:
            logger.warning("the LoRA's `id2label` is ignored: it comes without a class embedding")
        if text_encoder_state:
            # One adapter name for both models, so that `set_adapters` / `delete_adapters` act on the LoRA as a whole.
            adapter_name = adapter_name or get_adapter_name(self.transformer)
        self.transformer.load_lora_adapter(
            state_dict, prefix=TRANSFORMER_PREFIX, adapter_name=adapter_name, metadata=lora_config, hotswap=hotswap
        )
        if text_encoder_state:
            StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
                text_encoder_state,
                network_alphas=None,
                text_encoder=self.text_encoder,
                prefix=TEXT_ENCODER_PREFIX,
                adapter_name=adapter_name,
                metadata=lora_config,
            )
        for model in (self.transformer, getattr(self, TEXT_ENCODER_PREFIX, None)):
            if model is not None:
                # peft creates the LoRA layers (and their dropout) in training mode: give them the model's mode, so
                # that sampling after loading is deterministic
                model.train(model.training)

    def _replace_class_embedding(self, weight: torch.Tensor, id2label: dict | None) -> None:
        from ..conditioning import parse_id2label

        transformer = self.transformer
        if not transformer.is_class_conditional:
            raise ValueError(
                f"the LoRA holds `{CLASS_EMBEDDING_KEY}`, but this pipeline's transformer is text-conditioned"
            )
        parse_id2label(id2label)  # one class per name
        previous = (transformer.class_embedding.weight.detach().clone(), self.config.id2label)
        try:
            num_classes = transformer.resize_class_embedding(weight=weight).num_embeddings - 1
        except ValueError as error:
            raise ValueError(f"the LoRA's `{CLASS_EMBEDDING_KEY}`: {error}") from None
        if id2label is not None:
            out_of_range = [key for key in id2label if not 0 <= int(key) < num_classes]
            if out_of_range:
                transformer.resize_class_embedding(weight=previous[0])
                raise ValueError(f"the LoRA's `id2label` names classes {out_of_range} outside [0, {num_classes - 1}]")
        if not hasattr(self, "_lora_replaced_classes"):
            self._lora_replaced_classes = previous  # what `unload_lora_weights` restores
        if id2label is not None:
            self.register_to_config(id2label=id2label)

    def unload_lora_weights(self) -> None:
        """Removes every LoRA and restores a class embedding (and `id2label`) it replaced, unless the LoRA was fused
        (`fuse_lora()` then `unload_lora_weights()` bakes a LoRA in, as in diffusers: its classes stay too)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        fused = any(isinstance(module, BaseTunerLayer) and module.merged for module in self.transformer.modules())
        super().unload_lora_weights()
        replaced = self.__dict__.pop("_lora_replaced_classes", None)
        if replaced is not None and not fused:
            weight, id2label = replaced
            self.transformer.resize_class_embedding(weight=weight)
            self.register_to_config(id2label=id2label)

    def _lora_components(self) -> list[str]:
        return [name for name in self._lora_loadable_modules if getattr(self, name, None) is not None]

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, **kwargs) -> None:
        """Merges the loaded LoRA into the weights (diffusers' `fuse_lora`; by default of the transformer and, in the
        text-to-image pipeline, of the text encoder, which is left unchanged when it has no LoRA)."""
        super().fuse_lora(components=components or self._lora_components(), lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Reverses `fuse_lora`."""
        super().unfuse_lora(components=components or self._lora_components(), **kwargs)

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | torch.nn.Module | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        transformer_lora_adapter_metadata: dict | None = None,
        class_embedding: torch.Tensor | None = None,
        id2label: dict | None = None,
        text_encoder_lora_layers: dict[str, torch.Tensor] | None = None,
        text_encoder_lora_adapter_metadata: dict | None = None,
    ) -> Path:
        """
        Writes `transformer_lora_layers` (`peft.get_peft_model_state_dict(transformer)`, keys without the
        `transformer.` prefix) to `<save_directory>/pytorch_lora_weights.safetensors`, with the LoRA config
        (`transformer_lora_adapter_metadata`, e.g. `transformer.peft_config["default"].to_dict()`), a resized
        `class_embedding` `(num_classes + 1, hidden_size)` and its `id2label`. Returns the file's path. Without the
        LoRA config, loading infers the rank from the weights and takes `lora_alpha = r` (diffusers' convention), so
        pass it when `lora_alpha != r`. A text encoder LoRA (`text_encoder_lora_layers`, with its
        `text_encoder_lora_adapter_metadata`) is saved with `text_encoder.` keys in the same file.
        """
        if not transformer_lora_layers:
            raise ValueError("`transformer_lora_layers` is required: peft.get_peft_model_state_dict(transformer)")
        if id2label is not None and class_embedding is None:
            raise ValueError("`id2label` is saved with a resized `class_embedding` only")
        state_dict = cls.pack_weights(transformer_lora_layers, TRANSFORMER_PREFIX)
        if text_encoder_lora_layers:
            state_dict.update(cls.pack_weights(text_encoder_lora_layers, TEXT_ENCODER_PREFIX))
        configs = {
            TRANSFORMER_PREFIX: transformer_lora_adapter_metadata,
            TEXT_ENCODER_PREFIX: text_encoder_lora_adapter_metadata,
        }
        adapter_metadata = {
            f"{prefix}.{key}": list(value) if isinstance(value, set) else value
            for prefix, config in configs.items()
            for key, value in (config or {}).items()
        }
        metadata = {"format": "pt"}
        if adapter_metadata:
            metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True)
        if class_embedding is not None:
            state_dict[CLASS_EMBEDDING_KEY] = class_embedding.detach()
            if id2label is not None:
                metadata[ID2LABEL_METADATA_KEY] = json.dumps({str(k): v for k, v in id2label.items()})
        path = Path(save_directory) / (weight_name or LORA_WEIGHT_NAME_SAFE)
        if is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
            safetensors.torch.save_file(tensors, str(path), metadata=metadata)
        return path
