"""Saving and loading ENAT pipelines the ways README.md documents, including Hub repo ids (offline)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from diffusers import DiffusionPipeline

from enat_diffusers import ENATPipeline, ENATScheduler, ENATText2ImagePipeline, ENATTransformer2DModel, MaskGITVQModel

from .tiny_components import fill_hub_cache, public_config, tiny_pipeline

REPO_ID = "enat-user/enat-tiny"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = tiny_pipeline(default_guidance_scale=3.5)
    folder = tmp_path_factory.mktemp("saved")
    pipe.save_pretrained(folder)
    return pipe, folder


def _assert_same_pipeline(loaded, original):
    assert type(loaded) is ENATPipeline
    for name in ("transformer", "vqvae"):
        expected = getattr(original, name).state_dict()
        actual = getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key].to(actual[key].dtype), actual[key]) for key in expected)
    assert public_config(loaded.scheduler.config) == public_config(original.scheduler.config)
    assert loaded.config.default_guidance_scale == original.config.default_guidance_scale
    assert loaded.labels == original.labels


def test_save_writes_the_standard_layout(saved):
    _, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ENATPipeline"
    assert index["transformer"] == ["enat_diffusers.models.transformer_enat", "ENATTransformer2DModel"]
    assert index["vqvae"] == ["enat_diffusers.models.vq_maskgit", "MaskGITVQModel"]
    assert index["scheduler"] == ["enat_diffusers.schedulers.scheduling_enat", "ENATScheduler"]
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    stub = (folder / "pipeline_enat.py").read_text()
    assert "from enat_diffusers.pipelines.pipeline_enat import ENATPipeline" in stub
    # No package index serves enat-diffusers: the stub says to install it from its git repository.
    assert "pip install enat-diffusers" not in stub and "git repository" in stub


def test_diffusion_pipeline_from_pretrained_folder(saved):
    pipe, folder = saved
    _assert_same_pipeline(DiffusionPipeline.from_pretrained(folder), pipe)


def test_enat_pipeline_from_pretrained_with_dtype_warns_nothing(saved):
    pipe, folder = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ENATPipeline.from_pretrained(folder, dtype=torch.float16)
    assert loaded.transformer.dtype == torch.float16 and loaded.vqvae.dtype == torch.float16
    _assert_same_pipeline(loaded, pipe)


def test_components_load_alone(saved):
    pipe, folder = saved
    transformer = ENATTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    vqvae = MaskGITVQModel.from_pretrained(folder, subfolder="vqvae")
    scheduler = ENATScheduler.from_pretrained(folder, subfolder="scheduler")
    assert all(torch.equal(a, b) for a, b in zip(transformer.parameters(), pipe.transformer.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(vqvae.parameters(), pipe.vqvae.parameters(), strict=True))
    assert public_config(scheduler.config) == public_config(pipe.scheduler.config)


def test_loaded_pipeline_generates_what_the_original_generates(saved):
    pipe, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    arguments = {"num_inference_steps": 3, "output_type": "latent"}
    expected = pipe([1, 2], generator=torch.Generator().manual_seed(0), **arguments).images
    actual = loaded([1, 2], generator=torch.Generator().manual_seed(0), **arguments).images
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("loader", [DiffusionPipeline, ENATPipeline])
def test_hub_repo_id_resolves_through_the_cache(saved, tmp_path, loader):
    """The real snapshot resolution of huggingface_hub runs; HF_HUB_OFFLINE=1 keeps it off the network."""
    pipe, folder = saved
    cache_dir = fill_hub_cache(folder, tmp_path / "hub", REPO_ID)
    _assert_same_pipeline(loader.from_pretrained(REPO_ID, cache_dir=cache_dir), pipe)


def test_missing_hub_repo_fails_offline_with_a_clear_error(tmp_path):
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained("enat-user/not-there", cache_dir=tmp_path)


def _run_without_importing_enat(script: str, tmp_path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=environment, timeout=300
    )


def test_custom_pipeline_loading_works_without_importing_enat_diffusers(saved, tmp_path):
    _, folder = saved
    result = _run_without_importing_enat(
        f"""
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(
            {str(folder)!r}, custom_pipeline="pipeline_enat", trust_remote_code=True
        )
        print(type(pipe).__name__, type(pipe.transformer).__name__)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ENATPipeline", "ENATTransformer2DModel"]


def test_plain_loading_without_import_fails_as_documented(saved, tmp_path):
    _, folder = saved
    result = _run_without_importing_enat(
        f"""
        from diffusers import DiffusionPipeline
        DiffusionPipeline.from_pretrained({str(folder)!r})
        """,
        tmp_path,
    )
    assert result.returncode != 0 and "ENATPipeline" in result.stderr


def test_registration_uses_the_one_list_of_pipelines():
    import diffusers

    import enat_diffusers
    from enat_diffusers.pipelines import pipeline_enat_base

    assert set(enat_diffusers.ENAT_PIPELINES) == {
        ENATPipeline,
        ENATText2ImagePipeline,
        enat_diffusers.ENATInpaintPipeline,
        enat_diffusers.ENATImg2ImgPipeline,
    }
    assert all(getattr(diffusers, cls.__name__) is cls for cls in enat_diffusers.ENAT_PIPELINES)
    concrete = {
        cls
        for cls in _subclasses(pipeline_enat_base.ENATBasePipeline)
        if cls.__module__.startswith("enat_") and not cls.__dict__.get("_abstract", False)
    }
    assert concrete == set(enat_diffusers.ENAT_PIPELINES)


def _subclasses(cls):
    for subclass in cls.__subclasses__():
        yield subclass
        yield from _subclasses(subclass)


def test_a_pipeline_subclass_that_misses_a_rule_is_refused_when_defined():
    from enat_diffusers import ENATBasePipeline

    with pytest.raises(
        TypeError, match=r"must define \['_card_call', '_card_pipeline_tag', 'default_guidance_scale'\]"
    ):

        class Incomplete(ENATBasePipeline):
            def __init__(self, transformer, vqvae, scheduler, default_num_inference_steps: int = 8):
                super().__init__(default_num_inference_steps=default_num_inference_steps, default_guidance_scale=2)


def test_a_subclass_that_follows_the_rules_saves_and_loads_its_defaults(tmp_path):
    from enat_diffusers import ENATBasePipeline

    class Minimal(ENATBasePipeline):
        _card_call = "pipe(class_labels=[0])"
        _card_pipeline_tag = "unconditional-image-generation"

        def __init__(self, transformer, vqvae, scheduler, default_num_inference_steps=8, default_guidance_scale=3.5):
            super().__init__(
                default_num_inference_steps=default_num_inference_steps, default_guidance_scale=default_guidance_scale
            )
            self.register_modules(transformer=transformer, vqvae=vqvae, scheduler=scheduler)

    source = tiny_pipeline()
    pipe = Minimal(source.transformer, source.vqvae, source.scheduler, default_guidance_scale=5.0)
    assert pipe.guidance_scale == 5.0 and pipe.image_processor is not None and not pipe.interrupt
    pipe.save_pretrained(tmp_path)
    assert "from tests.test_pipeline_loading import Minimal" in (tmp_path / "test_pipeline_loading.py").read_text()
    assert Minimal.from_pretrained(tmp_path).config.default_guidance_scale == 5.0


def test_passing_a_component_to_from_pretrained_is_type_checked_without_a_warning(saved, capfd):
    pipe, folder = saved
    capfd.readouterr()
    loaded = ENATPipeline.from_pretrained(folder, transformer=pipe.transformer)
    assert loaded.transformer is pipe.transformer
    assert "non-standard module" not in capfd.readouterr().err
    with pytest.raises(ValueError, match="ENATScheduler'>, but should be <class 'diffusers.*ModelMixin'>"):
        ENATPipeline.from_pretrained(folder, transformer=pipe.scheduler)


def test_swapping_to_amused_scheduler_and_back_warns_nothing_and_keeps_our_settings(capfd):
    from diffusers import AmusedScheduler

    enat = ENATScheduler(mask_token_id=16, mask_temperature=2.0, sample_temperature=3.0)
    capfd.readouterr()
    amused = AmusedScheduler.from_config(enat.config)
    back = ENATScheduler.from_config(amused.config)
    assert "will be ignored" not in capfd.readouterr().err
    assert amused.config.mask_token_id == 16 and AmusedScheduler in enat.compatibles
    assert (back.config.mask_temperature, back.config.sample_temperature) == (2.0, 3.0)


def test_amused_scheduler_without_the_masking_schedule_fails_before_any_model_runs():
    from diffusers import AmusedScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = AmusedScheduler.from_config(ENATScheduler(mask_token_id=16, masking_schedule="pow").config)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="AmusedScheduler has no 'pow' masking schedule .*use ENATScheduler"):
        pipe([1], num_inference_steps=2)
    handle.remove()
    assert calls == []


def test_auto_pipeline_for_text2image_loads_and_converts_the_text_pipeline(tmp_path):
    from diffusers import AutoPipelineForText2Image

    from .tiny_components import tiny_text_pipeline

    pipe = tiny_text_pipeline(tmp_path / "clip")
    pipe.save_pretrained(tmp_path / "saved")
    loaded = AutoPipelineForText2Image.from_pretrained(tmp_path / "saved")
    assert type(loaded) is ENATText2ImagePipeline
    assert type(AutoPipelineForText2Image.from_pipe(pipe)) is ENATText2ImagePipeline
