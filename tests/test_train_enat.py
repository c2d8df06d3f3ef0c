"""examples/train_enat.py, run in-process on tiny data, a tiny VQ model and a tiny transformer (CPU, offline)."""

import copy
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from enat_diffusers import ENATPipeline, ENATText2ImagePipeline, ENATTransformer2DModel, MaskGITVQModel

from .tiny_components import NUM_CLASSES, tiny_pipeline
from .training_assets import (
    COLORS,
    IMAGES_PER_CLASS,
    fresh_accelerate_state,
    make_assets,
    recorded_training_prompts,
    train_enat,
)
from .training_assets import common_args as _common_args
from .training_assets import square as _square

_fresh_accelerate_state = pytest.fixture(autouse=True)(fresh_accelerate_state)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("train_assets"))


def _class_args(assets, tmp_path, steps=2, *extra) -> list[str]:
    model = ["--vqvae_model_name_or_path", assets.vq, "--model_config", assets.config]
    return ["--train_data_dir", assets.classes, *model, *_common_args(tmp_path, steps, *extra)]


def _log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / train_enat.TRAINING_LOG).read_text().splitlines()]


def _assert_same_tensors(first: dict, second: dict, exact: bool = True) -> None:
    assert first.keys() == second.keys()
    for key in first:
        if exact:
            assert torch.equal(first[key], second[key]), key
        else:
            assert torch.allclose(first[key], second[key], atol=1e-5), key


# ----------------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_a_loadable_pipeline(assets, tmp_path):
    train_enat.main(
        _class_args(assets, tmp_path, 40, "--random_flip", "--validation_steps", 20, "--num_validation_images", 2,
                    "--checkpointing_steps", 40)
    )  # fmt: skip
    out = tmp_path / "out"
    log = _log(out)
    losses = [record["loss"] for record in log]
    assert [record["step"] for record in log] == list(range(1, 41))
    assert all(record["lr"] == pytest.approx(3e-3) for record in log)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, losses

    # validation grids: one row per class (the data has 3) under its label band, one column per image, upscaled
    cell, band = train_enat.VALIDATION_CELL_SIZE, train_enat.VALIDATION_LABEL_HEIGHT
    for step in (20, 40):
        assert Image.open(out / "validation" / f"step-{step}.png").size == (2 * cell, 3 * (band + cell))

    # the folder holds the EMA weights (as checkpointed), not the trained ones
    import enat_diffusers  # noqa: F401  (registers the classes, as a user would)

    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, ENATPipeline)
    assert pipe.transformer.config.sample_size == 4 and pipe.transformer.config.num_classes == 3
    assert pipe.labels == {"blue": 0, "green": 1, "red": 2}
    # (diffusers' EMAModel state: one shadow tensor per parameter, in order)
    ema_state = torch.load(out / "checkpoint-40" / "custom_checkpoint_1.pkl", weights_only=True)
    # EMA warm-up by default: the decay grows as 1 - (1 + t)^-3/4 up to 0.9999, so a short run saves what it learned
    assert ema_state["use_ema_warmup"] and ema_state["power"] == 0.75 and ema_state["decay"] == 0.9999
    trained_state = load_file(out / "checkpoint-40" / "model.safetensors")
    saved_state = pipe.transformer.state_dict()
    names = [name for name, _ in pipe.transformer.named_parameters()]
    assert len(names) == len(saved_state) == len(ema_state["shadow_params"])
    _assert_same_tensors(saved_state, dict(zip(names, ema_state["shadow_params"], strict=True)))
    assert not all(torch.equal(saved_state[key], trained_state[key]) for key in saved_state)
    images = pipe(class_labels=["red", 0], num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (8, 8)


def test_token_cache_is_built_once_and_keyed_by_resolution(assets, tmp_path):
    encode = MaskGITVQModel.encode
    with mock.patch.object(MaskGITVQModel, "encode", autospec=True, side_effect=encode) as spy:
        train_enat.main(_class_args(assets, tmp_path, 1))
        assert spy.call_count > 0
        (cache_file,) = (tmp_path / "cache").iterdir()
        built = cache_file.stat().st_mtime_ns
        tokens = load_file(cache_file)
        assert tokens["token_ids"].shape == (3 * IMAGES_PER_CLASS, 4, 4)

        spy.reset_mock()
        AcceleratorState._reset_state(True)
        train_enat.main(_class_args(assets, tmp_path, 1))
        assert spy.call_count == 0
        assert cache_file.stat().st_mtime_ns == built

        AcceleratorState._reset_state(True)
        train_enat.main(_class_args(assets, tmp_path, 1) + ["--resolution", "16"])
        assert spy.call_count > 0
        assert len(list((tmp_path / "cache").iterdir())) == 2


def test_resume_from_latest_continues_exactly(assets, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ("--random_flip", "--checkpointing_steps", 2, "--checkpoints_total_limit", 2)
    train_enat.main(_class_args(assets, first, 5, *common))
    # every 2 steps and at the last one
    assert sorted(path.name for path in (first / "out").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]

    # a second run from a copy of the step-4 checkpoint (mid-epoch: 3 steps per epoch)
    shutil.copytree(first / "out" / "checkpoint-4", second / "out" / "checkpoint-4")
    loaded = {}
    load_state = Accelerator.load_state

    def load_and_record(self, *args, **kwargs):
        result = load_state(self, *args, **kwargs)
        loaded["optimizer"] = copy.deepcopy(self._optimizers[0].state_dict())
        return result

    with mock.patch.object(Accelerator, "load_state", load_and_record):
        train_enat.main(_class_args(assets, second, 5, *common, "--resume_from_checkpoint", "latest"))

    saved = torch.load(first / "out" / "checkpoint-4" / "optimizer.bin", weights_only=True)
    assert saved["param_groups"] == loaded["optimizer"]["param_groups"]
    assert saved["state"].keys() == loaded["optimizer"]["state"].keys()
    for index, state in saved["state"].items():
        _assert_same_tensors(state, loaded["optimizer"]["state"][index])
    # (the reuse projection only steps on reuse steps)
    assert max(int(state["step"]) for state in saved["state"].values()) == 4

    # only step 5 ran, and it is the step-5 of the uninterrupted run
    assert [record["step"] for record in _log(second / "out")] == [5]
    assert _log(second / "out")[0]["loss"] == pytest.approx(_log(first / "out")[-1]["loss"], abs=1e-5)
    final = [load_file(run / "out" / "transformer" / "diffusion_pytorch_model.safetensors") for run in (first, second)]
    _assert_same_tensors(*final, exact=False)


class _Killed(BaseException):
    """Stands for a kill (SIGKILL, power loss) at a chosen moment: nothing in the script catches it."""


def _weights(output_dir) -> bytes:
    return (Path(output_dir) / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()


def _checkpoint_names(output_dir) -> list[str]:
    return sorted(path.name for path in Path(output_dir).iterdir() if path.name.startswith("checkpoint-"))


def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one_and_resumes_exactly(assets, tmp_path):
    common = ("--checkpointing_steps", 2, "--checkpoints_total_limit", 1, "--resume_from_checkpoint", "latest")
    train_enat.main(_class_args(assets, tmp_path / "uninterrupted", 6, *common))
    save_state = Accelerator.save_state

    def killed_while_saving_step_4(self, output_dir, **kwargs):
        save_state(self, output_dir, **kwargs)
        if "checkpoint-4" in str(output_dir):  # written in part: one file missing
            (Path(output_dir) / "scheduler.bin").unlink()
            raise _Killed

    out = tmp_path / "out"
    with mock.patch.object(Accelerator, "save_state", killed_while_saving_step_4), pytest.raises(_Killed):
        train_enat.main(_class_args(assets, tmp_path, 6, *common))
    # the step-2 checkpoint survives (pruning waits for a complete new checkpoint); the half-written one is no
    # checkpoint that "latest" could pick
    assert train_enat.list_checkpoints(str(out)) == [out / "checkpoint-2"]
    assert [record["step"] for record in _log(out)] == [1, 2, 3, 4]

    AcceleratorState._reset_state(True)
    train_enat.main(_class_args(assets, tmp_path, 6, *common))
    assert _checkpoint_names(out) == ["checkpoint-6"]  # the leftover is cleaned up, the limit holds
    log, reference = _log(out), _log(tmp_path / "uninterrupted" / "out")
    assert [record["step"] for record in log] == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 ran again, logged once
    assert [record["loss"] for record in log] == pytest.approx([record["loss"] for record in reference], abs=1e-5)
    final, expected = (load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")
                       for path in (out, tmp_path / "uninterrupted" / "out"))  # fmt: skip
    _assert_same_tensors(final, expected, exact=False)


def test_rerunning_a_finished_run_changes_nothing_even_after_a_kill_while_saving_the_pipeline(assets, tmp_path):
    # 4 steps, 3 per epoch: the last checkpoint is mid-epoch
    argv = _class_args(assets, tmp_path, 4, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    out = tmp_path / "out"
    with mock.patch.object(ENATPipeline, "save_pretrained", side_effect=_Killed), pytest.raises(_Killed):
        train_enat.main(argv)
    assert _checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]

    weights = []
    for _ in range(2):  # the rerun writes the pipeline; a second rerun changes nothing
        AcceleratorState._reset_state(True)
        calls = _ForwardCalls()
        with mock.patch.object(ENATTransformer2DModel, "forward", autospec=True, side_effect=calls):
            train_enat.main(argv)
        assert not [call for call in calls.calls if call[0]], "trained a step past --max_train_steps"
        assert [record["step"] for record in _log(out)] == [1, 2, 3, 4]
        assert _checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
        weights.append(_weights(out))
    assert weights[0] == weights[1]


def test_resuming_a_checkpoint_without_an_ema_state_is_refused(assets, tmp_path):
    argv = _class_args(assets, tmp_path, 3, "--checkpointing_steps", 2)
    train_enat.main(argv)
    ema_file = tmp_path / "out" / "checkpoint-2" / "custom_checkpoint_1.pkl"
    # as written before the EMA went through diffusers' EMAModel: the EMA model's state dict
    torch.save(load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors"), ema_file)
    for recorded in (train_enat.CHECKSUMS_FILE, train_enat.RUN_INFO_FILE):  # that version recorded neither
        (tmp_path / "out" / "checkpoint-2" / recorded).unlink()
    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="checkpoint-2 holds no EMA state of diffusers' EMAModel at step 2"):
        train_enat.main(argv + ["--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-2"])


class _ForwardCalls:
    """Records every ENATTransformer2DModel forward: training mode, reuse state given, masked tokens per row."""

    def __init__(self):
        self.calls = []
        self._forward = ENATTransformer2DModel.forward

    def __call__(self, model, input_ids, *args, **kwargs):
        masked = int((input_ids.reshape(input_ids.shape[0], -1) == model.mask_token_id)[0].sum())
        self.calls.append((model.training, kwargs.get("reuse_state") is not None, masked))
        return self._forward(model, input_ids, *args, **kwargs)


@pytest.mark.parametrize("reuse_prob", [1.0, 0.0])
def test_reuse_training_runs_the_ema_model_on_a_previous_step(assets, tmp_path, reuse_prob):
    calls = _ForwardCalls()
    with mock.patch.object(ENATTransformer2DModel, "forward", autospec=True, side_effect=calls):
        train_enat.main(_class_args(assets, tmp_path, 3, "--reuse_prob", reuse_prob, "--mixed_precision", "bf16"))
    if reuse_prob == 0.0:
        assert [(training, reused) for training, reused, _ in calls.calls] == [(True, False)] * 3
        return
    # every step: the EMA model (eval mode, no state) on a previous step, then the model with its state
    assert [(training, reused) for training, reused, _ in calls.calls] == [(False, False), (True, True)] * 3
    for (_, _, previous_masked), (_, _, masked) in zip(calls.calls[::2], calls.calls[1::2], strict=True):
        assert 1 <= masked <= previous_masked <= 16
    assert all(np.isfinite(record["loss"]) for record in _log(tmp_path / "out"))


def test_gradient_accumulation_logs_the_mean_loss_of_each_optimizer_step(assets, tmp_path):
    calls = _ForwardCalls()
    with mock.patch.object(ENATTransformer2DModel, "forward", autospec=True, side_effect=calls):
        train_enat.main(
            _class_args(
                assets, tmp_path, 3, "--gradient_accumulation_steps", 2, "--reuse_prob", 0, "--checkpointing_steps", 3
            )
        )
    # 3 batches per epoch: steps of 2 + 1 batches (the epoch ends), then 2 batches
    assert len(calls.calls) == 5
    log = _log(tmp_path / "out")
    assert [record["epoch"] for record in log] == [0, 0, 1]
    assert all(2.0 < record["loss"] < 3.5 for record in log)  # a mean, not a sum or a partial sum (ln 16 = 2.77)
    optimizer = torch.load(tmp_path / "out" / "checkpoint-3" / "optimizer.bin", weights_only=True)
    assert max(int(state["step"]) for state in optimizer["state"].values()) == 3


@pytest.mark.filterwarnings("ignore:without --new_classes")  # the color folders rename the tiny pipeline's classes
def test_lora_trains_only_the_adapter_and_saves_it(assets, tmp_path):
    pytest.importorskip("peft")
    base = ENATTransformer2DModel.from_pretrained(assets.pipeline, subfolder="transformer")
    model = ["--pretrained_model_name_or_path", assets.pipeline, "--lora_rank", "4", "--gradient_checkpointing"]
    train_enat.main(
        ["--train_data_dir", assets.classes, *model, *_common_args(tmp_path, 3, "--learning_rate", "1e-2",
         "--validation_steps", 3, "--num_validation_images", 1, "--checkpointing_steps", 3)]
    )  # fmt: skip
    out = tmp_path / "out"
    adapter = load_file(out / train_enat.LORA_WEIGHT_NAME)
    assert adapter and all(key.startswith("transformer.") and ".lora_" in key for key in adapter)
    assert any(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)
    # no EMA with LoRA: the checkpoint holds the step counter only
    assert sorted(path.name for path in (out / "checkpoint-3").glob("custom_checkpoint_*")) == [
        "custom_checkpoint_0.pkl"
    ]

    fused = DiffusionPipeline.from_pretrained(out)
    assert isinstance(fused, ENATPipeline)
    # without --new_classes the model keeps every class: the folders rename classes 0..2, the others keep their names
    assert {"blue": 0, "green": 1, "red": 2}.items() <= fused.labels.items()
    assert set(fused.labels.values()) == set(range(NUM_CLASSES))
    fused_state, base_state = fused.transformer.state_dict(), base.state_dict()
    assert fused_state.keys() == base_state.keys()
    # only the targeted projection weights changed, and each kind of projection did somewhere
    changed = [key for key in base_state if not torch.equal(fused_state[key], base_state[key])]
    targets = {f"{name}.weight" for name in train_enat.LORA_TARGET_MODULES}
    assert {next(t for t in targets if key.endswith("." + t)) for key in changed} == targets

    # the adapter file reproduces the fused weights on the base model
    base.load_lora_adapter(str(out), weight_name=train_enat.LORA_WEIGHT_NAME)
    base.fuse_lora()
    base.unload_lora()
    _assert_same_tensors(base.state_dict(), fused_state, exact=False)
    assert (out / "validation" / "step-3.png").is_file()


def test_push_to_hub_uploads_the_output_folder(assets, tmp_path):
    uploaded = {}

    def upload_folder(self, **kwargs):
        uploaded.update(kwargs, files=sorted(path.name for path in Path(kwargs["folder_path"]).iterdir()))

    with (
        mock.patch(
            "huggingface_hub.HfApi.create_repo", return_value=SimpleNamespace(repo_id="me/enat-tiny")
        ) as create,
        mock.patch("huggingface_hub.HfApi.upload_folder", autospec=True, side_effect=upload_folder),
    ):
        train_enat.main(_class_args(assets, tmp_path, 1, "--push_to_hub", "--hub_model_id", "me/enat-tiny"))
    assert create.call_args.args == ("me/enat-tiny",)
    assert uploaded["repo_id"] == "me/enat-tiny" and Path(uploaded["folder_path"]) == tmp_path / "out"
    assert {"model_index.json", "transformer", "vqvae", "scheduler"} <= set(uploaded["files"])
    assert "checkpoint-*" in uploaded["ignore_patterns"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "README.md" in uploaded["files"] and "- enat" in card and "ENATPipeline" in card
    assert "Trained with `examples/train_enat.py`" in card and "12 samples (12 images, class labels)" in card


def _connection_refused():
    """What the Hub client raises when the Hub cannot be reached (an httpx error, no OSError)."""
    from huggingface_hub.errors import HfHubHTTPError

    http_error = next(base for base in HfHubHTTPError.__bases__ if not issubclass(base, OSError))
    return http_error("[Errno 111] Connection refused")


def test_push_to_hub_creates_the_repo_before_training_and_explains_hub_failures(assets, tmp_path):
    tokenized = mock.patch.object(train_enat, "tokenize_images", side_effect=AssertionError("training started"))
    create = mock.patch("huggingface_hub.HfApi.create_repo", side_effect=_connection_refused())
    with tokenized, create, pytest.raises(ValueError, match=r"--push_to_hub: cannot create the Hub repo 'me/enat'.*"
                                          r"Connection refused.*upload the output folder later"):  # fmt: skip
        train_enat.main(_class_args(assets, tmp_path, 1, "--push_to_hub", "--hub_model_id", "me/enat"))

    AcceleratorState._reset_state(True)
    create = mock.patch("huggingface_hub.HfApi.create_repo", return_value=SimpleNamespace(repo_id="me/enat"))
    upload = mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=_connection_refused())
    out = tmp_path / "out"
    with create, upload, pytest.raises(ValueError, match=f"saved in {out}, but the upload to me/enat failed"):
        train_enat.main(_class_args(assets, tmp_path, 1, "--push_to_hub", "--hub_model_id", "me/enat"))
    assert DiffusionPipeline.from_pretrained(out).transformer.config.num_classes == 3


def test_the_learning_rate_is_logged_as_trained_not_as_the_warm_up_start(assets, tmp_path, caplog):
    argv = _class_args(assets, tmp_path, 2, "--lr_warmup_steps", 10, "--checkpointing_steps", 1)
    with caplog.at_level("INFO", logger="train_enat"):
        train_enat.main(argv)
    assert "Learning rate = 0.003 (constant_with_warmup, 10 warm-up steps)" in caplog.text
    caplog.clear()
    AcceleratorState._reset_state(True)
    with caplog.at_level("INFO", logger="train_enat"):
        train_enat.main(argv[:-2] + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert "Resumed at step 2: learning rate now 0.0006" in caplog.text  # 2 of 10 warm-up steps
    assert [record["lr"] for record in _log(tmp_path / "out")] == pytest.approx([3e-4, 6e-4, 9e-4])


def test_files_named_in_the_docstring_exist():
    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"[\w./-]+\.(?:md|py)\b", train_enat.__doc__))
    assert "README.md" in named
    missing = [name for name in named if not (root / name).exists() and not (root / "examples" / name).exists()]
    assert not missing


def test_validation_grid_upscales_each_image_and_names_each_row(tmp_path):
    pipe = tiny_pipeline()
    accelerator = Accelerator(cpu=True)
    args = SimpleNamespace(output_dir=str(tmp_path), seed=0, num_validation_images=2, validation_class_labels=[1, 3],
                           validation_num_inference_steps=2, validation_guidance_scale=None)  # fmt: skip
    grid = Image.open(train_enat.log_validation(pipe, args, accelerator, 7)).convert("RGB")
    images = train_enat.generate_validation_images(pipe, args, accelerator)
    cell, band = train_enat.VALIDATION_CELL_SIZE, train_enat.VALIDATION_LABEL_HEIGHT
    assert grid.size == (2 * cell, 2 * (band + cell))
    for index, image in enumerate(images):  # nearest-neighbour upscaling: every pixel becomes a block
        row, column = divmod(index, 2)
        box = (column * cell, row * (band + cell) + band, (column + 1) * cell, (row + 1) * (band + cell))
        assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(image.resize((cell, cell), Image.NEAREST)))
    bands = [np.asarray(grid.crop((0, row * (band + cell), 2 * cell, row * (band + cell) + band))) for row in (0, 1)]
    assert all((strip < 128).any() for strip in bands)  # text drawn on each band ...
    assert not np.array_equal(*bands)  # ... naming its row
    assert train_enat.validation_row_labels(pipe, args) == ["1: goldfish", "3: tiger shark"]


def test_validation_class_labels_take_names_and_ids_as_the_pipelines_do():
    id2label = {0: "blue", 1: "green, verde", 2: "red"}
    assert train_enat.resolve_validation_class_labels(["verde", "0", "Red"], id2label) == [1, 0, 2]
    with pytest.raises(ValueError, match=r"--validation_class_labels: unknown class name.*'purple'"):
        train_enat.resolve_validation_class_labels(["purple"], id2label)
    with pytest.raises(ValueError, match=r"--validation_class_labels: .*'gren': close matches \['green'"):
        train_enat.resolve_validation_class_labels(["gren"], id2label)


def test_model_flags_accept_demo_names_and_old_flag_names_warn(assets, tmp_path):
    from enat_diffusers.demo import demo_path

    argv = ["--train_data_dir", assets.classes, "--pretrained_model_name_or_path", "demo:digits"]
    with pytest.warns(FutureWarning, match="--validation_inference_steps is deprecated.*--validation_num_inference"):
        args = train_enat.parse_args(argv + ["--validation_inference_steps", "3"])
    assert args.pretrained_model_name_or_path == str(demo_path("digits"))
    assert args.validation_num_inference_steps == 3


@pytest.mark.parametrize("source", ["coco", "caption_folder"])
def test_text_conditional_training(assets, tmp_path, source):
    if source == "coco":  # a new model with a separate text encoder
        data = ["--coco_captions_json", assets.coco_json, "--coco_images_dir", assets.coco_images]
        model = ["--vqvae_model_name_or_path", assets.vq, "--model_config", assets.config]
        model += ["--text_encoder_name_or_path", assets.clip]
    else:  # fine-tuning a text pipeline (its text encoder, tokenizer and VQ model)
        data = ["--caption_data_dir", assets.captions]
        model = ["--pretrained_model_name_or_path", assets.text_pipeline]
    with recorded_training_prompts() as prompts:
        train_enat.main(
            data + model + _common_args(tmp_path, 3, "--cond_drop_prob", 0.5, "--validation_steps", 3,
                                        "--validation_prompts", "red", "blue", "--num_validation_images", 1)
        )  # fmt: skip
    # captions (one sample per caption) and, dropped, the empty prompt
    assert "" in prompts and {"red", "a red tile", "blue", "a blue tile"} & set(prompts)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe, ENATText2ImagePipeline) and pipe.transformer.config.text_embed_dim == 8
    assert pipe("a red tile", num_inference_steps=2).images[0].size == (8, 8)
    cell, band = train_enat.VALIDATION_CELL_SIZE, train_enat.VALIDATION_LABEL_HEIGHT
    assert Image.open(tmp_path / "out" / "validation" / "step-3.png").size == (cell, 2 * (band + cell))


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "no data": (lambda a: ["--model_config", a.config, "--vqvae_model_name_or_path", a.vq], "no training data"),
    "class and text data": (lambda a: ["--caption_data_dir", a.captions], "not both"),
    "resolution": (lambda a: ["--resolution", "9"], "multiple of the VQ downsampling factor 2"),
    "lora without pretrained": (lambda a: ["--lora_rank", "4"], "--lora_rank .* --pretrained_model_name_or_path"),
    "labels file alone": (
        lambda a: ["--model_config", a.config, "--vqvae_model_name_or_path", a.vq, "--labels_file", "l.json"],
        "--labels_file needs --train_data_dir",
    ),
    "reuse_prob": (lambda a: ["--reuse_prob", "1.5"], "--reuse_prob"),
    "validation prompts for classes": (lambda a: ["--validation_prompts", "a cat"], "--validation_prompts"),
    "validation label": (
        lambda a: ["--validation_class_labels", "7"],
        r"--validation_class_labels must be in \[0, 2\]",
    ),
    "preset": (lambda a: ["--model_config", "ENAT-XXL"], "preset name"),
    "config and pretrained": (lambda a: ["--pretrained_model_name_or_path", a.pipeline], "not both"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_fail_before_any_heavy_work(assets, tmp_path, case):
    arguments, message = BAD_ARGUMENTS[case]
    extra = arguments(assets)
    argv = extra + _common_args(tmp_path, 1) if case in ("no data", "labels file alone") else None
    argv = argv or _class_args(assets, tmp_path, 1) + extra
    heavy_work = mock.patch.object(train_enat, "create_accelerator", side_effect=AssertionError("heavy work started"))
    with heavy_work, pytest.raises(ValueError, match=message):
        train_enat.main(argv)
    assert not (tmp_path / "out").exists()


def test_config_checks_against_the_vq_model_and_the_pretrained_transformer(assets, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4, "unknown_key": 1}))
    with pytest.raises(ValueError, match=r"unknown keys \['unknown_key'\]"):
        train_enat.main(_class_args(assets, tmp_path, 1) + ["--model_config", str(config)])
    config.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4, "codebook_size": 1024}))
    with pytest.raises(ValueError, match="codebook_size"):
        train_enat.main(_class_args(assets, tmp_path, 1) + ["--model_config", str(config)])
    finetune = ["--pretrained_model_name_or_path", assets.pipeline, "--train_data_dir", assets.classes]
    with pytest.raises(ValueError, match="sample_size is 4"):
        train_enat.main(finetune + _common_args(tmp_path, 1, "--resolution", 16))
    text = ["--caption_data_dir", assets.captions, "--pretrained_model_name_or_path", assets.text_pipeline]
    with pytest.raises(ValueError, match="--validation_steps on text data needs --validation_prompts"):
        train_enat.main(text + _common_args(tmp_path, 1, "--validation_steps", 1))


# ----------------------------------------------------------------------------------------------------------------------
# Data listing
# ----------------------------------------------------------------------------------------------------------------------


def _args(**kwargs):
    fields = (
        "dataset_name",
        "train_data_dir",
        "labels_file",
        "coco_captions_json",
        "coco_images_dir",
        "caption_data_dir",
    )
    return SimpleNamespace(**dict.fromkeys(fields) | kwargs)


@pytest.mark.parametrize("form", ["json", "csv"])
def test_labels_file(assets, tmp_path, form):
    folder = Path(assets.classes) / "red"
    if form == "json":
        labels_file = tmp_path / "labels.json"
        labels_file.write_text(json.dumps({"0.png": 4, "2.png": 1}))
    else:
        labels_file = tmp_path / "labels.csv"
        labels_file.write_text("file_name,label\n0.png,4\n2.png,1\n")
    data = train_enat.list_training_data(_args(train_data_dir=str(folder), labels_file=str(labels_file)))
    assert data.image_paths == [str(folder / "0.png"), str(folder / "2.png")] and data.conditions == [4, 1]
    assert not data.text

    labels_file.write_text(
        json.dumps({"0.png": 1, "missing.png": 2}) if form == "json" else "0.png,1\nmissing.png,2\n"
    )
    with pytest.raises(ValueError, match="1 image.*--labels_file do not exist"):
        train_enat.list_training_data(_args(train_data_dir=str(folder), labels_file=str(labels_file)))
    labels_file.write_text(json.dumps({"0.png": "cat"}) if form == "json" else "0.png,1\n2.png,cat\n")
    with pytest.raises(ValueError, match="labels must be integers"):
        train_enat.list_training_data(_args(train_data_dir=str(folder), labels_file=str(labels_file)))


def test_text_data_listing(assets):
    coco = train_enat.list_training_data(
        _args(coco_captions_json=assets.coco_json, coco_images_dir=assets.coco_images)
    )
    assert coco.text and len(coco.image_paths) == 3 * IMAGES_PER_CLASS and len(coco) == 2 * len(coco.image_paths)
    assert coco.conditions[:2] == ["red", "a red tile"] and coco.image_index[:4] == [0, 0, 1, 1]
    assert coco.image_paths[0].endswith("red0.jpg")

    folder = train_enat.list_training_data(_args(caption_data_dir=assets.captions))
    assert folder.text and len(folder) == 2 * len(folder.image_paths)  # one sample per non-empty line
    first = folder.image_paths.index(str(Path(assets.captions) / "blue0.png"))
    assert [c for c, i in zip(folder.conditions, folder.image_index, strict=True) if i == first] == [
        "a blue tile",
        "blue",
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------------


def test_mask_ratio_follows_the_beta_distribution_with_equal_counts_per_row():
    torch.manual_seed(0)
    counts = []
    for _ in range(300):
        masking = train_enat.sample_masking(3, 16, (12.0, 3.0), "cpu")
        row_counts = masking.sum(dim=1)
        assert (row_counts == row_counts[0]).all() and 1 <= row_counts[0] <= 15
        counts.append(int(row_counts[0]))
    assert np.mean(counts) / 16 == pytest.approx(12 / 15, abs=0.03)  # the mean of Beta(12, 3)
    assert len({tuple(row.tolist()) for row in masking}) > 1  # positions differ between rows


def test_previous_step_masks_a_superset_with_equal_counts_per_row():
    torch.manual_seed(0)
    masking = train_enat.sample_masking(4, 16, (2.0, 2.0), "cpu")
    seen = set()
    for _ in range(300):
        previous = train_enat.sample_previous_masking(masking)
        assert (previous | masking).equal(previous)
        counts = previous.sum(dim=1)
        assert (counts == counts[0]).all()
        seen.add(int(counts[0]))
    assert min(seen) == int(masking[0].sum()) and max(seen) == 16  # u spans [0, 1]: from none to all visible


def test_loss_counts_only_masked_tokens_with_label_smoothing():
    torch.manual_seed(0)
    logits, token_ids = torch.randn(2, 16, 4, 4), torch.randint(0, 16, (2, 16))
    masking = torch.zeros(2, 16, dtype=torch.bool)
    masking[:, :5] = True
    loss = train_enat.masked_token_loss(logits, token_ids, masking, 0.1)
    changed = logits.clone().flatten(2)
    changed[:, :, 5:] = torch.randn_like(changed[:, :, 5:])  # visible positions
    assert train_enat.masked_token_loss(changed.view_as(logits), token_ids, masking, 0.1) == loss
    flat = logits.flatten(2).transpose(1, 2)[masking]
    assert loss == pytest.approx(
        torch.nn.functional.cross_entropy(flat, token_ids[masking], label_smoothing=0.1).item()
    )


def test_condition_dropout():
    torch.manual_seed(0)
    classes = train_enat.ClassConditioning(null_class_label=NUM_CLASSES)
    labels = torch.zeros(1000, dtype=torch.long)
    assert (classes.drop(labels, 0.15) == NUM_CLASSES).float().mean() == pytest.approx(0.15, abs=0.04)
    assert classes.drop(labels, 0.0).equal(labels)
    text = train_enat.TextConditioning(text_encoder=None, tokenizer=None)
    assert text.drop(["a", "b"], 0.0) == ["a", "b"] and text.drop(["a", "b"], 0.999999) == ["", ""]


# ----------------------------------------------------------------------------------------------------------------------
# Damaged and changed data
# ----------------------------------------------------------------------------------------------------------------------


def _copy_classes(assets, tmp_path) -> Path:
    classes = tmp_path / "classes"
    shutil.copytree(assets.classes, classes)
    return classes


def test_token_cache_is_rebuilt_when_an_image_changes_in_place(assets, tmp_path):
    classes = _copy_classes(assets, tmp_path)
    argv = _class_args(assets, tmp_path, 1) + ["--train_data_dir", str(classes)]
    train_enat.main(argv)
    (first_cache,) = (tmp_path / "cache").iterdir()
    edited = classes / "red" / "0.png"
    stat = edited.stat()
    _square(COLORS["blue"], np.random.default_rng(1)).save(edited)  # same path, other pixels
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even when the clock is coarse

    encode = MaskGITVQModel.encode
    AcceleratorState._reset_state(True)
    with mock.patch.object(MaskGITVQModel, "encode", autospec=True, side_effect=encode) as spy:
        train_enat.main(argv)
    assert spy.call_count > 0
    caches = sorted((tmp_path / "cache").iterdir())
    assert len(caches) == 2
    (new_cache,) = [path for path in caches if path != first_cache]
    changed = (load_file(new_cache)["token_ids"] != load_file(first_cache)["token_ids"]).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == [train_enat.list_class_folders(classes).image_paths.index(
        str(edited))]  # fmt: skip


def test_a_truncated_image_is_named_in_the_error(assets, tmp_path):
    classes = _copy_classes(assets, tmp_path)
    damaged = classes / "green" / "2.png"
    damaged.write_bytes(damaged.read_bytes()[:60])
    with pytest.raises(ValueError, match=f"cannot read the image {damaged}"):
        train_enat.main(_class_args(assets, tmp_path, 1) + ["--train_data_dir", str(classes)])


def test_an_empty_class_folder_is_refused_by_name(assets, tmp_path):
    classes = _copy_classes(assets, tmp_path)
    (classes / "purple").mkdir()
    heavy_work = mock.patch.object(train_enat, "create_accelerator", side_effect=AssertionError("heavy work started"))
    with heavy_work, pytest.raises(ValueError, match=r"class folder\(s\) \['purple'\] hold no images"):
        train_enat.main(_class_args(assets, tmp_path, 1) + ["--train_data_dir", str(classes)])
