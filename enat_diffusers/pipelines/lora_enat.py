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

import difflib
import functools
import json
import os
import re
from pathlib import Path

import safetensors.torch
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE, LoraBaseMixin
from diffusers.utils import get_adapter_name, logging, scale_lora_layers, unscale_lora_layers
from safetensors import safe_open

from ..checks import check_attention_kwargs

logger = logging.get_logger(__name__)

TRANSFORMER_PREFIX = "transformer"
TEXT_ENCODER_PREFIX = "text_encoder"
CLASS_EMBEDDING_KEY = f"{TRANSFORMER_PREFIX}.class_embedding.weight"
ID2LABEL_METADATA_KEY = "id2label"


def apply_call_lora_scale(call):
    """
    Decorates a pipeline's `__call__`: its LoRA layers (transformer and text encoder) are scaled by
    `attention_kwargs["scale"]` for the duration of the call and restored afterwards, even when the call fails
    (diffusers' per-call LoRA scale; a fused LoRA is part of the weights and is not scaled). The modules are the
    pipeline's own: pipelines made with `from_pipe` share them, so concurrent calls on shared modules should not pass
    different scales.
    """

    @functools.wraps(call)
    def scaled_call(self, *args, **kwargs):
        scale = check_attention_kwargs(kwargs.get("attention_kwargs"))
        if scale == 1.0:
            return call(self, *args, **kwargs)
        _require_peft()
        models = [model for model in (self.transformer, getattr(self, TEXT_ENCODER_PREFIX, None)) if model is not None]
        for model in models:
            scale_lora_layers(model, scale)
        try:
            return call(self, *args, **kwargs)
        finally:
            for model in models:
                unscale_lora_layers(model, scale)

    return scaled_call


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(
            'LoRA needs the optional package peft: pip install "enat-diffusers[lora]" (from a checkout: '
            'pip install -e ".[lora]")'
        ) from None


def _missing_local_path(location: str | os.PathLike) -> FileNotFoundError:
    """The error for a LoRA location that names no existing file or folder, with the closest names beside it."""
    path = Path(location).expanduser()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    hint = ""
    if parent == path.parent:
        siblings = [child.name for child in parent.iterdir()] if parent.is_dir() else []
        matches = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)
        if matches:
            hint = f" Did you mean {' or '.join(repr(str(parent / match)) for match in matches)}?"
    else:
        hint = f" (the closest existing folder is {str(parent)!r})"
    return FileNotFoundError(f"the LoRA file or folder {str(location)!r} does not exist.{hint}")


def _looks_like_a_local_path(location: str) -> bool:
    """True for a location that cannot be a Hub repo id (`name` or `namespace/name`), so a typo in it is reported as
    a missing file rather than as an invalid repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if location.startswith((".", "~", os.sep)) or location.endswith(".safetensors") or "\\" in location:
        return True
    try:
        validate_repo_id(location)
    except HFValidationError:
        return True
    return False


def _lora_file(location: str | os.PathLike, weight_name: str | None, **hub_kwargs) -> str:
    """The safetensors file of a LoRA given as a file, a folder or a Hub repo id."""
    weight_name = weight_name or LORA_WEIGHT_NAME_SAFE
    path = Path(location).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        subfolder = hub_kwargs.get("subfolder")
        candidate = path / (subfolder or "") / weight_name
        if not candidate.is_file():
            raise FileNotFoundError(f"no LoRA weights {weight_name!r} in {candidate.parent}")
        return str(candidate)
    if isinstance(location, os.PathLike) or _looks_like_a_local_path(str(location)):
        raise _missing_local_path(location)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(str(location), weight_name, **{k: v for k, v in hub_kwargs.items() if v is not None})


def _json_metadata(metadata: dict[str, str], key: str) -> dict | None:
    """The json object stored under `key` of a LoRA's safetensors metadata, or None; malformed json is refused."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"the LoRA's metadata entry {key!r} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"the LoRA's metadata entry {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def _check_lora_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, config) -> None:
    """
    Refuses, before anything is loaded, LoRA weights that peft would load partly or not at all: a `lora_A` without
    its `lora_B` (or the reverse), a layer the model does not have or that is not a linear layer, matrices whose
    shapes do not fit that layer or each other, and a rank other than the LoRA config's `r` (or `rank_pattern`).
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(rf"{re.escape(prefix)}\.(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if match is None:
            if key.endswith(".lora_magnitude_vector") or ".lora_" in key and key.endswith(".bias"):
                continue
            raise ValueError(f"the LoRA key {key!r} is not a `{prefix}.<layer>.lora_A/lora_B.weight` key")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    incomplete = sorted(f"{layer}.{'lora_B' if 'lora_A' in parts else 'lora_A'}" for layer, parts in pairs.items()
                        if len(parts) != 2)  # fmt: skip
    if incomplete:
        raise ValueError(
            f"the LoRA misses {len(incomplete)} weight(s) of `{prefix}`: {incomplete[:4]}"
            f"{' ...' if len(incomplete) > 4 else ''}; the file is incomplete or damaged"
        )
    config = config or {}
    rank_pattern = config.get("rank_pattern") or {}
    for layer, parts in pairs.items():
        down, up = parts["lora_A"], parts["lora_B"]
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(
                f"the LoRA adapts `{prefix}.{layer}`, which this {type(model).__name__} does not have"
            ) from None
        base = getattr(module, "base_layer", module)
        in_features, out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if in_features is None or out_features is None:
            raise ValueError(
                f"the LoRA adapts `{prefix}.{layer}`, which is a {type(base).__name__}, not a linear layer"
            )
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape != (out_features, rank):
            raise ValueError(
                f"the LoRA's `{prefix}.{layer}` has lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)}; this "
                f"layer ({in_features} -> {out_features}) needs lora_A (r, {in_features}) and lora_B ({out_features}, r)"
                " with one rank r"
            )
        expected = next((r for pattern, r in rank_pattern.items() if re.search(rf"(^|\.){pattern}$", layer)), None)
        expected = expected if expected is not None else config.get("r")
        if expected is not None and rank != expected:
            raise ValueError(
                f"the LoRA's `{prefix}.{layer}` has rank {rank}, but its config (metadata `{LORA_ADAPTER_METADATA_KEY}`)"
                f" says r={expected}"
            )


class ENATLoraLoaderMixin(LoraBaseMixin):
    """
    LoRA for the transformer of an ENAT pipeline (and the text encoder of the text-to-image one). `fuse_lora`,
    `unfuse_lora`, `set_adapters` and friends are diffusers' own (`LoraBaseMixin`), acting on both.
    """

    _lora_loadable_modules = [TRANSFORMER_PREFIX, TEXT_ENCODER_PREFIX]
    transformer_name = TRANSFORMER_PREFIX
    text_encoder_name = TEXT_ENCODER_PREFIX

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        return_lora_metadata: bool = False,
        **kwargs,
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict]:
        """
        Reads a LoRA's tensors, as diffusers' loaders do; with `return_lora_metadata=True` also its LoRA configs
        (the parsed `lora_adapter_metadata`: keys prefixed `transformer.` / `text_encoder.`, empty when the file has
        none). `kwargs` as for [`~ENATLoraLoaderMixin.read_lora_file`].
        """
        tensors, metadata = cls.read_lora_file(pretrained_model_name_or_path_or_dict, **kwargs)
        if not return_lora_metadata:
            return tensors
        return tensors, _json_metadata(metadata, LORA_ADAPTER_METADATA_KEY) or {}

    @classmethod
    def read_lora_file(
        cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor], **kwargs
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """
        A LoRA's tensors and its whole safetensors metadata (LoRA configs, `id2label`; empty for a dict). `kwargs`:
        `weight_name` (default `pytorch_lora_weights.safetensors`), and for Hub repos `subfolder`, `revision`,
        `cache_dir`, `token`, `local_files_only`.
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

        All or nothing: the file, its metadata, every weight's layer, shape and rank, the class embedding and its
        `id2label` are checked before anything changes, and should loading still fail, the pipeline is put back as
        it was (weights, classes, `id2label`, adapters) before the error is raised.
        """
        _require_peft()
        state_dict, metadata = self.read_lora_file(pretrained_model_name_or_path_or_dict, **kwargs)
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
        lora_config = _json_metadata(metadata, LORA_ADAPTER_METADATA_KEY)
        id2label = _json_metadata(metadata, ID2LABEL_METADATA_KEY)
        components = [(self.transformer, TRANSFORMER_PREFIX, state_dict)]
        if text_encoder_state:
            components.append((self.text_encoder, TEXT_ENCODER_PREFIX, text_encoder_state))
        for model, prefix, weights in components:
            config = {key[len(prefix) + 1 :]: value for key, value in (lora_config or {}).items()
                      if key.startswith(f"{prefix}.")}  # fmt: skip
            _check_lora_weights(model, weights, prefix, config)
        if class_embedding is not None:
            self._check_class_embedding(class_embedding, id2label)
        elif id2label is not None:
            logger.warning("the LoRA's `id2label` is ignored: it comes without a class embedding")
        if text_encoder_state:
            # One adapter name for both models, so that `set_adapters` / `delete_adapters` act on the LoRA as a whole.
            adapter_name = adapter_name or get_adapter_name(self.transformer)
        existing = self.get_list_adapters()
        if adapter_name is not None and not hotswap and any(adapter_name in names for names in existing.values()):
            raise ValueError(f"adapter_name {adapter_name!r} is already in use; pick another or unload it first")

        before = self._lora_snapshot()
        try:
            if class_embedding is not None:
                self._replace_class_embedding(class_embedding, id2label)
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
        except BaseException:
            self._restore_lora_snapshot(before)
            raise
        for model in (self.transformer, getattr(self, TEXT_ENCODER_PREFIX, None)):
            if model is not None:
                # peft creates the LoRA layers (and their dropout) in training mode: give them the model's mode, so
                # that sampling after loading is deterministic
                model.train(model.training)

    def _lora_snapshot(self) -> dict:
        """What a failed `load_lora_weights` puts back: adapters per model, classes and `id2label`."""
        return {
            "adapters": {name: list(names) for name, names in self.get_list_adapters().items()},
            "class_weight": self.transformer.class_embedding.weight.detach().clone()
            if self.transformer.is_class_conditional
            else None,
            "id2label": self.config.get("id2label"),
            "replaced_classes": self.__dict__.get("_lora_replaced_classes"),
        }

    def _restore_lora_snapshot(self, before: dict) -> None:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        now = self.get_list_adapters()
        for name in self._lora_components():
            added = [adapter for adapter in now.get(name, []) if adapter not in before["adapters"].get(name, [])]
            model = getattr(self, name)
            if not before["adapters"].get(name):
                # the model had no LoRA: remove every peft layer, so that its modules (and state dict keys) are the
                # plain ones again
                recurse_remove_peft_layers(model)
                if hasattr(model, "peft_config"):
                    del model.peft_config
                if hasattr(model, "_hf_peft_config_loaded"):
                    model._hf_peft_config_loaded = False
            elif added:
                self.delete_adapters(added)
        if before["class_weight"] is not None and not torch.equal(
            self.transformer.class_embedding.weight.detach(), before["class_weight"]
        ):
            self.transformer.resize_class_embedding(weight=before["class_weight"])
        self.register_to_config(id2label=before["id2label"])
        if before["replaced_classes"] is None:
            self.__dict__.pop("_lora_replaced_classes", None)
        else:
            self._lora_replaced_classes = before["replaced_classes"]

    def _check_class_embedding(self, weight: torch.Tensor, id2label: dict | None) -> None:
        """Refuses a class embedding (and its `id2label`) that `_replace_class_embedding` could not apply."""
        from ..conditioning import parse_id2label

        transformer = self.transformer
        if not transformer.is_class_conditional:
            raise ValueError(
                f"the LoRA holds `{CLASS_EMBEDDING_KEY}`, but this pipeline's transformer is text-conditioned"
            )
        hidden_size = transformer.class_embedding.weight.shape[1]
        if weight.ndim != 2 or weight.shape[0] < 2 or weight.shape[1] != hidden_size:
            raise ValueError(
                f"the LoRA's `{CLASS_EMBEDDING_KEY}` has shape {tuple(weight.shape)}; this transformer needs "
                f"(num_classes + 1, {hidden_size})"
            )
        if not torch.isfinite(weight).all():
            raise ValueError(f"the LoRA's `{CLASS_EMBEDDING_KEY}` holds NaN or infinite values")
        if id2label is not None:
            try:
                parse_id2label(id2label)  # one class per name
                keys = [int(key) for key in id2label]
            except (TypeError, ValueError) as error:
                raise ValueError(f"the LoRA's `id2label` metadata: {error}") from None
            num_classes = weight.shape[0] - 1
            out_of_range = [key for key in keys if not 0 <= key < num_classes]
            if out_of_range:
                raise ValueError(f"the LoRA's `id2label` names classes {out_of_range} outside [0, {num_classes - 1}]")

    def _replace_class_embedding(self, weight: torch.Tensor, id2label: dict | None) -> None:
        transformer = self.transformer
        previous = (transformer.class_embedding.weight.detach().clone(), self.config.id2label)
        try:
            transformer.resize_class_embedding(weight=weight)
        except ValueError as error:
            raise ValueError(f"the LoRA's `{CLASS_EMBEDDING_KEY}`: {error}") from None
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
        safe_serialization: bool = True,
    ) -> Path:
        """
        Writes `transformer_lora_layers` (`peft.get_peft_model_state_dict(transformer)`, keys without the
        `transformer.` prefix) to `<save_directory>/pytorch_lora_weights.safetensors`, with the LoRA config
        (`transformer_lora_adapter_metadata`, e.g. `transformer.peft_config["default"].to_dict()`), a resized
        `class_embedding` `(num_classes + 1, hidden_size)` and its `id2label`. Returns the file's path. Without the
        LoRA config, loading infers the rank from the weights and takes `lora_alpha = r` (diffusers' convention), so
        pass it when `lora_alpha != r`. A text encoder LoRA (`text_encoder_lora_layers`, with its
        `text_encoder_lora_adapter_metadata`) is saved with `text_encoder.` keys in the same file.
        `safe_serialization` is accepted as in diffusers' loaders; ENAT LoRAs are safetensors files only.
        """
        if not safe_serialization:
            raise ValueError(
                "`safe_serialization=False` is not supported: ENAT LoRA weights are saved and read as safetensors "
                "only (no pickle)"
            )
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
