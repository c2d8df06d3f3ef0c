"""Record golden numbers of the reference ENAT sampler for `tests/test_scheduler_enat.py`.

The reference `NATSchedule.generate` (libs/nat_misc.py of a LeapLabTHU/ENAT checkout) is run with a stand-in network
that returns seeded random logits, so no checkpoint is needed. Every random draw of the reference is intercepted and
stored, so the tests can replay them through `ENATScheduler` and compare the token ids step by step:

- `<case>.ids_in`      (T, B, L) int64    token ids given to the network at each step
- `<case>.cond`        (T, B, L, K) f32   conditional logits returned by the stand-in network
- `<case>.uncond`      (T, B, L, K) f32   unconditional logits
- `<case>.cat_logits`  (T, B, L, K) f32   normalised logits of the Categorical the reference sampled from
- `<case>.samples`     (T, B, L) int64    what that Categorical drew (every position)
- `<case>.gumbel`      (T, B, L) f64      the Gumbel noise `np.random.gumbel` returned
- `<case>.ids_out`     (T, B, L) int64    token ids after each step (the last entry is the decoded grid)
- `counts.T{T}.L{L}`   (T,) int64         tokens the reference keeps masked after each step

Usage:
    python conversion/make_scheduler_fixtures.py --reference_dir /path/to/ENAT
"""

import argparse
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_import import import_reference  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "scheduler_reference.safetensors"
NULL_CLASS = 1000

# Replayed cases: token grid side, codebook size, steps, batch, guidance, temperatures, seed, logit scale.
CASES = {
    "case_a": {
        "latent": 8,
        "codebook": 32,
        "steps": 8,
        "batch": 2,
        "cfg": 2.5,
        "mask_temp": 1.5,
        "samp_temp": 6.0,
        "seed": 0,
        "scale": 3.0,
    },
    "case_b": {
        "latent": 8,
        "codebook": 24,
        "steps": 6,
        "batch": 3,
        "cfg": 3.5,
        "mask_temp": 4.5,
        "samp_temp": 4.0,
        "seed": 1,
        "scale": 5.0,
    },
}
COUNT_STEPS = (4, 8, 12, 16)
COUNT_LATENTS = (16, 32)  # 256 and 1024 tokens


class _Recorder:
    """Intercepts the reference's random draws and its masked-count computation while it runs."""

    def __init__(self, nat_misc):
        self.nat_misc = nat_misc
        self.samples, self.cat_logits, self.gumbel, self.floors = [], [], [], []

    def __enter__(self):
        recorder = self
        self._orig_sample = torch.distributions.Categorical.sample
        self._orig_gumbel = np.random.gumbel
        self._orig_math = self.nat_misc.math

        def sample(dist, sample_shape=torch.Size()):  # noqa: B008
            drawn = recorder._orig_sample(dist, sample_shape)
            recorder.samples.append(drawn.clone())
            recorder.cat_logits.append(dist.logits.detach().float().clone())
            return drawn

        def gumbel(*args, **kwargs):
            drawn = recorder._orig_gumbel(*args, **kwargs)
            recorder.gumbel.append(np.array(drawn, dtype=np.float64, copy=True))
            return drawn

        def floor(value):
            result = math.floor(value)
            recorder.floors.append(result)
            return result

        torch.distributions.Categorical.sample = sample
        np.random.gumbel = gumbel
        proxy = types.SimpleNamespace(**{k: getattr(math, k) for k in dir(math) if not k.startswith("__")})
        proxy.floor = floor
        self.nat_misc.math = proxy
        return self

    def __exit__(self, *exc):
        torch.distributions.Categorical.sample = self._orig_sample
        np.random.gumbel = self._orig_gumbel
        self.nat_misc.math = self._orig_math
        return False


class _FakeNet:
    """Stands in for the reference transformer: seeded random logits, separately for the two guidance streams."""

    def __init__(self, codebook: int, scale: float, seed: int):
        self.codebook, self.scale = codebook, scale
        self.generator = torch.Generator().manual_seed(seed)
        self.ids_in, self.cond, self.uncond = [], [], []

    def __call__(self, ids, context=None, return_dict=True, prev_dict=None):
        is_uncond = bool((context == NULL_CLASS).all())
        batch, seq_len = ids.shape
        logits = torch.randn(batch, seq_len, self.codebook, generator=self.generator) * self.scale
        if is_uncond:
            self.uncond.append(logits.clone())
        else:
            self.ids_in.append(ids.clone())
            self.cond.append(logits.clone())
        return {"logits": logits}


def _run_reference(nat_misc, *, latent, codebook, steps, batch, cfg, mask_temp, samp_temp, seed, scale):
    args = types.SimpleNamespace(mask_temp=mask_temp, samp_temp=samp_temp, cfg_scale=cfg, seq_len=latent * latent)
    schedule = nat_misc.NATSchedule(codebook_size=codebook, device="cpu", args=args)
    net = _FakeNet(codebook, scale, seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    context = torch.arange(batch, dtype=torch.long).unsqueeze(1) % NULL_CLASS
    with _Recorder(nat_misc) as rec:
        grid = schedule.generate(steps, batch, net, lambda z: z.clone(), latent, context=context)
    assert len(net.cond) == len(net.uncond) == len(rec.samples) == len(rec.gumbel) == len(rec.floors) == steps
    return net, rec, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_dir", required=True, help="checkout of github.com/LeapLabTHU/ENAT")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="safetensors file to write")
    cli = parser.parse_args()

    (nat_misc,) = import_reference(cli.reference_dir, "libs.nat_misc")
    tensors: dict[str, torch.Tensor] = {}
    meta_cases = {}

    for name, cfg in CASES.items():
        net, rec, grid = _run_reference(nat_misc, **cfg)
        mask_id = cfg["codebook"]
        ids_out = net.ids_in[1:] + [grid.reshape(cfg["batch"], -1)]
        for k, (before, after) in enumerate(zip(net.ids_in, ids_out, strict=True)):
            assert int((after == mask_id).sum(dim=1).max()) == rec.floors[k], "masked count disagrees with floor()"
            assert bool(((before != mask_id) <= (after == before)).all()), "a visible token changed"
        tensors[f"{name}.ids_in"] = torch.stack(net.ids_in)
        tensors[f"{name}.cond"] = torch.stack(net.cond).float()
        tensors[f"{name}.uncond"] = torch.stack(net.uncond).float()
        tensors[f"{name}.cat_logits"] = torch.stack(rec.cat_logits)
        tensors[f"{name}.samples"] = torch.stack(rec.samples)
        tensors[f"{name}.gumbel"] = torch.from_numpy(np.stack(rec.gumbel))
        tensors[f"{name}.ids_out"] = torch.stack(ids_out)
        meta_cases[name] = {**cfg, "mask_token_id": mask_id, "seq_len": cfg["latent"] ** 2}

    counts = {}
    for latent in COUNT_LATENTS:
        for steps in COUNT_STEPS:
            cfg = {
                "latent": latent,
                "codebook": 4,
                "steps": steps,
                "batch": 1,
                "cfg": 2.5,
                "mask_temp": 1.5,
                "samp_temp": 6.0,
            }
            net, rec, grid = _run_reference(nat_misc, **cfg, seed=steps, scale=1.0)
            observed = [int((ids == cfg["codebook"]).sum()) for ids in net.ids_in[1:] + [grid.reshape(1, -1)]]
            assert observed == rec.floors, (observed, rec.floors)
            key = f"counts.T{steps}.L{latent * latent}"
            tensors[key] = torch.tensor(rec.floors, dtype=torch.int64)
            counts[key] = rec.floors

    try:
        commit = subprocess.run(
            ["git", "-C", cli.reference_dir, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    metadata = {
        "description": "ENAT reference sampler (libs/nat_misc.py NATSchedule.generate) replay data",
        "reference_commit": commit,
        "cases": json.dumps(meta_cases),
        "null_class": str(NULL_CLASS),
    }
    output = Path(cli.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(output), metadata=metadata)
    size_kb = output.stat().st_size / 1024
    print(f"wrote {output} ({size_kb:.0f} KiB, {len(tensors)} tensors)")
    for key, value in counts.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
