"""examples/sample_at_scale.py on the packaged demo models: shards, determinism across process counts, resuming."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file, save_file

from enat_diffusers.demo import demo_path

from .example_scripts import load_example

NUM_CLASSES = 10
PER_CLASS = 2
NUM_IMAGES = NUM_CLASSES * PER_CLASS
# 7 shards of 3 images (the last one of 2), each generated in batches of 2 and 1
RUN_ARGS = [
    "--model",
    "demo:digits",
    "--num_images_per_prompt",
    str(PER_CLASS),
    "--batch_size",
    "2",
    "--shard_size",
    "3",
]
NUM_SHARDS = 7


sample_at_scale = load_example("sample_at_scale")


pytestmark = pytest.mark.usefixtures("single_thread")


def _run(output_dir: Path, *args: str, base: list[str] = RUN_ARGS) -> dict:
    """The script's `main` in this process, with a fresh accelerate state."""
    AcceleratorState._reset_state(True)
    try:
        return sample_at_scale.main([*base, "--output_dir", str(output_dir), *args])
    finally:
        AcceleratorState._reset_state(True)


def _pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted((folder / "images").glob("*.png"))])


def _mtimes(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """Modification time and inode of each file: a rewritten file (a new file renamed into place) changes both."""
    return {path: (path.stat().st_mtime_ns, path.stat().st_ino) for path in paths}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A complete single-process run in png and npz."""
    output_dir = tmp_path_factory.mktemp("sample_at_scale") / "reference"
    summary = _run(output_dir, "--format", "both")
    assert summary["complete"] and summary["generated_shards"] == list(range(NUM_SHARDS))
    return output_dir


def test_single_process_run_writes_every_image_once(reference):
    expected_labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    with np.load(reference / "samples.npz") as merged:
        assert sorted(merged.files) == ["arr_0", "labels"]
        images, labels = merged["arr_0"], merged["labels"]
    assert images.dtype == np.uint8 and images.shape == (NUM_IMAGES, 16, 16, 3)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(np.load(reference / "labels.npy"), expected_labels)
    assert len({image.tobytes() for image in images}) == NUM_IMAGES  # each image has its own generator

    shards = sorted((reference / "shards").glob("*.npz"))
    assert [path.name for path in shards] == [f"shard_{shard:06d}.npz" for shard in range(NUM_SHARDS)]
    for shard, path in enumerate(shards):
        with np.load(path) as data:
            indices = np.arange(3 * shard, min(3 * shard + 3, NUM_IMAGES))
            np.testing.assert_array_equal(data["indices"], indices)
            np.testing.assert_array_equal(data["labels"], expected_labels[indices])
            np.testing.assert_array_equal(data["arr_0"], images[indices])
    names = sorted(path.name for path in (reference / "images").iterdir())
    assert names == [f"{index:06d}.png" for index in range(NUM_IMAGES)]
    np.testing.assert_array_equal(_pngs(reference), images)
    assert not list(reference.rglob("*.tmp"))

    settings = json.loads((reference / "manifest.json").read_text())["settings"]
    assert settings["num_inference_steps"] == 8 and settings["guidance_scale"] == 3.5  # the demo's saved defaults
    assert settings["scheduler"]["masking_schedule"] == "cosine" and settings["shard_size"] == 3
    timing = json.loads((reference / "timing.json").read_text())
    assert timing["num_processes"] == 1 and timing["images"] == NUM_IMAGES
    assert timing["per_process"][0]["shards"] == list(range(NUM_SHARDS)) and timing["images_per_second"] > 0


def test_class_subset_cycles_and_sampling_flags_reach_the_scheduler(tmp_path, capsys):
    summary = _run(
        tmp_path / "out",
        "--class_labels", "3", "seven", "--num_images", "5", "--batch_size", "5", "--num_inference_steps", "4",
        "--masking_schedule", "linear", "--sample_temperature", "2", "--guidance_scale", "0",
        base=["--model", "demo:digits"],
    )  # fmt: skip
    assert summary["complete"]
    printed = capsys.readouterr().out
    assert "0 of 1 shards done already; 1 to do on 1 process(es)" in printed
    assert "process 0: 5 images in" in printed and "images/s" in printed
    with np.load(tmp_path / "out" / "samples.npz") as merged:
        np.testing.assert_array_equal(merged["labels"], [3, 7, 3, 7, 3])
        assert merged["arr_0"].shape == (5, 16, 16, 3)
    settings = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]
    assert settings["class_labels"] == [3, 7] and settings["num_images_per_prompt"] is None
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == (4, 0.0)
    assert settings["scheduler"]["masking_schedule"] == "linear" and settings["scheduler"]["sample_temperature"] == 2
    assert not (tmp_path / "out" / "images").exists()  # npz is the default format


def test_resume_regenerates_only_incomplete_shards(reference, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(reference, output_dir)
    (output_dir / "shards" / "shard_000004.npz").unlink()
    (output_dir / "images" / "000005.png").unlink()  # one image of shard 1
    (output_dir / "samples.npz").unlink()
    untouched = [output_dir / "shards" / f"shard_{shard:06d}.npz" for shard in (0, 2, 3, 5, 6)]
    untouched += [output_dir / "images" / f"{index:06d}.png" for index in (0, 1, 2, 6, 9, 11, 15, 18, 19)]
    before = _mtimes(untouched)
    summary = _run(output_dir, "--format", "both")
    assert summary["complete"] and summary["generated_shards"] == [1, 4]
    assert _mtimes(untouched) == before
    with np.load(reference / "samples.npz") as expected, np.load(output_dir / "samples.npz") as resumed:
        np.testing.assert_array_equal(resumed["arr_0"], expected["arr_0"])
        np.testing.assert_array_equal(resumed["labels"], expected["labels"])
    np.testing.assert_array_equal(_pngs(output_dir), _pngs(reference))

    timing = (output_dir / "timing.json").read_text()
    nothing_to_do = _run(output_dir, "--format", "both", "--num_inference_steps", "8", "--guidance_scale", "3.5")
    assert nothing_to_do["complete"] and nothing_to_do["generated_shards"] == []  # explicit defaults: same settings
    assert json.loads(timing)["images"] == 6 and (output_dir / "timing.json").read_text() == timing


def test_other_settings_are_refused(reference):
    manifest = reference / "manifest.json"
    before = _mtimes([manifest, *sorted((reference / "shards").iterdir())])
    with pytest.raises(SystemExit) as refused:
        _run(reference, "--format", "both", "--seed", "1", "--masking_schedule", "linear")
    message = str(refused.value)
    assert "other settings" in message and "seed: 0 in the manifest, 1 now" in message
    assert '"masking_schedule": "linear"' in message and "choose another --output_dir" in message
    with pytest.raises(SystemExit, match="shard_size: 3 in the manifest, 2 now"):
        _run(reference, "--format", "both", "--shard_size", "2")
    with pytest.raises(SystemExit, match='format: "both" in the manifest, "npz" now'):
        _run(reference)
    assert _mtimes(list(before)) == before


def _assert_same_samples(output_dir: Path, reference: Path) -> None:
    with np.load(reference / "samples.npz") as expected, np.load(output_dir / "samples.npz") as actual:
        np.testing.assert_array_equal(actual["arr_0"], expected["arr_0"])
        np.testing.assert_array_equal(actual["labels"], expected["labels"])


def test_damaged_shards_are_named_and_generated_again(reference, tmp_path, capsys):
    output_dir = tmp_path / "out"
    shutil.copytree(reference, output_dir)
    (output_dir / "samples.npz").unlink()
    # shard 2 keeps its indices and labels but holds other images; shard 4 is cut short; a png of shard 5 changes
    with np.load(output_dir / "shards" / "shard_000002.npz") as data:
        arrays = {name: data[name] for name in data.files}
    arrays["arr_0"] = 255 - arrays["arr_0"]
    np.savez(output_dir / "shards" / "shard_000002.npz", **arrays)
    truncated = output_dir / "shards" / "shard_000004.npz"
    truncated.write_bytes(truncated.read_bytes()[:300])
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(output_dir / "images" / "000016.png")
    untouched = _mtimes([output_dir / "shards" / f"shard_{shard:06d}.npz" for shard in (0, 1, 3, 6)])

    summary = _run(output_dir, "--format", "both")
    printed = capsys.readouterr().out
    assert summary["complete"] and summary["generated_shards"] == [2, 4, 5]
    assert f"shard 2 is damaged and will be generated again: {output_dir / 'shards' / 'shard_000002.npz'}" in printed
    assert f"{output_dir / 'shards' / 'shard_000004.npz'} is not the file that was written" in printed
    assert f"{output_dir / 'images' / '000016.png'} is not the file that was written" in printed
    assert _mtimes(list(untouched)) == untouched
    _assert_same_samples(output_dir, reference)
    np.testing.assert_array_equal(_pngs(output_dir), _pngs(reference))


def test_a_kill_before_a_shard_is_recorded_leaves_it_to_do(reference, tmp_path, monkeypatch):
    """A shard whose npz was renamed into place but whose record was not yet written is generated again."""
    write_json = sample_at_scale._write_json

    def killed_at_shard_3(path, data):
        if path.name == "shard_000003.json":
            raise KeyboardInterrupt("killed")
        write_json(path, data)

    monkeypatch.setattr(sample_at_scale, "_write_json", killed_at_shard_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "out")
    assert (tmp_path / "out" / "shards" / "shard_000003.npz").is_file()
    monkeypatch.setattr(sample_at_scale, "_write_json", write_json)
    summary = _run(tmp_path / "out")
    assert summary["complete"] and summary["generated_shards"] == [3, 4, 5, 6]
    _assert_same_samples(tmp_path / "out", reference)


def test_a_truncated_or_changed_merged_file_is_rebuilt(reference, tmp_path, capsys):
    output_dir = tmp_path / "out"
    shutil.copytree(reference, output_dir)
    merged = output_dir / "samples.npz"
    merged.write_bytes(merged.read_bytes()[: merged.stat().st_size // 2])
    summary = _run(output_dir, "--format", "both")
    assert summary["complete"] and summary["generated_shards"] == []
    assert (
        "samples.npz is incomplete or changed since it was written; merging the shards again"
        in capsys.readouterr().out
    )
    _assert_same_samples(output_dir, reference)


def test_a_lost_timing_file_is_rebuilt_from_the_shard_records(reference, tmp_path, capsys):
    output_dir = tmp_path / "out"
    shutil.copytree(reference, output_dir)
    (output_dir / "timing.json").unlink()
    summary = _run(output_dir, "--format", "both")
    assert summary["complete"] and summary["generated_shards"] == []
    assert "timing.json was missing: rebuilt from the shard records" in capsys.readouterr().out
    timing = json.loads((output_dir / "timing.json").read_text())
    assert timing["images"] == NUM_IMAGES and timing["images_per_second"] > 0
    assert timing["per_process"][0]["shards"] == list(range(NUM_SHARDS))


def test_shards_without_a_manifest_are_refused(reference, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(reference, output_dir)
    (output_dir / "manifest.json").unlink()
    with pytest.raises(SystemExit, match="holds samples but no manifest.json"):
        _run(output_dir, "--format", "both")
    assert not (output_dir / "manifest.json").exists()


def test_other_weights_behind_the_same_model_path_are_refused(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(demo_path("digits"), model)
    base = ["--model", str(model), "--num_images", "2", "--num_inference_steps", "2"]
    assert _run(tmp_path / "out", base=base)["complete"]
    recorded = (tmp_path / "out" / "manifest.json").read_text()
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    with pytest.raises(SystemExit) as refused:
        _run(tmp_path / "out", base=base)
    assert "model files changed, added or removed since the manifest: transformer/diffusion_pytorch_model" in str(
        refused.value
    )
    assert (tmp_path / "out" / "manifest.json").read_text() == recorded


def test_old_flag_names_still_work_with_a_deprecation_warning(tmp_path):
    base = ["--model", "demo:digits", "--output_dir", str(tmp_path)]
    with pytest.warns(FutureWarning) as warned:
        args = sample_at_scale.parse_args([*base, "--per_class", "3", "--mask_schedule", "linear"])
    messages = [str(warning.message) for warning in warned]
    assert any("--per_class is deprecated" in m and m.endswith("use --num_images_per_prompt") for m in messages)
    assert any("--mask_schedule is deprecated" in m and m.endswith("use --masking_schedule") for m in messages)
    assert args.num_images_per_prompt == 3 and args.masking_schedule == "linear"


def _sample_in_this_process(argv: list[str]) -> None:
    sample_at_scale.main(argv)


def test_two_processes_resume_a_one_process_run_with_identical_images(reference, tmp_path, monkeypatch):
    """Interrupted after 2 shards on one process, finished by two processes: the same images as in one go.

    accelerate's `debug_launcher` forks two CPU processes joined in a gloo group (a file rendezvous, no network
    port), so the barriers, the broadcast of the shards to do and the gathering of the timings run for real.
    """
    output_dir = tmp_path / "out"
    partial = _run(output_dir, "--format", "both", "--max_shards", "2")
    assert partial["generated_shards"] == [0, 1] and not partial["complete"]
    assert partial["missing_shards"] == list(range(2, NUM_SHARDS)) and not (output_dir / "samples.npz").exists()
    finished = [output_dir / "shards" / f"shard_00000{shard}.npz" for shard in (0, 1)]
    finished += [output_dir / "images" / f"{index:06d}.png" for index in range(6)]
    before = _mtimes(finished)
    (output_dir / "shards" / ".shard_000002.npz.0123.tmp").write_bytes(b"left by an interrupted write")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else accelerate gives each CPU process all the cores
    AcceleratorState._reset_state(True)
    argv = [*RUN_ARGS, "--format", "both", "--output_dir", str(output_dir)]
    debug_launcher(_sample_in_this_process, args=(argv,), num_processes=2)

    timing = json.loads((output_dir / "timing.json").read_text())
    assert timing["num_processes"] == 2 and timing["images"] == NUM_IMAGES - 6
    per_process = [set(entry["shards"]) for entry in timing["per_process"]]
    assert all(per_process) and not per_process[0] & per_process[1]  # both worked, no shard twice
    assert per_process[0] | per_process[1] == set(range(2, NUM_SHARDS))
    assert _mtimes(finished) == before  # the first run's shards were not regenerated
    assert not list(output_dir.rglob("*.tmp"))
    assert len(list((output_dir / "shards").glob("*.npz"))) == NUM_SHARDS
    assert len(list((output_dir / "images").iterdir())) == NUM_IMAGES
    with np.load(reference / "samples.npz") as expected, np.load(output_dir / "samples.npz") as combined:
        np.testing.assert_array_equal(combined["arr_0"], expected["arr_0"])
        np.testing.assert_array_equal(combined["labels"], expected["labels"])
    np.testing.assert_array_equal(_pngs(output_dir), _pngs(reference))


def test_text_pipeline_with_a_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 2\na handwritten one\n")
    base = ["--model", "demo:digits-text", "--prompts_file", str(prompts), "--num_images_per_prompt", "2"]
    summary = _run(tmp_path / "out", "--batch_size", "3", "--shard_size", "4", base=base)
    assert summary["complete"] and summary["generated_shards"] == [0, 1]
    with np.load(tmp_path / "out" / "samples.npz") as merged:
        assert sorted(merged.files) == ["arr_0", "prompt_indices"]
        np.testing.assert_array_equal(merged["prompt_indices"], [0, 0, 1, 1, 2, 2])
        assert merged["arr_0"].shape == (6, 16, 16, 3)
    recorded = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert recorded == ["a handwritten seven", "the digit 2", "a handwritten one"]

    prompts.write_text("a handwritten eight\nthe digit 2\na handwritten one\n")
    with pytest.raises(SystemExit, match="prompts_sha256"):
        _run(tmp_path / "out", "--batch_size", "3", "--shard_size", "4", base=base)


def test_prompts_files(tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps(["the digit 2", "", "  a handwritten one "]))
    assert sample_at_scale.read_prompts(str(tmp_path / "prompts.json")) == ["the digit 2", "", "  a handwritten one "]
    (tmp_path / "prompts.txt").write_text("  the digit 2 \r\n\n a handwritten one\n")
    assert sample_at_scale.read_prompts(str(tmp_path / "prompts.txt")) == ["the digit 2", "a handwritten one"]
    (tmp_path / "broken.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="is not valid json"):
        sample_at_scale.read_prompts(str(tmp_path / "broken.json"))


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fails the test if a pipeline's weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the flags were checked")

    monkeypatch.setattr(sample_at_scale, "load_pipeline", refuse)
    monkeypatch.setattr(sample_at_scale.DiffusionPipeline, "from_pretrained", refuse)


def _error(capsys, output_dir: Path, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        _run(output_dir, *argv, base=[])
    if stopped.value.code == 2:  # argparse: the message went to stderr
        return capsys.readouterr().err
    return str(stopped.value.code)


def test_bad_flags_fail_clearly_before_loading_the_model(tmp_path, capsys, nothing_heavy):
    prompts, empty, not_a_list = tmp_path / "p.txt", tmp_path / "empty.txt", tmp_path / "p.json"
    prompts.write_text("the digit 2\n")
    empty.write_text("\n\n")
    not_a_list.write_text('{"prompt": "the digit 2"}')
    digits, text = ["--model", "demo:digits"], ["--model", "demo:digits-text"]
    cases = [
        ([*digits, "--num_images_per_prompt", "0"], "--num_images_per_prompt must be a positive integer, got 0"),
        ([*digits, "--num_images", "4", "--batch_size", "-2"], "--batch_size must be a positive integer"),
        ([*digits, "--num_images", "4", "--format", "jpg"], "argument --format: invalid choice: 'jpg'"),
        ([*digits, "--num_images", "4", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        ([*digits, "--num_images", "4", "--guidance_scale", "-1"], "--guidance_scale must be a finite number >= 0"),
        ([*digits, "--num_images", "4", "--device", "gpu"], "--device must be a torch device"),
        (digits, "pass --num_images, or --num_images_per_prompt"),
        ([*digits, "--class_labels", "2", "--prompts_file", str(prompts)], "--class_labels (class-conditional) can"),
        (["--model", "demo:cats", "--num_images", "4"], "is not a packaged demo; available: demo:digits"),
        ([*text, "--prompts_file", str(empty), "--num_images", "2"], "holds no prompts"),
        ([*text, "--prompts_file", str(not_a_list), "--num_images", "2"], "must hold a json list of strings"),
        (["--model", str(tmp_path / "nowhere"), "--num_images", "4"], "no diffusers pipeline found there"),
        ([*digits, "--num_images", "7", "--num_images_per_prompt", "2"], "must equal --num_images_per_prompt 2 x 10"),
        ([*digits, "--class_labels", "3", "12", "--num_images_per_prompt", "1"], "class ids in [0, 9], got [12]"),
        ([*digits, "--class_labels", "3", "three", "--num_images", "2"], "must not repeat a class, got [3, 'three']"),
        ([*digits, "--class_labels", "sevn", "--num_images", "2"], "unknown class name(s) ['sevn']; the model has"),
        ([*digits, "--num_images", "4", "--num_inference_steps", "17"], "at most the 16 tokens of an image, got 17"),
        ([*digits, "--prompts_file", str(prompts), "--num_images", "2"], "is class-conditional"),
        ([*text, "--class_labels", "2", "--num_images", "2"], "text-to-image pipeline: pass --prompts_file (--class"),
    ]
    for argv, expected in cases:
        output_dir = tmp_path / "never_written"
        assert expected in _error(capsys, output_dir, argv), argv
        assert not output_dir.exists()


def test_image_seeds_depend_on_seed_and_index_only():
    seeds = {sample_at_scale.image_seed(seed, index) for seed in range(3) for index in range(1000)}
    assert len(seeds) == 3000 and all(0 <= seed < 2**64 for seed in seeds)
    assert sample_at_scale.image_seed(1, 5) == sample_at_scale.image_seed(1, 5)
    torch.Generator().manual_seed(max(seeds))  # every seed is accepted by torch


class _RecordingPipeline:
    """Stands in for a pipeline: records each call and returns one grey level per image."""

    def __init__(self):
        self.calls = []

    def __call__(self, generator, output_type, **kwargs):
        self.calls.append({"seeds": [g.initial_seed() for g in generator], "output_type": output_type, **kwargs})
        levels = torch.stack([torch.rand((), generator=g) for g in generator]).numpy()
        return SimpleNamespace(images=np.broadcast_to(levels[:, None, None, None], (len(generator), 2, 2, 3)))


def test_each_image_gets_its_own_generator_condition_and_settings(tmp_path):
    argv = ["--model", "demo:digits", "--output_dir", str(tmp_path), "--num_images_per_prompt", "3"]
    args = sample_at_scale.parse_args(argv)
    args.seed = 7
    plan = sample_at_scale.make_plan(args, sample_at_scale.describe_model("demo:digits"), torch.device("cpu"))
    pipe = _RecordingPipeline()
    together = sample_at_scale.generate_batch(pipe, plan, [4, 5, 6], torch.device("cpu"))
    alone = sample_at_scale.generate_batch(pipe, plan, [6], torch.device("cpu"))
    np.testing.assert_array_equal(together[2], alone[0])  # image 6 does not depend on its batch
    assert together.dtype == np.uint8 and together.shape == (3, 2, 2, 3)
    assert pipe.calls[0] == {
        "seeds": [sample_at_scale.image_seed(7, index) for index in (4, 5, 6)],
        "output_type": "np",
        "class_labels": [1, 1, 2],
        "num_inference_steps": 8,
        "guidance_scale": 3.5,
        "guidance_schedule": "linear",
    }


def test_compile_prefers_regional_compilation(monkeypatch):
    calls = []

    class Regional(torch.nn.Module):
        _repeated_blocks = ["Block"]

        def compile_repeated_blocks(self, **kwargs):
            calls.append(("regional", kwargs))

    class Plain(torch.nn.Module):
        def compile(self, **kwargs):
            calls.append(("full", kwargs))

    assert sample_at_scale.compile_transformer(Regional()) == "regional"
    assert sample_at_scale.compile_transformer(Plain()) == "full"
    assert calls == [("regional", {"dynamic": True}), ("full", {"dynamic": True})]
