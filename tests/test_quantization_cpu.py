"""int8 on CPUs through PyTorch's x86 engine (`quantize_for_cpu`), the `"auto"` precision rule per CPU, and
`set_precision` / `--precision`. "Close to float32": relative L2 error of teacher-forced logits, agreement of their
argmax, and the fraction of identical sampled tokens for the same seeds."""

import argparse

import pytest
import torch
from torch import nn

from enat_diffusers import choose_precision, quantize_decoder_for_cpu, quantize_for_cpu, set_precision
from enat_diffusers.quantization import CPUFeatures, is_quantized_for_cpu, resolve_precision, x86_int8_available
from enat_diffusers.script_utils import add_precision_flag

from .tiny_components import (
    CODEBOOK_SIZE,
    GRID,
    NUM_CLASSES,
    tiny_pipeline,
    tiny_text_pipeline,
    tiny_transformer,
    tiny_vqvae,
)

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not x86_int8_available(), reason="this PyTorch has no x86 quantized engine"),
]

# int8 weights per output channel and int8 activations per call (the float32 model is the reference).
MAX_RELATIVE_LOGIT_ERROR = 0.05
MIN_ARGMAX_AGREEMENT = 0.95
MIN_IDENTICAL_SAMPLED_TOKENS = 0.9


def _quantized_linears(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, torch.ao.nn.quantized.dynamic.Linear)]


def test_quantize_for_cpu_replaces_every_linear_and_keeps_the_logits_close():
    reference, model = tiny_transformer(), tiny_transformer()
    float_linears = sum(isinstance(module, nn.Linear) for module in model.modules())
    assert quantize_for_cpu(model) is model  # in place, like torchao's quantize_
    assert is_quantized_for_cpu(model)
    assert not any(type(module) is nn.Linear for module in model.modules())
    assert len(_quantized_linears(model)) == float_linears

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CODEBOOK_SIZE, (8, GRID * GRID), generator=generator)
    ids[:, ::2] = CODEBOOK_SIZE  # half of the tokens masked
    labels = torch.arange(8) % NUM_CLASSES
    with torch.no_grad():
        expected = reference(ids, class_labels=labels).logits
        logits = model(ids, class_labels=labels).logits
    assert logits.dtype == torch.float32
    relative_error = ((logits - expected).norm() / expected.norm()).item()
    agreement = (logits.argmax(dim=1) == expected.argmax(dim=1)).float().mean().item()
    assert 0 < relative_error < MAX_RELATIVE_LOGIT_ERROR, relative_error
    assert agreement >= MIN_ARGMAX_AGREEMENT, agreement
    assert quantize_for_cpu(model) is model and len(_quantized_linears(model)) == float_linears  # twice: unchanged


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_class_pipeline_samples_like_float32_with_feature_reuse_and_guidance(guidance_scale):
    reference, pipe = tiny_pipeline(), tiny_pipeline()
    pipe.transformer = quantize_for_cpu(pipe.transformer)
    labels = [index % NUM_CLASSES for index in range(16)]
    common = {"guidance_scale": guidance_scale, "output_type": "latent"}
    tokens = pipe(class_labels=labels, generator=torch.manual_seed(0), **common).images
    expected = reference(class_labels=labels, generator=torch.manual_seed(0), **common).images
    assert ((tokens >= 0) & (tokens < CODEBOOK_SIZE)).all()
    identical = (tokens == expected).float().mean().item()
    assert identical >= MIN_IDENTICAL_SAMPLED_TOKENS, identical
    images = pipe(class_labels=[0, 1], generator=torch.manual_seed(0), output_type="np").images
    assert images.shape[0] == 2 and ((images >= 0) & (images <= 1)).all()


def test_ragged_rows_keep_their_given_tokens_and_stay_close_to_float32():
    # Rows with 16, 5, 11 and 0 masked tokens: some rows enter the transformer with no visible token at all.
    generator = torch.Generator().manual_seed(0)
    latents = torch.randint(0, CODEBOOK_SIZE, (4, GRID * GRID), generator=generator)
    order = torch.rand(4, GRID * GRID, generator=generator).argsort(1).argsort(1)
    latents = torch.where(order < torch.tensor([16, 5, 11, 0])[:, None], CODEBOOK_SIZE, latents).view(-1, GRID, GRID)
    reference, pipe = tiny_pipeline(), tiny_pipeline()
    pipe.transformer = quantize_for_cpu(pipe.transformer)
    common = {"latents": latents, "num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "latent"}
    tokens = pipe([0, 1, 2, 3], generator=torch.manual_seed(0), **common).images
    expected = reference([0, 1, 2, 3], generator=torch.manual_seed(0), **common).images
    given = latents != CODEBOOK_SIZE
    assert not (tokens == CODEBOOK_SIZE).any() and torch.equal(tokens[given], latents[given])
    identical = (tokens[~given] == expected[~given]).float().mean().item()
    assert identical >= MIN_IDENTICAL_SAMPLED_TOKENS, identical


def test_text_pipeline_runs_int8_through_set_precision(tmp_path):
    reference, pipe = tiny_text_pipeline(tmp_path / "a"), tiny_text_pipeline(tmp_path / "b")
    assert set_precision(pipe, "int8").precision == "int8"
    assert is_quantized_for_cpu(pipe.transformer)
    assert type(pipe.text_encoder.text_model.encoder.layers[0].mlp.fc1) is nn.Linear  # only the transformer
    prompts = ["a red cat", "a dog"]
    tokens = pipe(prompt=prompts, generator=torch.manual_seed(0), output_type="latent").images
    expected = reference(prompt=prompts, generator=torch.manual_seed(0), output_type="latent").images
    identical = (tokens == expected).float().mean().item()
    assert identical >= MIN_IDENTICAL_SAMPLED_TOKENS, identical


def test_saving_a_quantized_model_or_pipeline_is_refused_with_a_sentence(tmp_path):
    pipe = tiny_pipeline()
    pipe.transformer = quantize_for_cpu(pipe.transformer)
    with pytest.raises(NotImplementedError, match="save the float32 model and call quantize_for_cpu after loading"):
        pipe.transformer.save_pretrained(tmp_path / "transformer")
    with pytest.raises(NotImplementedError, match="cannot be saved"):
        pipe.save_pretrained(tmp_path / "pipeline")


def test_quantize_for_cpu_refuses_models_that_are_not_float32_on_the_cpu():
    with pytest.raises(ValueError, match=r"needs a float32 model on the CPU.*torch.bfloat16"):
        quantize_for_cpu(tiny_transformer().to(torch.bfloat16))
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        quantize_for_cpu("transformer")


def _decoded(vqvae, token_ids):
    with torch.no_grad():
        return (vqvae.decode(token_ids).sample + 1) / 2  # pixels in [0, 1]


def _psnr(pixels, reference) -> float:
    return (10 * torch.log10(1 / (pixels - reference).square().mean())).item()


def _token_grids(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CODEBOOK_SIZE, (count, GRID, GRID), generator=torch.Generator().manual_seed(seed))


def test_quantize_decoder_for_cpu_makes_every_decoder_convolution_int8_and_keeps_the_pixels_close():
    reference, vqvae = tiny_vqvae(), tiny_vqvae()
    decoder_convolutions = sum(isinstance(module, nn.Conv2d) for module in vqvae.decoder.modules())
    encoder_before = {name: value.clone() for name, value in vqvae.encoder.state_dict().items()}
    assert quantize_decoder_for_cpu(vqvae) is vqvae and is_quantized_for_cpu(vqvae)
    quantized = [m for m in vqvae.decoder.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    assert len(quantized) == decoder_convolutions
    assert not any(type(module) is nn.Conv2d for module in vqvae.decoder.modules())
    # the encoder (image editing) is left as it was
    assert all(torch.equal(value, encoder_before[name]) for name, value in vqvae.encoder.state_dict().items())
    token_ids = _token_grids(4)
    pixels, expected = _decoded(vqvae, token_ids), _decoded(reference, token_ids)
    assert pixels.dtype == torch.float32 and pixels.shape == expected.shape
    assert (pixels - expected).abs().max() > 0 and _psnr(pixels, expected) > 25
    assert quantize_decoder_for_cpu(vqvae) is vqvae  # twice: unchanged
    with pytest.raises(NotImplementedError, match="call quantize_decoder_for_cpu after loading"):
        vqvae.save_pretrained("unused")


def test_the_decoder_is_calibrated_on_the_token_grids_given():
    token_ids = _token_grids(4)
    default = _decoded(quantize_decoder_for_cpu(tiny_vqvae()), token_ids)
    same_grids = _decoded(quantize_decoder_for_cpu(tiny_vqvae(), calibration_token_ids=token_ids), token_ids)
    one_code_grids = torch.zeros(2, GRID, GRID, dtype=torch.long)
    one_code = _decoded(quantize_decoder_for_cpu(tiny_vqvae(), calibration_token_ids=one_code_grids), token_ids)
    assert not torch.equal(same_grids, default) and not torch.equal(one_code, default)
    expected = _decoded(tiny_vqvae(), token_ids)
    # calibrated on the grids it decodes, the ranges fit best; on a single code they clip the others' activations
    assert _psnr(same_grids, expected) > _psnr(one_code, expected)


def test_the_int8_decoder_gives_the_same_pixels_when_threads_decode_at_once():
    # The app decodes requests from several threads with one pipeline.
    from concurrent.futures import ThreadPoolExecutor

    vqvae = quantize_decoder_for_cpu(tiny_vqvae())
    grids = [_token_grids(2, seed=seed) for seed in range(12)]
    sequential = [_decoded(vqvae, grid) for grid in grids]
    with ThreadPoolExecutor(6) as pool:
        concurrent = list(pool.map(lambda grid: _decoded(vqvae, grid), grids))
    assert all(torch.equal(one, other) for one, other in zip(sequential, concurrent, strict=True))


def test_quantized_models_refuse_to_leave_the_cpu_or_float32_in_a_sentence():
    import copy

    pipe = tiny_pipeline()
    set_precision(pipe, "int8")
    expected = pipe(class_labels=[1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    for target in (("meta",), (torch.bfloat16,), ("cpu", torch.float16)):
        with pytest.raises(ValueError, match="quantized with quantize_for_cpu and runs on the CPU in float32 only"):
            pipe.to(*target)
    with pytest.raises(ValueError, match="not meta torch.float16"):  # `to(tensor)`: that tensor's device and dtype
        pipe.transformer.to(torch.zeros(1, device="meta", dtype=torch.float16))
    with pytest.raises(ValueError, match="quantized with quantize_decoder_for_cpu .* not meta: load the model again"):
        pipe.vqvae.to(device="meta")
    copied = copy.deepcopy(pipe.vqvae)  # the copy guards itself, not the original
    with pytest.raises(ValueError, match="not meta"):
        copied.to("meta")
    # the CPU in float32 and memory formats stay allowed, and nothing was moved by the refusals
    pipe.to("cpu", torch.float32)
    pipe.vqvae.to(memory_format=torch.channels_last)
    images = pipe(class_labels=[1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(images, expected)


def test_quantize_decoder_for_cpu_refuses_bad_input_before_changing_anything():
    vqvae = tiny_vqvae()
    with pytest.raises(ValueError, match=rf"`calibration_token_ids` must lie in \[0, {CODEBOOK_SIZE}\)"):
        quantize_decoder_for_cpu(vqvae, calibration_token_ids=torch.full((1, GRID, GRID), CODEBOOK_SIZE))
    with pytest.raises(TypeError, match="`calibration_token_ids` must be an integer tensor"):
        quantize_decoder_for_cpu(vqvae, calibration_token_ids=torch.zeros(1, GRID, GRID))
    assert not is_quantized_for_cpu(vqvae) and any(isinstance(m, nn.Conv2d) for m in vqvae.decoder.modules())
    with pytest.raises(ValueError, match=r"needs a float32 model on the CPU.*torch.bfloat16"):
        quantize_decoder_for_cpu(tiny_vqvae().to(torch.bfloat16))
    with pytest.raises(TypeError, match="`vqvae` must be a MaskGITVQModel, got ENATTransformer2DModel"):
        quantize_decoder_for_cpu(tiny_transformer())


AVX2 = CPUFeatures("AVX2", x86_int8=True)


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        (AVX2, "int8"),
        (CPUFeatures("AVX2", x86_int8=False), "fp32"),  # no int8 engine in this PyTorch
        (CPUFeatures("AVX512", avx512_bf16=True, vnni=True, x86_int8=True), "bf16"),
        (CPUFeatures("AVX512", amx=True, vnni=True, x86_int8=True), "bf16"),
        (CPUFeatures("AVX512", vnni=True, x86_int8=True), "int8"),
        (CPUFeatures("AVX512", x86_int8=True), "fp32"),  # not measured: float32
        (CPUFeatures("DEFAULT"), "fp32"),
        (CPUFeatures("SVE256"), "fp32"),
    ],
)
def test_auto_precision_follows_the_cpu_capability(features, expected):
    choice = choose_precision("cpu", cpu_features=features)
    assert choice.precision == expected
    assert features.capability in choice.reason


def test_auto_precision_on_gpus_is_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert choose_precision("cuda").precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert choose_precision("cuda:0").precision == "fp32"


def test_set_precision_auto_applies_the_choice_for_this_machine(monkeypatch):
    monkeypatch.setattr(CPUFeatures, "detect", classmethod(lambda cls: AVX2))
    pipe = tiny_pipeline()
    choice = set_precision(pipe, "auto")
    assert choice.precision == "int8" and is_quantized_for_cpu(pipe.transformer) and is_quantized_for_cpu(pipe.vqvae)
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="pt").images.dtype == torch.float32

    monkeypatch.setattr(CPUFeatures, "detect", classmethod(lambda cls: CPUFeatures("AVX512", avx512_bf16=True)))
    pipe = tiny_pipeline()
    assert set_precision(pipe, "auto").precision == "bf16"
    assert pipe.transformer.dtype == pipe.vqvae.dtype == torch.bfloat16


def test_set_precision_on_cpu_puts_the_vq_decoder_in_channels_last_with_the_same_pixels():
    pipe = tiny_pipeline()
    token_ids = torch.randint(0, CODEBOOK_SIZE, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        contiguous = pipe.vqvae.decode(token_ids).sample
    set_precision(pipe, "fp32")
    weights = [module.weight for module in pipe.vqvae.modules() if isinstance(module, nn.Conv2d)]
    assert weights and all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    with torch.no_grad():
        channels_last = pipe.vqvae.decode(token_ids).sample
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-4)


def test_bad_precisions_fail_with_a_sentence():
    with pytest.raises(ValueError, match=r"`precision` must be one of \['auto', 'fp32', 'bf16', 'fp16', 'int8'\]"):
        resolve_precision("int4")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        resolve_precision("int8", "cuda")
    pipe = tiny_pipeline()
    set_precision(pipe, "int8")
    with pytest.raises(ValueError, match="transformer and vqvae are quantized to int8 and cannot run in bf16"):
        set_precision(pipe, "bf16")


def test_precision_flag_accepts_auto_and_rejects_unknown_names(capsys):
    parser = argparse.ArgumentParser()
    add_precision_flag(parser)
    assert parser.parse_args([]).precision == "fp32"
    assert parser.parse_args(["--precision", "auto"]).precision == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "int4"])
    assert "argument --precision: invalid choice: 'int4'" in capsys.readouterr().err


def test_generate_script_runs_in_the_auto_precision(tmp_path, capsys, monkeypatch):
    from .example_scripts import load_example

    monkeypatch.setattr(CPUFeatures, "detect", classmethod(lambda cls: AVX2))
    output = tmp_path / "grid.png"
    argv = ["--model", "demo:digits", "--class_labels", "3", "--num_inference_steps", "2", "--output", str(output)]
    load_example("generate").main([*argv, "--precision", "auto"])
    assert output.is_file()
    assert "precision auto: int8 (CPU AVX2" in capsys.readouterr().out


def test_int8_digits_demo_still_draws_the_requested_digits():
    """The shipped demo in int8 (transformer and VQ decoder): every class recognised by the demo's classifier (the CPU docs page
    records the 50-samples-per-class measurement; fewer samples here, with the bound `tests/test_demo.py` uses)."""
    pytest.importorskip("sklearn", reason="the demo checks classify digits with scikit-learn")
    from enat_diffusers import ENATPipeline
    from enat_diffusers.demo import demo_path

    from .example_scripts import load_example

    demo_script = load_example("train_demo_digits")
    classifier, _ = demo_script.fit_digit_classifier()
    pipe = ENATPipeline.from_pretrained(demo_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    set_precision(pipe, "int8")
    assert is_quantized_for_cpu(pipe.vqvae)
    pixels, labels = demo_script.generate_class_samples(pipe, 10, seed=1000)
    table = demo_script.accuracy_table(classifier, pixels, labels)
    low = {name: accuracy for name, accuracy in table["per_class"].items() if accuracy < 0.9}
    assert not low, table
