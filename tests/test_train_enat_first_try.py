"""examples/train_enat.py for a first-time user: defaults that learn in short runs, problems of the data and arguments
found before the first step, checkpoints that tell when they are damaged or do not fit the run, full disks, 16-bit
images, no Hub access unless pushing, prior preservation. Tiny data and models (CPU, offline)."""

import json
import os
import shutil
import warnings
from pathlib import Path
from unittest import mock

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from enat_diffusers import ENATTransformer2DModel

from .tiny_components import NUM_CLASSES
from .training_assets import common_args, fresh_accelerate_state, make_assets, square, train_enat

_fresh_accelerate_state = pytest.fixture(autouse=True)(fresh_accelerate_state)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("first_try_assets"))


def _class_folders(root: Path, names, images=4) -> Path:
    rng = np.random.default_rng(0)
    for index, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for image in range(images):
            square((40 * index, 200 - 40 * index, 90), rng).save(root / name / f"{name[:3]}{image}.png")
    return root


def _finetune(assets, tmp_path, data_dir, steps, *extra) -> list[str]:
    pretrained = ["--pretrained_model_name_or_path", assets.pipeline, "--train_data_dir", str(data_dir)]
    return [*pretrained, *common_args(tmp_path, steps, *extra)]


def _without(argv: list[str], flag: str) -> list[str]:
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


# ----------------------------------------------------------------------------------------------------------------------
# Defaults that learn in short runs
# ----------------------------------------------------------------------------------------------------------------------


def test_default_warmup_is_the_papers_but_at_most_a_tenth_of_the_run(assets, tmp_path):
    argv = _without(_finetune(assets, tmp_path, assets.classes, 30), "--lr_warmup_steps")
    args = train_enat.parse_args(argv)
    assert train_enat.warmup_steps(args, 30) == 3
    assert train_enat.warmup_steps(args, 1_000_000) == 5000
    train_enat.main(argv)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "out" / train_enat.TRAINING_LOG).read_text().splitlines()]
    assert lrs[2:] == pytest.approx([3e-3] * 28)  # the full rate from step 3 on


def test_a_warmup_as_long_as_the_run_warns(assets, tmp_path):
    argv = _finetune(assets, tmp_path, assets.classes, 2)
    argv[argv.index("--lr_warmup_steps") + 1] = "5000"
    args = train_enat.parse_args(argv)
    with pytest.warns(UserWarning, match=r"--lr_warmup_steps 5000 is not shorter than the run \(2 steps\)"):
        train_enat.warn_about_no_op_settings(args, 2)


def test_a_constant_ema_that_cannot_move_warns_and_the_default_does_not(assets, tmp_path):
    argv = _finetune(assets, tmp_path, assets.classes, 60)
    args = train_enat.parse_args([*argv, "--no-ema_warmup"])
    with pytest.warns(UserWarning, match="would still be 99% the weights of the first step"):
        train_enat.warn_about_no_op_settings(args, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_enat.warn_about_no_op_settings(train_enat.parse_args(argv), 60)


def test_a_short_full_fine_tune_saves_what_it_learned(assets, tmp_path):
    # the saved (EMA) weights moved at least half as far from the pretrained ones as the trained weights did
    train_enat.main(_finetune(assets, tmp_path, assets.classes, 6, "--learning_rate", "1e-2"))
    out = tmp_path / "out"
    base = ENATTransformer2DModel.from_pretrained(assets.pipeline, subfolder="transformer").state_dict()
    saved = ENATTransformer2DModel.from_pretrained(out, subfolder="transformer").state_dict()
    trained = load_file(out / "checkpoint-6" / "model.safetensors")
    keys = [key for key in base if base[key].is_floating_point()]
    moved = sum((saved[key] - base[key]).norm() ** 2 for key in keys) ** 0.5
    learned = sum((trained[key] - base[key]).norm() ** 2 for key in keys) ** 0.5
    assert moved > 0.5 * learned


def test_lora_has_a_higher_default_rate_and_targets_the_feed_forward_layers(assets, tmp_path):
    pytest.importorskip("peft")
    argv = _without(_finetune(assets, tmp_path, assets.classes, 2), "--learning_rate")
    assert train_enat.parse_args(argv).learning_rate == train_enat.FULL_LEARNING_RATE
    lora = train_enat.parse_args([*argv, "--lora_rank", "4"])
    assert lora.learning_rate == train_enat.LORA_LEARNING_RATE > train_enat.FULL_LEARNING_RATE
    assert {"ff.net.0.proj", "ff.net.2", "to_q"} <= set(lora.lora_target_modules)


# ----------------------------------------------------------------------------------------------------------------------
# Data and argument problems, found before the first step
# ----------------------------------------------------------------------------------------------------------------------


def test_hidden_folders_are_not_classes(tmp_path):
    root = _class_folders(tmp_path / "data", ["cat", "dog"])
    shutil.copytree(root / "dog", root / ".ipynb_checkpoints")
    shutil.copytree(root / "dog", root / "cat" / ".ipynb_checkpoints")
    data = train_enat.list_class_folders(root)
    assert data.id2label == {0: "cat", 1: "dog"}
    assert len(data.image_paths) == 8 and not any(".ipynb" in path for path in data.image_paths)


@pytest.mark.parametrize(
    "folders, extra, named",
    [
        (["rot_two", "new, rot_two"], [], "rot_two"),  # two folders share a name
        (["goldfish"], ["--class_init", "goldfish=0"], "goldfish"),  # a new class named like a pretrained one
        (["goldfish"], [], "goldfish"),  # no --new_classes: folder 0 renames class 0, and class 1 is goldfish
    ],
)
def test_colliding_class_names_are_refused_before_training(assets, tmp_path, folders, extra, named):
    root = _class_folders(tmp_path / "data", folders)
    new_classes = ["--new_classes", "extend"] if extra or "rot_two" in folders else []
    argv = _finetune(assets, tmp_path, root, 2, *new_classes, *extra)
    with (
        mock.patch.object(train_enat, "load_or_build_token_cache", side_effect=AssertionError("trained")),
        pytest.raises(train_enat.InputError, match=f"name '{named}' for classes"),
    ):
        train_enat.main(argv)


def test_fine_tuning_without_new_classes_keeps_every_class_name(assets, tmp_path):
    root = _class_folders(tmp_path / "data", ["Tinca tinca", "red"])  # a synonym of class 0, and a new name
    args = train_enat.parse_args(_finetune(assets, tmp_path, root, 2))
    data, *_ = train_enat.prepare_data(args)
    id2label = train_enat.pipeline_settings(args, data)["id2label"]
    assert sorted(id2label) == list(range(NUM_CLASSES))
    assert id2label[0] == "tench, Tinca tinca" and id2label[1] == "red" and id2label[2] == "great white shark"


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: damaged, or of another run
# ----------------------------------------------------------------------------------------------------------------------


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(assets, tmp_path):
    argv = _finetune(assets, tmp_path, assets.classes, 2, "--checkpointing_steps", 1)
    train_enat.main(argv)
    damaged = tmp_path / "out" / "checkpoint-2" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated on disk after it was complete
    fresh_accelerate_state()
    with pytest.warns(UserWarning, match="checkpoint-2 is damaged .*model.safetensors.*resuming from .*checkpoint-1"):
        train_enat.main([*argv, "--resume_from_checkpoint", "latest"])
    log = (tmp_path / "out" / train_enat.TRAINING_LOG).read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]  # step 2 trained again
    assert train_enat.checkpoint_damage(tmp_path / "out" / "checkpoint-2") is None  # rewritten whole


def test_a_damaged_named_checkpoint_is_refused_by_name(assets, tmp_path):
    argv = _finetune(assets, tmp_path, assets.classes, 1)
    train_enat.main(argv)
    (tmp_path / "out" / "checkpoint-1" / "optimizer.bin").write_bytes(b"garbage")
    fresh_accelerate_state()
    with pytest.raises(train_enat.InputError, match="checkpoint-1' is damaged: optimizer.bin"):
        train_enat.main([*argv, "--resume_from_checkpoint", "checkpoint-1"])


@pytest.mark.parametrize("change", ["add a class", "swap two folders", "lora rank"])
def test_resume_with_other_classes_or_lora_shape_is_refused_with_what_changed(assets, tmp_path, change):
    pytest.importorskip("peft")
    root = _class_folders(tmp_path / "data", ["ant", "bee"], images=3)
    (root / "bee" / "extra.png").write_bytes((root / "bee" / "bee0.png").read_bytes())  # tell the classes apart
    argv = _finetune(assets, tmp_path, root, 1, "--new_classes", "replace", "--lora_rank", "4")
    train_enat.main(argv)
    expected = {
        "add a class": "num_classes 2 -> 3; class 2: None -> 'cow'",
        "swap two folders": r"the images of class 0 \('ant'\) are those the checkpoint trained as class 1 \('bee'\)",
        "lora rank": "lora_rank 4 -> 8",
    }[change]
    if change == "add a class":
        _class_folders(tmp_path / "more", ["cow"])
        shutil.copytree(tmp_path / "more" / "cow", root / "cow")
    elif change == "swap two folders":
        os.rename(root / "ant", root / "tmp")
        os.rename(root / "bee", root / "ant")
        os.rename(root / "tmp", root / "bee")
    else:
        argv[argv.index("--lora_rank") + 1] = "8"
    fresh_accelerate_state()
    with pytest.raises(train_enat.InputError, match=f"cannot resume .*checkpoint-1.*{expected}"):
        train_enat.main([*argv, "--resume_from_checkpoint", "latest"])


# ----------------------------------------------------------------------------------------------------------------------
# Full disks, 16-bit images, no network
# ----------------------------------------------------------------------------------------------------------------------


def test_a_full_disk_is_refused_before_the_first_step_with_the_needed_size(assets, tmp_path):
    usage = shutil.disk_usage(tmp_path)._replace(free=10_000)
    with (
        mock.patch.object(train_enat.shutil, "disk_usage", return_value=usage),
        pytest.raises(train_enat.InputError, match=r"not enough free disk space in .* needed, 0.01 MB free"),
    ):
        train_enat.main(_finetune(assets, tmp_path, assets.classes, 2))
    assert not (tmp_path / "out" / train_enat.TRAINING_LOG).exists()


def test_a_disk_that_fills_while_checkpointing_ends_in_a_sentence(assets, tmp_path):
    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    argv = _finetune(assets, tmp_path, assets.classes, 2, "--checkpointing_steps", 1)
    with (
        mock.patch("accelerate.Accelerator.save_state", full),
        pytest.raises(train_enat.InputError, match="checkpoint of step 1 .* failed \\(No space left on device\\)"),
    ):
        train_enat.main(argv)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_16_bit_grey_pngs_keep_their_brightness(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 16384, dtype=np.uint16)).save(path)  # a quarter of the 16-bit range
    assert Image.open(path).mode.startswith("I")
    pixels = train_enat.load_image(str(path), 8)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 64 / 127.5 - 1.0))


def test_training_without_push_never_asks_the_hub_and_the_card_says_how_to_install(assets, tmp_path):
    with mock.patch.object(huggingface_hub.ModelCard, "load", side_effect=AssertionError("asked the Hub")):
        train_enat.main(_finetune(assets, tmp_path, assets.classes, 1))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pip install enat-diffusers" not in card and "git repository" in card


# ----------------------------------------------------------------------------------------------------------------------
# Prior preservation
# ----------------------------------------------------------------------------------------------------------------------


def test_prior_preservation_trains_on_generated_images_of_the_kept_classes(assets, tmp_path):
    root = _class_folders(tmp_path / "data", ["goldfish", "red"])  # goldfish is pretrained class 1, red is new
    given = tmp_path / "given" / "tench"  # real images given for class 0 (by name)
    shutil.copytree(root / "red", given)
    argv = _finetune(assets, tmp_path, root, 2, "--new_classes", "extend", "--with_prior_preservation",
                     "--num_class_images", 3, "--class_data_dir", tmp_path / "given")  # fmt: skip
    seen = []
    loss = train_enat.masked_token_loss

    def record(logits, token_ids, masking, smoothing, row_weights=None):
        seen.append(row_weights)
        return loss(logits, token_ids, masking, smoothing, row_weights)

    with mock.patch.object(train_enat, "masked_token_loss", side_effect=record):
        train_enat.main(argv)
    kept = [0, 2, 3, 4]  # the pretrained classes the data does not train (1 is trained by the goldfish folder)
    generated = sorted(path.relative_to(tmp_path / "given") for path in (tmp_path / "given").rglob("generated_*"))
    assert [str(path.parent) for path in generated] == ["2"] * 3 + ["3"] * 3 + ["4"] * 3
    assert len(list(given.iterdir())) == 4  # 4 given, none generated for class 0 (3 used)
    assert all(weights is not None for weights in seen)
    args = train_enat.parse_args(argv)
    data, *_ = train_enat.prepare_data(args)
    assert sorted(data.prior_plan.images) == kept and all(len(v) == 3 for v in data.prior_plan.images.values())
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.labels["red"] == NUM_CLASSES and pipe.labels["goldfish"] == 1


def test_the_prior_loss_weight_scales_the_prior_rows(tmp_path):
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 7, 2, 2), torch.randint(0, 7, (2, 4))
    masking = torch.tensor([[True, True, False, False], [True, False, True, False]])
    plain = train_enat.masked_token_loss(logits, tokens, masking, 0.1)
    torch.testing.assert_close(train_enat.masked_token_loss(logits, tokens, masking, 0.1, torch.ones(2)), plain)
    only_first = train_enat.masked_token_loss(logits, tokens, masking, 0.1, torch.tensor([1.0, 0.0]))
    first = train_enat.masked_token_loss(logits[:1], tokens[:1], masking[:1], 0.1)
    torch.testing.assert_close(only_first, first / 2)  # averaged over all 4 masked tokens


def test_prior_preservation_with_replace_is_refused(assets, tmp_path):
    argv = _finetune(assets, tmp_path, assets.classes, 2, "--new_classes", "replace", "--with_prior_preservation")
    with pytest.raises(train_enat.InputError, match="--new_classes replace drops"):
        train_enat.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# A failed launch
# ----------------------------------------------------------------------------------------------------------------------


def test_a_failed_launch_names_the_problem_in_the_launchers_error_file(assets, tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"  # where torchrun (accelerate launch --multi_gpu) reads a child's failure
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with pytest.raises(train_enat.InputError) as caught:
        train_enat.main(_finetune(assets, tmp_path, tmp_path / "missing", 1))
    with pytest.raises(SystemExit) as exited:  # what the command line does with it
        train_enat.exit_with_sentence(caught.value)
    sentence = f"train_enat.py: error: --train_data_dir '{tmp_path / 'missing'}' is not a folder"
    assert exited.value.code == sentence
    assert json.loads(error_file.read_text())["message"]["message"] == sentence


def test_a_one_process_accelerate_launch_says_the_report_below_is_of_this_error(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # set by accelerate launch
    with pytest.raises(SystemExit, match="(?s)error: bad value.*that is the error; .*--quiet"):
        train_enat.exit_with_sentence(train_enat.InputError("bad value"))


def test_the_resolution_defaults_to_the_pretrained_models_image_size(assets, tmp_path):
    argv = _without(_finetune(assets, tmp_path, assets.classes, 1), "--resolution")
    args = train_enat.parse_args(argv)
    train_enat.prepare_data(args)
    assert args.resolution == 8  # the tiny pipeline: 4x4 tokens, VQ factor 2
