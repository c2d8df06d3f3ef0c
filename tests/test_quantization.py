"""Quantized ENAT the way diffusers users quantize: `quantization_config=TorchAoConfig(...)` on the transformer and
`PipelineQuantizationConfig` on the pipeline, int8 weight-only and int8 weights with dynamically quantized
activations. "Close to the unquantized model" is measured on one teacher-forced forward pass (relative L2 error of the
logits and the fraction of positions whose most likely token is unchanged) and on sampling (fraction of identical
tokens for the same seeds)."""

import pytest
import torch
from diffusers import PipelineQuantizationConfig, TorchAoConfig

from enat_diffusers import ENATPipeline, ENATTransformer2DModel

from .tiny_components import CODEBOOK_SIZE, NUM_CLASSES, tiny_pipeline, tiny_transformer

torchao_quantization = pytest.importorskip("torchao.quantization", reason="needs the `quant` extra (torchao)")

pytestmark = pytest.mark.usefixtures("single_thread")

INT8_CONFIGS = {
    "int8_weight_only": torchao_quantization.Int8WeightOnlyConfig,
    "int8_dynamic_activation": torchao_quantization.Int8DynamicActivationInt8WeightConfig,
}
# Integer quantization in diffusers computes in bfloat16 (it warns for any other dtype), so the bounds cover int8
# rounding plus bfloat16 rounding; the unquantized reference is float32.
MAX_RELATIVE_LOGIT_ERROR = 0.05
MIN_ARGMAX_AGREEMENT = 0.95
MIN_IDENTICAL_SAMPLED_TOKENS = 0.9


def _is_quantized(linear: torch.nn.Linear) -> bool:
    return type(linear.weight) is not torch.nn.Parameter and type(linear.weight) is not torch.Tensor


@pytest.fixture(scope="module")
def transformer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    tiny_transformer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    tiny_pipeline().save_pretrained(folder)
    return folder


def _teacher_forced_inputs() -> tuple[torch.LongTensor, torch.LongTensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CODEBOOK_SIZE, (8, 16), generator=generator)
    ids[:, ::2] = CODEBOOK_SIZE  # half of the tokens masked
    return ids, torch.arange(8) % NUM_CLASSES


@pytest.mark.parametrize("name", sorted(INT8_CONFIGS))
def test_transformer_loads_int8_quantized_and_stays_close_to_float32(transformer_folder, name):
    reference = ENATTransformer2DModel.from_pretrained(transformer_folder)
    quantized = ENATTransformer2DModel.from_pretrained(
        transformer_folder, quantization_config=TorchAoConfig(INT8_CONFIGS[name]()), dtype=torch.bfloat16
    )
    linears = [module for module in quantized.modules() if isinstance(module, torch.nn.Linear)]
    assert linears and all(_is_quantized(linear) for linear in linears)
    ids, labels = _teacher_forced_inputs()
    with torch.no_grad():
        expected = reference(ids, class_labels=labels).logits
        logits = quantized(ids, class_labels=labels).logits.float()
    relative_error = ((logits - expected).norm() / expected.norm()).item()
    agreement = (logits.argmax(dim=1) == expected.argmax(dim=1)).float().mean().item()
    assert relative_error < MAX_RELATIVE_LOGIT_ERROR, relative_error
    assert agreement >= MIN_ARGMAX_AGREEMENT, agreement


@pytest.mark.parametrize("name", sorted(INT8_CONFIGS))
def test_pipeline_quantization_config_quantizes_the_transformer_and_samples_like_float32(pipeline_folder, name):
    quantization = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(INT8_CONFIGS[name]())})
    pipe = ENATPipeline.from_pretrained(pipeline_folder, quantization_config=quantization, dtype=torch.bfloat16)
    reference = ENATPipeline.from_pretrained(pipeline_folder)
    for each in (pipe, reference):
        each.set_progress_bar_config(disable=True)
    assert _is_quantized(pipe.transformer.blocks[0].attn.to_q)
    assert not _is_quantized(pipe.vqvae.decoder.conv_in)  # the VQ decoder has convolutions only: left as it is

    labels = [index % NUM_CLASSES for index in range(16)]
    tokens = pipe(class_labels=labels, generator=torch.manual_seed(0), output_type="latent").images
    expected = reference(class_labels=labels, generator=torch.manual_seed(0), output_type="latent").images
    assert tokens.shape == expected.shape
    assert ((tokens >= 0) & (tokens < CODEBOOK_SIZE)).all()
    identical = (tokens == expected).float().mean().item()
    assert identical >= MIN_IDENTICAL_SAMPLED_TOKENS, identical

    images = pipe(class_labels=[0, 1], generator=torch.manual_seed(0), output_type="np").images
    assert images.shape[0] == 2 and ((images >= 0) & (images <= 1)).all()


def test_int8_quantized_digits_demo_still_draws_the_requested_digits():
    """The shipped demo with an int8 transformer: every class recognised by the demo's classifier (the speed and memory
    page records the 50-samples-per-class measurement; fewer samples here, with the bound `tests/test_demo.py` uses)."""
    pytest.importorskip("sklearn", reason="the demo checks classify digits with scikit-learn")
    from enat_diffusers.demo import demo_path

    from .example_scripts import load_example

    demo_script = load_example("train_demo_digits")
    classifier, _ = demo_script.fit_digit_classifier()
    quantization = PipelineQuantizationConfig(
        quant_mapping={"transformer": TorchAoConfig(INT8_CONFIGS["int8_dynamic_activation"]())}
    )
    pipe = ENATPipeline.from_pretrained(demo_path("digits"), quantization_config=quantization, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert _is_quantized(pipe.transformer.blocks[0].attn.to_q)
    pixels, labels = demo_script.generate_class_samples(pipe, 10, seed=1000)
    table = demo_script.accuracy_table(classifier, pixels, labels)
    low = {name: accuracy for name, accuracy in table["per_class"].items() if accuracy < 0.9}
    assert not low, table
