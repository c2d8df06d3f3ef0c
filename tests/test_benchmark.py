"""examples/benchmark.py on a tiny configuration: runs end to end, counts FLOPs consistently, checks its rows."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from enat_diffusers.cpu_memory import cpu_memory_reuse_enabled, cpu_memory_reuse_supported
from enat_diffusers.pipelines.pipeline_enat import ENATPipeline
from enat_diffusers.testing_utils import randomize_modulation

from .example_scripts import load_example
from .tiny_components import TINY_TRANSFORMER_CONFIG

TINY_CONFIG = {
    **TINY_TRANSFORMER_CONFIG,
    "vqvae": {
        "hidden_channels": 8,
        "channel_multipliers": [1, 2],
        "layers_per_block": 1,
        "latent_channels": 8,
        "norm_num_groups": 4,
    },
    "amused": {
        "sample_size": 4,
        "hidden_size": 32,
        "cond_embed_dim": 8,
        "micro_cond_encode_dim": 2,
        "micro_cond_embed_dim": 10,
        "encoder_hidden_size": 8,
        "vocab_size": 17,
        "codebook_size": 16,
        "in_channels": 8,
        "block_out_channels": 8,
        "num_res_blocks": 1,
        "block_num_heads": 1,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "intermediate_size": 16,
    },
}


@pytest.fixture(scope="module")
def benchmark():
    return load_example("benchmark")


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def _args(benchmark, config: Path, *extra: str) -> argparse.Namespace:
    return benchmark.parse_args(["--config", str(config), "--batch_sizes", "2", *extra])


def test_runs_end_to_end_and_writes_json(benchmark, tiny_config, tmp_path):
    output = tmp_path / "result.json"
    argv = ["--config", str(tiny_config), "--batch_sizes", "1", "2", "--warmup", "0", "--repeats", "1"]
    benchmark.main([*argv, "--num_inference_steps", "4", "--amused_steps", "3", "--json", str(output)])
    report = json.loads(output.read_text())
    assert {"config", "notes", "results", "ratios", "machine", "process_max_rss_mib"} <= set(report)
    assert report["machine"]["busy_cores"] == 0 and "load_average" in report["machine"]["load_before"]
    # as the scripts run: freed CPU memory kept for reuse, where the C library allows it
    assert report["machine"]["cpu_memory_reuse"] == {"mode": "on", "applied": cpu_memory_reuse_supported()}
    assert {"gflops", "seconds", "memory"} == set(report["notes"])
    assert [(r["row"], r["batch_size"]) for r in report["results"]] == [
        (row, batch_size) for batch_size in (1, 2) for row in benchmark.ROWS
    ]
    expected_keys = {"gflops_per_image", "seconds_per_image", "images_per_second", "peak_memory_mib", "finite"}
    for result in report["results"]:
        assert expected_keys <= set(result)
        assert result["finite"] and result["gflops_per_image"] > 0 and result["peak_memory_mib"] > 0
    assert set(report["ratios"]["2"]) == {"no_reuse", "plain_nat", "amused"}
    assert report["ratios"]["2"]["plain_nat"]["flops_vs_enat"] > 1


def test_flop_counts_are_deterministic_and_ordered(benchmark, tiny_config):
    args = _args(benchmark, tiny_config, "--rows", "enat", "no_reuse", "plain_nat")
    setup = benchmark.load_setup(args)
    setup.transformer = benchmark.to_device(setup.transformer, torch.device("cpu"), torch.float32)
    rows = benchmark.build_rows(setup, args, torch.device("cpu"), torch.float32)
    excluded = benchmark.weight_addresses([setup.transformer])
    with torch.no_grad():
        first = {row.name: benchmark.analyse(row, 2, torch.device("cpu"), excluded) for row in rows}
        second = {row.name: benchmark.analyse(row, 2, torch.device("cpu"), excluded) for row in rows}
    flops = {name: stats["gflops_per_image"] for name, stats in first.items()}
    assert flops == {name: stats["gflops_per_image"] for name, stats in second.items()}
    assert 0 < flops["enat"] < flops["no_reuse"] < flops["plain_nat"]
    for name in ("no_reuse", "plain_nat"):
        assert first[name]["finite"], f"{name} produced non-finite logits or invalid ids"
    # the reuse state keeps one (B, L, D) / (B, L) shape across steps: guidance doubles the batch of 2
    assert first["enat"]["reuse_state_constant"]
    assert first["enat"]["reuse_state_shapes"] == [[[4, 16, 32], [4, 16]]]


def test_enat_row_samples_what_the_pipeline_samples(benchmark, tiny_config):
    args = _args(benchmark, tiny_config, "--rows", "enat")
    setup = benchmark.load_setup(args)
    setup.transformer = benchmark.to_device(setup.transformer, torch.device("cpu"), torch.float32)
    (row,) = benchmark.build_rows(setup, args, torch.device("cpu"), torch.float32)
    pipe = ENATPipeline(transformer=setup.transformer, vqvae=None, scheduler=setup.scheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        class_labels=[0, 1],
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        output_type="latent",
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    assert torch.equal(row.sample(2), expected)


def test_plain_nat_matches_the_encoder_on_a_fully_visible_grid(benchmark):
    """Without mask tokens and decoder blocks, ENAT's forward is exactly the plain NAT forward."""
    from enat_diffusers.models.transformer_enat import ENATTransformer2DModel

    torch.manual_seed(0)
    config = {k: v for k, v in TINY_CONFIG.items() if k not in ("amused", "vqvae")}
    model = ENATTransformer2DModel(**{**config, "num_decoder_layers": 0}).eval()
    randomize_modulation(model)
    ids = torch.randint(0, 16, (2, 4, 4))
    labels = torch.tensor([1, 5])
    with torch.no_grad():
        expected = model(ids, class_labels=labels)
        plain = benchmark.plain_nat_logits(model, ids, expected.conditioning)
    expected = expected.logits
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)


def test_peak_tensor_memory_counts_live_storages_once(benchmark):
    weight = torch.ones(512)
    with benchmark.PeakTensorMemory(
        benchmark.weight_addresses([torch.nn.Linear(2, 2)]) | {weight.data_ptr()}
    ) as tracker:
        first = torch.ones(1024)  # 4 KiB
        second = torch.ones(2048)  # 8 KiB
        views = [second[:10], second.view(2, 1024), weight[:3]]  # views and weights add nothing
        del first
        third = torch.ones(256)  # 1 KiB, after 4 KiB were freed
    assert tracker.peak == 4096 + 8192
    assert tracker.current == 8192 + 1024
    del views, second, third


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "ENAT-XL"], "--config must be one of"),
        (["--batch_sizes", "0"], "must be a positive integer"),
        (["--guidance_scale", "0.5"], "--guidance_scale must be a finite number >= 1"),
        (["--compile", "--rows", "amused"], "keep `enat` in --rows"),
        (["--reference_dir", "/nonexistent"], "checkout of LeapLabTHU/ENAT"),
        (["--breakdown"], "give --precisions too"),
        (["--busy_cores", str(os.cpu_count())], "--busy_cores must leave a core"),
    ],
)
def test_bad_command_lines_fail_clearly(benchmark, capsys, argv, message):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bad_json_config_fails_clearly(benchmark, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"hidden_size": 32, "not_an_argument": 1}))
    with pytest.raises(SystemExit, match="invalid ENATTransformer2DModel arguments"):
        benchmark.load_setup(benchmark.parse_args(["--config", str(path)]))


@pytest.mark.skipif(
    not (Path(os.environ.get("ENAT_REFERENCE_DIR", "/nonexistent")) / "libs" / "models.py").is_file(),
    reason="set ENAT_REFERENCE_DIR to a checkout of LeapLabTHU/ENAT",
)
def test_reference_pair_agrees_on_a_reuse_step(benchmark, tmp_path):
    path = tmp_path / "tiny1000.json"
    path.write_text(
        json.dumps({**{k: v for k, v in TINY_CONFIG.items() if k not in ("amused", "vqvae")}, "num_classes": 1000})
    )
    args = benchmark.parse_args(["--config", str(path)])
    setup = benchmark.load_setup(args)
    models_module, _ = benchmark.import_reference_modules(os.environ["ENAT_REFERENCE_DIR"])
    reference, ours = benchmark.reference_pair(models_module, setup.transformer.config, seed=0)
    parity = benchmark.teacher_forced_parity(reference, ours, torch.device("cpu"))
    assert parity["max_abs_logit_diff"] < 1e-4 * max(1.0, parity["max_abs_logit"])


def test_help_and_report_speak_to_users_without_fixed_thresholds(benchmark, tiny_config, tmp_path):
    text = benchmark.build_parser().format_help()
    assert "issue" not in text and "target" not in text
    output = tmp_path / "result.json"
    benchmark.main(["--config", str(tiny_config), "--rows", "enat", "--batch_sizes", "1", "--warmup", "0",
                    "--repeats", "1", "--num_inference_steps", "2", "--json", str(output)])  # fmt: skip
    assert "target" not in output.read_text()


def test_end_to_end_precisions_report_decode_share_agreement_breakdown_and_matmul_rate(benchmark, tiny_config):
    pytest.importorskip("torchao.quantization", reason="the int8 row needs the `quant` extra")
    args = benchmark.parse_args(
        ["--config", str(tiny_config), "--rows", "--batch_sizes", "2", "--warmup", "0", "--repeats", "1",
         "--num_inference_steps", "3", "--precisions", "fp32", "torchao_int8_weight_only", "--breakdown", "--matmul_rates"]
    )  # fmt: skip
    report = benchmark.run_benchmark(args)
    assert report["results"] == []
    results = {r["precision"]: r for r in report["precisions"]["results"]}
    assert set(results) == {"fp32", "torchao_int8_weight_only"}
    assert results["fp32"]["identical_tokens_vs_fp32"] == 1.0
    assert 0 <= results["torchao_int8_weight_only"]["identical_tokens_vs_fp32"] <= 1
    for result in results.values():
        # Separately timed phases of a tiny model: only their presence is checked, not their order (timing noise).
        assert result["decode_share"] > 0 and result["end_to_end_seconds_per_image"] > 0
        assert result["decode_seconds_per_image"] > 0
        parts = result["breakdown"]["seconds_per_image"]
        assert {"matmuls", "attention", "token_grouping", "scheduler", "guidance_and_pipeline", "decode"} <= set(parts)
        assert parts["matmuls"] > 0 and parts["attention"] > 0 and parts["decode"] > 0 and parts["scheduler"] > 0
        assert result["matmul_rate"]["gflops_per_second"] > 0
        assert result["fraction_of_matmul_rate"] is None or result["fraction_of_matmul_rate"] > 0
    assert report["precisions"]["speedup_vs_fp32"]["2"]["fp32"] == 1.0


def test_x86_int8_and_auto_rows_report_agreement_logit_error_capability_and_decode_variants(
    benchmark, tiny_config, tmp_path, capsys
):
    output = tmp_path / "result.json"
    benchmark.main(
        ["--config", str(tiny_config), "--rows", "--batch_sizes", "2", "--warmup", "0", "--repeats", "1",
         "--num_inference_steps", "3", "--precisions", "fp32", "int8", "auto", "--vq_channels_last", "--vq_decode",
         "--decode_variants", "fp32", "fp32_channels_last", "bf16", "int8", "--json", str(output)]
    )  # fmt: skip
    report = json.loads(output.read_text())
    capability = torch.backends.cpu.get_cpu_capability()
    cpu = report["machine"]["cpu"]
    assert cpu["features"]["capability"] == capability
    auto = cpu["auto_precision"]["precision"]
    assert report["precisions"]["auto_choice"]["precision"] == auto
    precisions = report["precisions"]
    names = [r["precision"] for r in precisions["results"]]
    assert names == ["fp32", "int8", "auto"]  # auto: the choice set up as set_precision does, its own row
    rows = {r["precision"]: r for r in precisions["results"]}
    if auto in rows:  # same transformer and seeds as the chosen precision's row: only the decoder's format differs
        assert rows["auto"]["identical_tokens_vs_fp32"] == rows[auto]["identical_tokens_vs_fp32"]
    int8 = next(r for r in precisions["results"] if r["precision"] == "int8")
    assert 0.5 <= int8["identical_tokens_vs_fp32"] < 1 or int8["identical_tokens_vs_fp32"] == 1
    assert 0 < int8["logit_relative_error_vs_fp32"] < 0.05 and int8["logit_argmax_agreement_vs_fp32"] >= 0.9
    assert int8["cpu_capability"] == capability and int8["load"]
    assert set(precisions["sampling_speedup_vs_fp32"]["2"]) == set(names)
    assert {(r["variant"], r["batch_size"]) for r in report["vq_decode"]} == {
        ("fp32", 2),
        ("fp32_channels_last", 2),
        ("bf16", 2),
        ("int8", 2),
    }
    decode = {r["variant"]: r for r in report["vq_decode"]}
    assert decode["fp32"]["max_abs_pixel_error_vs_fp32"] == 0
    assert 0 < decode["bf16"]["max_abs_pixel_error_vs_fp32"] < 0.1 and decode["bf16"]["psnr_db_vs_fp32"] > 20
    # int8 convolutions of a random tiny decoder: a coarser error than bf16's, still far from noise
    assert 0 < decode["int8"]["max_abs_pixel_error_vs_fp32"] < 0.3 and decode["int8"]["psnr_db_vs_fp32"] > 20
    out = capsys.readouterr().out
    assert f"CPU capability {capability}" in out and f"precision auto on cpu: {auto}" in out
    assert "int8, batch 2, end to end" in out and "logits relative error" in out


@pytest.mark.skipif(not cpu_memory_reuse_supported(), reason="glibc's malloc only")
def test_memory_reuse_both_times_each_precision_without_and_with_it_alternated(
    benchmark, tiny_config, tmp_path, monkeypatch
):
    reuse_at_each_call = []
    pipeline_call = ENATPipeline.__call__

    def recording_call(self, *args, **kwargs):
        reuse_at_each_call.append(cpu_memory_reuse_enabled())
        return pipeline_call(self, *args, **kwargs)

    monkeypatch.setattr(ENATPipeline, "__call__", recording_call)
    output = tmp_path / "result.json"
    benchmark.main(
        ["--config", str(tiny_config), "--rows", "--batch_sizes", "2", "--warmup", "0", "--repeats", "2",
         "--num_inference_steps", "2", "--precisions", "fp32", "--cpu_memory_reuse", "both", "--json", str(output)]
    )  # fmt: skip
    report = json.loads(output.read_text())
    results = report["precisions"]["results"]
    assert [(r["precision"], r["cpu_memory_reuse"]) for r in results] == [
        ("fp32", False),
        ("fp32+memory_reuse", True),
    ]
    assert results[1]["identical_tokens_vs_fp32"] == 1.0  # the same pipeline: only the allocator differs
    # counting FLOPs, then two repeats: each row runs in its own setting, the rows alternating
    assert reuse_at_each_call == [False, True] * 3
    assert set(report["precisions"]["speedup_vs_fp32"]["2"]) == {"fp32", "fp32+memory_reuse"}
    assert report["machine"]["cpu_memory_reuse"] == {"mode": "both", "applied": False}


def test_busy_cores_run_only_while_measuring(benchmark):
    with benchmark.BusyCores(1) as busy:
        (process,) = busy.processes
        assert process.poll() is None
    assert process.poll() is not None


@pytest.mark.parametrize("killed", ["while measuring", "before the loop started"])
def test_busy_cores_stop_when_the_benchmark_is_killed(benchmark, killed, tmp_path):
    # A benchmark killed from outside (no __exit__) must not leave a busy core behind for the next measurement, even
    # when it dies before the loop's interpreter has started (a sitecustomize that sleeps makes that start late).
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(1)\n")
    early = killed == "before the loop started"
    dies = "os.kill(os.getpid(), signal.SIGKILL)" if early else "time.sleep(60)"
    parent_code = (
        f"import os, signal, sys, time; sys.path.insert(0, {str(Path(benchmark.__file__).parent)!r})\n"
        "import benchmark\n"
        + (f"os.environ['PYTHONPATH'] = {str(tmp_path)!r}\n" if early else "")
        + f"with benchmark.BusyCores(1) as busy:\n    print(busy.processes[0].pid, flush=True)\n    {dies}"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    loop_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process_running(loop_pid):
        time.sleep(0.1)
    still_running = process_running(loop_pid)
    if still_running:  # do not leave a busy core to slow the rest of the suite
        os.kill(loop_pid, signal.SIGKILL)
    assert not still_running


def process_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an exited process its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_editing_rows_cost_less_per_image_with_shared_samples_and_less_than_amused(benchmark, tiny_config):
    args = benchmark.parse_args(
        ["--config", str(tiny_config), "--rows", "enat", "--batch_sizes", "1", "--editing", "--flops_only",
         "--inpaint_fractions", "0.25", "0.5", "--num_inference_steps", "4", "--amused_steps", "4",
         "--kept_context_modes", "fixed", "refreshed"]
    )  # fmt: skip
    report = benchmark.run_benchmark(args)
    results = {r["row"]: r for r in report["results"]}
    assert set(results) == {"enat", "amused_inpaint"} | {
        f"inpaint_{fraction}_x{samples}{suffix}"
        for fraction in (0.25, 0.5)
        for samples in (1, 4)
        for suffix in ("", "_refreshed")
    }
    flops = {name: r["gflops_per_image"] for name, r in results.items()}
    for fraction in (0.25, 0.5):
        # four samples of one image share the kept tokens' first encoder pass: less per image than one sample
        assert 0 < flops[f"inpaint_{fraction}_x4"] < flops[f"inpaint_{fraction}_x1"]
        assert results[f"inpaint_{fraction}_x4"]["samples_per_image"] == 4
        for samples in (1, 4):
            # the kept tokens' keys/values once per run (counted with the calls) instead of at every step
            fixed, refreshed = f"inpaint_{fraction}_x{samples}", f"inpaint_{fraction}_x{samples}_refreshed"
            assert flops[fixed] < flops[refreshed]
            assert results[fixed]["kept_context_mode"] == "fixed"
            assert results[refreshed]["kept_context_mode"] == "refreshed"
    editing = {name: value for name, value in flops.items() if name.startswith("inpaint_")}
    # aMUSEd recomputes every token at every step: every ENAT edit costs less
    assert max(editing.values()) < flops["amused_inpaint"]
    assert all(r["finite"] and r["seconds_per_image"] is None for r in results.values())
    table = report["editing"]["1"]
    assert set(table) == set(editing)
    for name, value in editing.items():
        assert table[name]["flops_vs_generation"] == pytest.approx(value / flops["enat"])
        assert table[name]["flops_vs_amused_inpaint"] == pytest.approx(value / flops["amused_inpaint"])
        assert table[name]["time_vs_generation"] is None


def test_amused_inpainting_row_keeps_the_given_tokens(benchmark, tiny_config):
    args = _args(benchmark, tiny_config, "--rows", "enat", "--editing", "--inpaint_fractions", "0.5")
    setup = benchmark.load_setup(args)
    row = benchmark.amused_row(setup, args, torch.device("cpu"), torch.float32, inpaint_fraction=0.5)
    region = benchmark.editing_mask(setup.amused_config["sample_size"], 0.5)
    with torch.no_grad():
        tokens = row.sample(2)
    # the row draws the kept tokens first from its seeded generator; aMUSEd's scheduler must leave them as they are
    given = torch.randint(0, 16, tokens.shape, generator=torch.Generator().manual_seed(args.seed))
    assert torch.equal(tokens[:, ~region], given[:, ~region])
    assert (tokens[:, region] < 16).all()  # the region is filled: no mask token (id 16) left
    assert region.sum() == 8 and region[-1].all() and not region[0].any()


def test_editing_flags_fail_clearly(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--editing", "--rows", "amused"])
    assert "keep `enat` in --rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--editing", "--inpaint_fractions", "1.5"])
    assert "must be a fraction in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="masks no token"):
        benchmark.editing_mask(4, 0.01)
