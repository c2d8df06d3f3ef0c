"""The pipeline conversion script on tiny checkpoints in the exact layout of the reference release."""

import errno
import json
import re
import runpy
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from enat_diffusers import ENATPipeline
from enat_diffusers.conversion import (
    CheckpointMismatchError,
    convert_enat_pipeline,
    convert_transformer,
    imagenet_id2label,
    save_converted,
    transformer_config_from_state_dict,
)
from enat_diffusers.models import ENAT_PRESETS

from .conftest import FIXTURES

SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_enat_to_diffusers.py"
TRANSFORMER = FIXTURES / "tiny_nnet_ema.pth"
VQGAN = FIXTURES / "tiny_vqgan.ckpt"


def _run_script(*arguments: str) -> None:
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main(list(arguments)) == 0


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enat-tiny-256")
    _run_script(
        "--checkpoint", str(TRANSFORMER), "--vqgan", str(VQGAN), "--resolution", "256", "--output_dir", str(folder),
        "--num_attention_heads", "2", "--num_decoder_layers", "1",
    )  # fmt: skip
    return folder


def test_script_writes_a_complete_folder_with_reference_defaults(converted_folder, capsys):
    for path in (
        "model_index.json",
        "transformer/config.json",
        "vqvae/config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (converted_folder / path).is_file()
    assert (converted_folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(converted_folder)
    assert isinstance(pipe, ENATPipeline)
    assert pipe.scheduler.config.sample_temperature == 6.0 and pipe.scheduler.config.mask_temperature == 1.5
    assert pipe.scheduler.config.mask_token_id == 16
    assert pipe.config.default_guidance_scale == 3.5 and pipe.config.default_num_inference_steps == 8
    assert pipe.transformer.config.sample_size == 16 and pipe.transformer.config.num_encoder_layers == 1


def test_converted_folder_generates_images(converted_folder):
    pipe = DiffusionPipeline.from_pretrained(converted_folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([3, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 256, 256, 3) and np.isfinite(images).all()


def test_script_prints_parameter_counts(tmp_path, capsys):
    _run_script(
        "--checkpoint", str(TRANSFORMER), "--vqgan", str(VQGAN), "--resolution", "256", "--output_dir", str(tmp_path),
        "--num_attention_heads", "2", "--num_decoder_layers", "1", "--dtype", "fp16",
    )  # fmt: skip
    printed = capsys.readouterr().out
    transformer = convert_transformer(TRANSFORMER, num_attention_heads=2, num_decoder_layers=1)
    assert f"transformer: {transformer.num_parameters():,} parameters" in printed
    assert "vqvae: " in printed
    for component in ("transformer", "vqvae"):
        weights = load_file(tmp_path / component / "diffusion_pytorch_model.safetensors")
        assert {tensor.dtype for tensor in weights.values()} == {torch.float16}


def test_512_settings_and_resolution_mismatch():
    with pytest.raises(ValueError, match="needs a 32x32 token grid"):
        convert_enat_pipeline(TRANSFORMER, VQGAN, 512, num_attention_heads=2, num_decoder_layers=1)
    with pytest.raises(ValueError, match="`resolution` must be one of"):
        convert_enat_pipeline(TRANSFORMER, VQGAN, 384, num_attention_heads=2, num_decoder_layers=1)


def _modified_checkpoint(tmp_path, edit) -> Path:
    state_dict = torch.load(TRANSFORMER, weights_only=True)
    edit(state_dict)
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    return path


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    def edit(state_dict):
        del state_dict["blocks.0.attn.kv.A.weight"]
        state_dict["blocks.0.attn.extra.weight"] = torch.zeros(1)
        state_dict["mlm_layer.fc.bias"] = torch.zeros(7)

    with pytest.raises(CheckpointMismatchError) as error:
        convert_transformer(_modified_checkpoint(tmp_path, edit), num_attention_heads=2, num_decoder_layers=1)
    message = str(error.value)
    assert "missing keys: encoder_blocks.0.attn.to_kv_context.weight" in message
    assert "unexpected keys: blocks.0.attn.extra.weight" in message
    assert "mlm_layer.fc.bias -> head.proj.bias: (7,) vs (32,)" in message


def test_only_prev_embedder_is_dropped(tmp_path):
    state_dict = torch.load(TRANSFORMER, weights_only=True)
    assert any(key.startswith("prev_embedder.") for key in state_dict)
    transformer = convert_transformer(TRANSFORMER, num_attention_heads=2, num_decoder_layers=1)
    kept = {key for key in state_dict if not key.startswith("prev_embedder.")}
    assert len(kept) == len(transformer.state_dict())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "config": object()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_transformer(path)


def _script_main():
    return runpy.run_path(str(SCRIPT))["main"]


def _script_error(capsys, *arguments: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        _script_main()(list(arguments))
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_help_shows_the_usage_example_on_its_two_lines(capsys):
    with pytest.raises(SystemExit):
        _script_main()(["--help"])
    assert "--vqgan vqgan_jax_strongaug.ckpt \\\n        --resolution 256 --output_dir" in capsys.readouterr().out


BASE = ["--checkpoint", str(TRANSFORMER), "--vqgan", str(VQGAN), "--resolution", "256"]
TINY = ["--num_attention_heads", "2", "--num_decoder_layers", "1"]


def test_bad_paths_and_flags_are_one_line_errors_before_any_conversion(tmp_path, capsys, monkeypatch):
    main = _script_main()

    def refuse(*args, **kwargs):
        raise AssertionError("converted before the arguments were checked")

    monkeypatch.setitem(main.__globals__, "convert_enat_pipeline", refuse)
    in_the_way = tmp_path / "file"
    in_the_way.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "model_index.json").write_text("{}")
    cases = [
        (
            ["--checkpoint", str(tmp_path / "nnet_ema.pth"), *BASE[2:], "--output_dir", str(tmp_path / "o")],
            "no such file",
        ),
        (
            [*BASE, "--output_dir", str(tmp_path / "o"), "--num_attention_heads", "0"],
            "must be a positive integer, got 0",
        ),
        ([*BASE, "--output_dir", str(in_the_way)], "exists and is not a folder"),
        ([*BASE, "--output_dir", str(in_the_way / "sub")], "is not a folder"),
        ([*BASE, "--output_dir", str(full)], "is not empty; choose another folder or pass --overwrite"),
    ]
    for arguments, expected in cases:
        with pytest.raises(SystemExit) as stopped:
            main(arguments)
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert expected in error.strip().splitlines()[-1] and "Traceback" not in error, arguments


def test_overwrite_replaces_the_folder_as_a_whole(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "stale_component").mkdir()
    (folder / "stale_component" / "config.json").write_text("{}")
    _run_script(*BASE, "--output_dir", str(folder), *TINY, "--overwrite")
    assert not (folder / "stale_component").exists()
    assert isinstance(DiffusionPipeline.from_pretrained(folder), ENATPipeline)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no temporary folder left


class _KilledHalfWay:
    """Writes part of a folder, then is killed."""

    def save_pretrained(self, path, safe_serialization):
        Path(path, "transformer").mkdir(parents=True)
        Path(path, "transformer", "config.json").write_text('{"new": true}')
        raise KeyboardInterrupt("killed")


def test_a_conversion_killed_half_way_leaves_the_previous_folder_untouched(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"old": true}')
    with pytest.raises(KeyboardInterrupt):
        save_converted(_KilledHalfWay(), folder, overwrite=True)
    assert sorted(path.name for path in folder.iterdir()) == ["model_index.json"]
    assert (folder / "model_index.json").read_text() == '{"old": true}'
    with pytest.raises(KeyboardInterrupt):
        save_converted(_KilledHalfWay(), tmp_path / "new")
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def _shapes_only(hidden_size: int, num_blocks: int) -> dict[str, torch.Tensor]:
    """The entries `transformer_config_from_state_dict` reads, as meta tensors (no memory)."""
    state_dict = {
        "x_embedder.word_embeddings.weight": torch.empty(1025, hidden_size, device="meta"),
        "x_embedder.position_embeddings.weight": torch.empty(256, hidden_size, device="meta"),
        "y_embedder.embedding_table.weight": torch.empty(1001, hidden_size, device="meta"),
    }
    for block in range(num_blocks):
        state_dict[f"blocks.{block}.mlp.fc1.weight"] = torch.empty(4 * hidden_size, hidden_size, device="meta")
    return state_dict


@pytest.mark.parametrize("preset", ["ENAT-S", "ENAT-B", "ENAT-L"])
def test_paper_configurations_are_recognised_from_width_and_depth(preset):
    values = ENAT_PRESETS[preset]
    state_dict = _shapes_only(values["hidden_size"], values["num_encoder_layers"] + values["num_decoder_layers"])
    config = transformer_config_from_state_dict(state_dict)
    for key in ("hidden_size", "num_attention_heads", "num_encoder_layers", "num_decoder_layers"):
        assert config[key] == values[key]
    agreeing = transformer_config_from_state_dict(state_dict, values["num_attention_heads"], None)
    assert agreeing == config
    with pytest.raises(ValueError, match=f"are those of {preset}, which contradicts `num_attention_heads` 4"):
        transformer_config_from_state_dict(state_dict, num_attention_heads=4)
    with pytest.raises(ValueError, match="contradicts `num_decoder_layers` 3"):
        transformer_config_from_state_dict(state_dict, num_decoder_layers=3)


def test_other_checkpoints_need_head_count_and_split_that_fit():
    state_dict = _shapes_only(96, 4)
    with pytest.raises(ValueError, match="none of the paper's configurations .* `num_attention_heads` and `num_decod"):
        transformer_config_from_state_dict(state_dict)
    with pytest.raises(ValueError, match="positive divisor of the width 96, got 5"):
        transformer_config_from_state_dict(state_dict, 5, 1)
    with pytest.raises(ValueError, match="positive divisor of the width 96, got 0"):
        transformer_config_from_state_dict(state_dict, 0, 1)
    assert transformer_config_from_state_dict(state_dict, 6, 1)["num_encoder_layers"] == 3


def test_a_checkpoint_failing_its_crc_is_refused(tmp_path):
    data = bytearray(TRANSFORMER.read_bytes())
    with zipfile.ZipFile(TRANSFORMER) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    data[start + member.file_size // 2] ^= 0xFF
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"its member '{member.filename}' fails its CRC check"):
        convert_transformer(damaged, num_attention_heads=2, num_decoder_layers=1)


def test_integer_and_non_finite_weights_are_refused(tmp_path):
    def edit(state_dict):
        state_dict["blocks.0.attn.q.weight"] = state_dict["blocks.0.attn.q.weight"].to(torch.int8)
        state_dict["norm.weight"] = state_dict["norm.weight"].clone()
        state_dict["norm.weight"][0] = float("nan")

    with pytest.raises(CheckpointMismatchError) as error:
        convert_transformer(_modified_checkpoint(tmp_path, edit), num_attention_heads=2, num_decoder_layers=1)
    assert "not floating point (casting them would change them): blocks.0.attn.q.weight (torch.int8)" in str(
        error.value
    )
    assert "weights holding NaN or inf: norm.weight" in str(error.value)


def test_weights_overflowing_the_target_dtype_are_refused(tmp_path):
    def edit(state_dict):
        state_dict["norm.weight"] = state_dict["norm.weight"].float()
        state_dict["norm.weight"][0] = 1e6  # beyond float16's range

    checkpoint = _modified_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=r"converted transformer has NaN or inf weights \(head.norm_out.weight\)"):
        convert_enat_pipeline(checkpoint, VQGAN, 256, dtype="fp16", num_attention_heads=2, num_decoder_layers=1)


def test_imagenet_class_names_are_written_by_default(tmp_path):
    def edit(state_dict):  # 1000 classes + the null class, as the ImageNet checkpoints
        table = state_dict["y_embedder.embedding_table.weight"]
        state_dict["y_embedder.embedding_table.weight"] = table[:1].repeat(1001, 1)

    checkpoint = _modified_checkpoint(tmp_path, edit)
    _run_script("--checkpoint", str(checkpoint), *BASE[2:], "--output_dir", str(tmp_path / "out"), *TINY)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.get_label_ids(["golden retriever", "tench", "crane", "crane (machine)"]) == [207, 0, 134, 517]
    assert pipe.config.id2label["207"] == "golden retriever"
    # a tiny model with 10 classes gets no ImageNet names
    assert not DiffusionPipeline.from_pretrained(_converted_tiny(tmp_path)).config.id2label


def _converted_tiny(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    _run_script(*BASE, "--output_dir", str(folder), *TINY)
    return folder


def test_imagenet_names_give_each_name_to_one_class():
    id2label = imagenet_id2label()
    assert sorted(id2label) == list(range(1000))
    names = [name.strip().casefold() for names in id2label.values() for name in names.split(",")]
    assert len(names) == len(set(names)) and all(names)


def test_an_id2label_file_that_does_not_fit_is_refused(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "cat, kitty", "1": "Kitty", "12": "dog"}))
    with pytest.raises(SystemExit) as refused:
        _run_script(*BASE, "--output_dir", str(tmp_path / "out"), *TINY, "--id2label", str(labels))
    message = str(refused.value)
    assert "'Kitty' names classes 0 and 1" in message and "class id 12 is outside [0, 9]" in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# What earlier killed runs left, full disks and pushes that cannot work: found at start-up, said in one sentence


def _refusing_main(monkeypatch):
    main = _script_main()

    def refuse(*args, **kwargs):
        raise AssertionError("converted before the start-up checks")

    monkeypatch.setitem(main.__globals__, "convert_enat_pipeline", refuse)
    return main


def test_leftovers_of_a_killed_run_are_removed_and_reported(tmp_path, capsys):
    unfinished = tmp_path / f".out.{'a' * 32}.tmp"
    (unfinished / "transformer").mkdir(parents=True)
    (unfinished / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
    replaced = tmp_path / f".out.{'b' * 32}.old"
    replaced.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model_index.json").write_text("{}")
    _run_script(*BASE, "--output_dir", str(tmp_path / "out"), *TINY, "--overwrite")
    output = capsys.readouterr().out
    assert f"removed {unfinished}, an unfinished conversion left by an earlier run" in output
    assert f"removed {replaced}, the previous {tmp_path / 'out'} that an earlier run had already replaced" in output
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_a_kill_between_the_two_renames_is_recovered_and_says_where_the_old_folder_was(tmp_path, capsys, monkeypatch):
    # The state a kill -9 between `save_converted`'s renames leaves: the old folder moved aside, the new one complete
    # but still under its temporary name, no output folder.
    old = tmp_path / f".out.{'c' * 32}.old"
    old.mkdir()
    (old / "model_index.json").write_text('{"old": true}')
    (tmp_path / f".out.{'d' * 32}.tmp").mkdir()
    with pytest.raises(SystemExit) as stopped:
        _refusing_main(monkeypatch)([*BASE, "--output_dir", str(tmp_path / "out")])  # no --overwrite: keeps it
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert f"restored {tmp_path / 'out'} from {old}: an earlier run was stopped while replacing it" in captured.out
    assert "is not empty; choose another folder or pass --overwrite" in captured.err
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "model_index.json").read_text() == '{"old": true}'


def test_too_little_free_space_is_refused_at_start_up_with_the_size_needed(tmp_path, capsys, monkeypatch):
    from enat_diffusers.conversion import common

    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: shutil_usage(free=1000))
    with pytest.raises(SystemExit):
        _refusing_main(monkeypatch)([*BASE, "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"--output_dir: not enough free space for .*out: the converted weights need about [\d.]+ GiB, "
                     r".* has 0.00 GiB free", error), error  # fmt: skip


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=10**12, used=10**12 - free, free=free)


class _DiskFull:
    """Writes part of a folder, then the disk is full."""

    components = {}

    def save_pretrained(self, path, safe_serialization):
        Path(path, "transformer").mkdir(parents=True)
        Path(path, "transformer", "weights").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_that_fills_up_while_writing_gives_a_sentence_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"the disk holding .*out filled up while the converted weights were written"):
        save_converted(_DiskFull(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("repo_id", "token", "message"),
    [
        ("not a repo!!", "hf_x", r"--push_to_hub 'not a repo!!' is not a Hub repo id"),
        ("enat-l-256", "hf_x", r"--push_to_hub 'enat-l-256': give the repo as NAMESPACE/NAME"),
        (
            "me/enat-l-256",
            None,
            r"--push_to_hub 'me/enat-l-256' needs a Hub token: run `hf auth login` or set HF_TOKEN",
        ),
    ],
)
def test_push_to_hub_problems_are_found_before_the_conversion(tmp_path, capsys, monkeypatch, repo_id, token, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    with pytest.raises(SystemExit) as stopped:
        _refusing_main(monkeypatch)([*BASE, "--output_dir", str(tmp_path / "out"), "--push_to_hub", repo_id])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and re.search(message, error.strip().splitlines()[-1]) and "Traceback" not in error
