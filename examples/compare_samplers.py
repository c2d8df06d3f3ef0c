#!/usr/bin/env python
"""Compares ENAT's samplers at equal steps: quality on the digits demo, transformer FLOPs on ENAT-L.

    pip install -e ".[eval]"   # torchmetrics and scikit-learn
    python examples/compare_samplers.py --output assets/sampler_comparison.json            # both parts
    python examples/compare_samplers.py --skip_flops --steps 8 --seeds 0 --samples_per_class 5   # a quick look

Samplers (`SAMPLERS`): the reference (confidence order, linear guidance ramp), Halton order, ReMDM-style remasking
(two strengths), Halton with remasking, and the guidance schedules constant, power-cosine and interval on the
reference token order.

Digits (`demo:digits`, guidance scale `--guidance_scale`): for every sampler, number of steps (`--steps`) and seed
(`--seeds`), `--samples_per_class` images of each digit from one generator seeded with the seed. Two numbers per run:
the accuracy of an independent classifier (the demo's scikit-learn SVC, examples/train_demo_digits.py) on the digit
that was asked for, and the FID in the feature space of examples/evaluate_demo_digits.py (a small digit classifier's
16-d features) against held-out real digits; as many held-out real digits give the finite-sample floor. The json
keeps every run; the table gives mean and standard deviation over the seeds.

ENAT-L (random weights, 16 x 16 tokens, one image guided): transformer forward FLOPs per image, counted as
examples/benchmark.py counts them (`FlopCounterMode` around every transformer call, CPU attention included).
"""

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import enat_diffusers  # noqa: F401  # isort: skip  (before torch: sets the CPU threads' wait policy)
import numpy as np
import torch

from enat_diffusers import ENATPipeline, load_demo_pipeline
from enat_diffusers.image_utils import images_to_digits, to_uint8
from enat_diffusers.schedulers import ENATScheduler, GuidanceSchedule
from enat_diffusers.testing_utils import randomize_modulation

EXAMPLES = Path(__file__).resolve().parent

# name -> (ENATScheduler options, guidance schedule, guidance scale: None for --guidance_scale)
SAMPLERS = {
    "reference": ({}, "linear", None),
    "halton": ({"token_order": "halton"}, "linear", None),
    "remasking-0.25": ({"remasking": 0.25}, "linear", None),
    "remasking-1.0": ({"remasking": 1.0}, "linear", None),
    "halton+remasking-0.25": ({"token_order": "halton", "remasking": 0.25}, "linear", None),
    "guidance-constant": ({}, "constant", None),
    "guidance-power-cosine": ({}, GuidanceSchedule("power-cosine"), None),
    "guidance-interval": ({}, GuidanceSchedule("interval"), None),
    # a control: the reference with less guidance (power-cosine's mean weight is about 0.63 of the linear ramp's)
    "reference@guidance-2.5": ({}, "linear", 2.5),
}


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def with_sampler(pipe, name: str, guidance_scale: float) -> dict:
    """Swaps in the sampler's scheduler; returns its guidance arguments."""
    options, schedule, scale = SAMPLERS[name]
    base = {key: value for key, value in pipe.scheduler.config.items() if not key.startswith("_")}
    pipe.scheduler = ENATScheduler.from_config({**base, "token_order": "confidence", "remasking": 0.0, **options})
    return {"guidance_schedule": schedule, "guidance_scale": guidance_scale if scale is None else scale}


def compare_digits(args) -> dict:
    digits_check = load_example("evaluate_demo_digits")
    evaluate = digits_check.load_evaluate()
    classifier, classifier_accuracy = load_example("train_demo_digits").fit_digit_classifier()
    space = digits_check.digit_feature_space()
    pipe = load_demo_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    labels = np.repeat(np.arange(10), args.samples_per_class)
    num_images = len(labels)

    def fid(images: np.ndarray, name: str, seed: int) -> float:
        source = evaluate.ArrayImages(images, name)
        result = evaluate.compute_metrics(
            source, space.extractor, reference_stats=space.reference_stats, splits=1, seed=seed
        )
        return result["fid"]

    floor = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(space.baseline_images))[:num_images]
        floor.append(fid(space.baseline_images[order], "real", seed))
    runs = []
    for steps in args.steps:
        for seed in args.seeds:
            for name in SAMPLERS:  # alternating samplers within a (steps, seed)
                guidance = with_sampler(pipe, name, args.guidance_scale)
                start = time.perf_counter()
                images = pipe(
                    class_labels=labels.tolist(),
                    num_inference_steps=steps,
                    **guidance,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="np",
                ).images
                seconds = time.perf_counter() - start
                accuracy = float(np.mean(classifier.predict(images_to_digits(images).numpy()) == labels))
                runs.append(
                    {
                        "sampler": name,
                        "steps": steps,
                        "seed": seed,
                        "accuracy": accuracy,
                        "fid": fid(to_uint8(images), name, seed),
                        "seconds": seconds,
                    }
                )
                print(
                    f"digits {name:<24} steps {steps:>2} seed {seed}: accuracy {accuracy:.3f} fid {runs[-1]['fid']:.3f}"
                )
    return {
        "model": "demo:digits",
        "guidance_scale": args.guidance_scale,
        "images_per_run": num_images,
        "seeds": args.seeds,
        "classifier": f"sklearn SVC(gamma=0.001, C=10) on the 8x8 digits, held-out accuracy {classifier_accuracy:.3f}",
        "fid_features": f"examples/evaluate_demo_digits.py DigitFeatures, {space.num_reference} held-out real digits",
        "fid_real_floor": {
            "mean": statistics.mean(floor),
            "per_seed": floor,
            "num_images": min(num_images, len(space.baseline_images)),
        },
        "runs": runs,
        "summary": summarise(runs),
    }


def summarise(runs: list[dict]) -> list[dict]:
    groups = {}
    for run in runs:
        groups.setdefault((run["sampler"], run["steps"]), []).append(run)
    rows = []
    for (name, steps), group in groups.items():
        row = {"sampler": name, "steps": steps}
        for metric in ("accuracy", "fid"):
            values = [run[metric] for run in group]
            row[metric] = statistics.mean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def compare_flops(args) -> dict:
    benchmark = load_example("benchmark")
    torch.manual_seed(0)
    transformer, _, _ = benchmark.build_transformer_from_config(args.flops_config)
    randomize_modulation(transformer)
    transformer = benchmark.to_device(transformer, torch.device("cpu"), torch.float32)
    wrapper = benchmark.BenchmarkTransformer(transformer, "enat")
    pipe = ENATPipeline(
        transformer=wrapper, vqvae=None, scheduler=ENATScheduler(mask_token_id=transformer.config.codebook_size)
    )
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for steps in args.steps:
        # Only remasking changes how many tokens a step encodes; the Halton order and the guidance schedules keep
        # every step's token counts, which the smallest step count shows.
        names = [name for name in SAMPLERS if "remasking" in name or name == "reference" or steps == min(args.steps)]
        for name in names:
            guidance = with_sampler(pipe, name, args.guidance_scale)
            wrapper.probe.start()
            with torch.no_grad():
                pipe(class_labels=[0], num_inference_steps=steps, **guidance, output_type="latent",
                     generator=torch.manual_seed(0))  # fmt: skip
            rows.append({"sampler": name, "steps": steps, "gflops_per_image": wrapper.probe.flops / 1e9})
            wrapper.probe.start(active=False)
            print(f"{args.flops_config} {name:<24} steps {steps:>2}: {rows[-1]['gflops_per_image']:.1f} GFLOPs/image")
    return {"model": f"{args.flops_config} (random weights)", "guidance_scale": args.guidance_scale, "rows": rows}


def markdown_tables(report: dict) -> str:
    """The report as the tables of docs/source/using-diffusers/samplers.md."""
    lines = []
    digits = report.get("digits")
    if digits:
        steps = sorted({row["steps"] for row in digits["summary"]})
        header = " | ".join(f"{k} steps: accuracy / FID" for k in steps)
        lines += [f"| sampler | {header} |", "|---|" + "---|" * len(steps)]
        for name in dict.fromkeys(row["sampler"] for row in digits["summary"]):
            cells = []
            for k in steps:
                row = next((r for r in digits["summary"] if r["sampler"] == name and r["steps"] == k), None)
                cells.append(
                    ""
                    if row is None
                    else f"{row['accuracy']:.3f} ± {row['accuracy_std']:.3f} / {row['fid']:.3f} ± {row['fid_std']:.3f}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    flops = report.get("flops")
    if flops:
        steps = sorted({row["steps"] for row in flops["rows"]})
        lines += [
            "| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for name in dict.fromkeys(row["sampler"] for row in flops["rows"]):
            cells = []
            for k in steps:
                row = next((r for r in flops["rows"] if r["sampler"] == name and r["steps"] == k), None)
                cells.append("" if row is None else f"{row['gflops_per_image']:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": load,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples_per_class", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="The digits demo's default.")
    parser.add_argument("--flops_config", type=str, default="ENAT-L")
    parser.add_argument("--skip_digits", action="store_true")
    parser.add_argument("--skip_flops", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="Write the json report here.")
    parser.add_argument("--tables_from", type=Path, default=None, help="Only print the tables of a json report.")
    args = parser.parse_args(argv)
    if min(args.steps) < 1 or max(args.steps) > 16:
        parser.error("--steps must lie in [1, 16] (the digits demo has 4 x 4 tokens)")
    if args.samples_per_class < 1:
        parser.error("--samples_per_class must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tables_from is not None:
        report = json.loads(args.tables_from.read_text())
        print(markdown_tables(report))
        return report
    report = {"machine_before": machine()}
    if not args.skip_digits:
        report["digits"] = compare_digits(args)
    if not args.skip_flops:
        report["flops"] = compare_flops(args)
    report["machine_after"] = machine()
    print(markdown_tables(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
