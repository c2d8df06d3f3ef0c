"""Write golden transformer outputs of the reference ENAT implementation for the parity tests.

    python conversion/make_transformer_fixtures.py --reference_dir /path/to/ENAT [--output_dir tests/fixtures]

`--reference_dir` is a checkout of github.com/LeapLabTHU/ENAT outside this repository (it needs `einops` and
`omegaconf`). A small random-weight reference transformer (width 64, 2 encoder + 1 decoder blocks, 8x8 tokens,
32 codes) samples an 8-step trajectory with guidance through the reference sampler; every transformer call
(inputs, logits, features) is recorded, plus one call on a partially masked grid without a previous state.
Writes `transformer_reference.safetensors`; the tests convert its state dict with our conversion code.
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_import import import_reference  # noqa: E402

CONFIG = {
    "sample_size": 8,
    "codebook_size": 32,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_encoder_layers": 2,
    "num_decoder_layers": 1,
    "num_classes": 1000,  # the reference sampler hard-codes label 1000 as the null class
}
SAMPLING = {"num_steps": 8, "cfg_scale": 2.5, "mask_temp": 1.5, "samp_temp": 6.0}
CLASS_LABELS = [3, 7]


def build_reference_model(models_module) -> torch.nn.Module:
    args = SimpleNamespace(enc_dec=[CONFIG["num_encoder_layers"], CONFIG["num_decoder_layers"]])
    model = models_module.DiT(
        input_size=CONFIG["sample_size"],
        hidden_size=CONFIG["hidden_size"],
        num_heads=CONFIG["num_attention_heads"],
        num_classes=CONFIG["num_classes"],
        codebook_size=CONFIG["codebook_size"],
        args=args,
    )
    # The reference zero-initialises adaLN and the output bias; random values make every path matter.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.ndim == 1:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.5 / max(parameter.shape[-1], 1) ** 0.5 if parameter.ndim > 1 else 0.1)
    return model.eval()


class RecordingModel:
    """Stands in for the reference network inside its sampler and records every call."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __call__(self, masked_ids, context, prev_dict=None, return_dict=True):
        output = self.model(masked_ids, context=context, prev_dict=prev_dict, return_dict=True)
        self.calls.append(
            {
                "input_ids": masked_ids.clone(),
                "class_labels": context.reshape(-1).clone(),
                "logits": output["logits"].clone(),
                "features": output["feat"].clone(),
                "has_previous_state": prev_dict is not None,
            }
        )
        return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_dir", required=True, help="checkout of LeapLabTHU/ENAT, outside this repo")
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    args = parser.parse_args(argv)

    models_module, nat_misc = import_reference(args.reference_dir, "libs.models", "libs.nat_misc")
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_reference_model(models_module)
    recorder = RecordingModel(model)

    seq_len = CONFIG["sample_size"] ** 2
    sampler_args = SimpleNamespace(
        mask_temp=SAMPLING["mask_temp"], samp_temp=SAMPLING["samp_temp"], cfg_scale=SAMPLING["cfg_scale"]
    )
    schedule = nat_misc.NATSchedule(codebook_size=CONFIG["codebook_size"], device="cpu", args=sampler_args)
    labels = torch.tensor(CLASS_LABELS)
    with torch.no_grad():
        final_ids = schedule.generate(
            SAMPLING["num_steps"],
            len(CLASS_LABELS),
            recorder,
            decode_fn=lambda ids: ids,
            latent_size=CONFIG["sample_size"],
            context=labels,
        )
        # One partially masked grid without a previous state; both rows mask the same number of tokens.
        partial_ids = torch.randint(0, CONFIG["codebook_size"], (2, seq_len))
        partial_ids[torch.rand(2, seq_len).argsort(dim=1) < seq_len // 3] = CONFIG["codebook_size"]
        recorder(partial_ids, context=labels)

    tensors = {f"reference.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for index, call in enumerate(recorder.calls):
        for key in ("input_ids", "class_labels", "logits", "features"):
            tensors[f"call{index}.{key}"] = call[key].contiguous()
    tensors["final_ids"] = final_ids.contiguous()
    metadata = {
        "config": json.dumps(CONFIG),
        "sampling": json.dumps(SAMPLING),
        "has_previous_state": json.dumps([call["has_previous_state"] for call in recorder.calls]),
    }
    output = Path(args.output_dir) / "transformer_reference.safetensors"
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata=metadata)
    print(f"wrote {len(recorder.calls)} recorded calls to {output} ({output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
