"""push_to_hub writes an ENAT model card; only the network calls (repo creation, upload) are faked."""

import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import pytest
import torch
from diffusers import DiffusionPipeline

from .tiny_components import fill_hub_cache, tiny_pipeline, tiny_text_pipeline


class FakeHub:
    """Stands in for the Hub's transport: records what would have been uploaded."""

    def __init__(self, storage: Path):
        self.storage = storage
        self.uploads = []

    def create_repo(self, repo_id, **_kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}
        readme = (folder / "README.md").read_text() if (folder / "README.md").exists() else None
        copy = self.storage / f"upload{len(self.uploads)}"
        shutil.copytree(folder, copy)
        self.uploads.append({"repo_id": repo_id, "files": files, "readme": readme, "copy": copy, **kwargs})
        return "https://huggingface.co/fake-commit"


@pytest.fixture
def hub(tmp_path):
    fake = FakeHub(tmp_path / "uploaded")
    with (
        mock.patch.object(huggingface_hub, "create_repo", fake.create_repo),
        mock.patch.object(huggingface_hub, "upload_folder", fake.upload_folder),
    ):
        yield fake


def test_pipeline_push_uploads_a_loadable_folder_and_an_enat_card(hub, tmp_path):
    pipe = tiny_pipeline()
    pipe.push_to_hub("someone/enat-tiny")
    (upload,) = hub.uploads
    assert upload["repo_id"] == "someone/enat-tiny"
    assert {"model_index.json", "pipeline_enat.py", "README.md"} <= upload["files"]
    assert "transformer/diffusion_pytorch_model.safetensors" in upload["files"]
    assert "vqvae/diffusion_pytorch_model.safetensors" in upload["files"]
    card = upload["readme"]
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    assert "- enat" in card and 'DiffusionPipeline.from_pretrained("someone/enat-tiny")' in card


def test_text_pipeline_card_is_text_to_image(hub, tmp_path):
    tiny_text_pipeline(tmp_path / "clip").push_to_hub("someone/enat-text")
    card = hub.uploads[0]["readme"]
    assert "pipeline_tag: text-to-image" in card
    assert {"pipeline_enat_text2img.py", "text_encoder/config.json"} <= hub.uploads[0]["files"]


def test_model_push_writes_a_model_card(hub):
    pipe = tiny_pipeline()
    pipe.transformer.push_to_hub("someone/enat-transformer")
    pipe.vqvae.push_to_hub("someone/maskgit-vq")
    transformer_upload, vq_upload = hub.uploads
    assert "config.json" in transformer_upload["files"]
    assert 'ENATTransformer2DModel.from_pretrained("someone/enat-transformer")' in transformer_upload["readme"]
    assert 'MaskGITVQModel.from_pretrained("someone/maskgit-vq")' in vq_upload["readme"]


def test_pushed_folder_loads_back_as_the_card_says(hub, tmp_path):
    pipe = tiny_pipeline()
    pipe.push_to_hub("someone/enat-tiny")
    (upload,) = hub.uploads
    assert 'DiffusionPipeline.from_pretrained("someone/enat-tiny")' in upload["readme"]
    cache_dir = fill_hub_cache(upload["copy"], tmp_path / "hub", repo_id="someone/enat-tiny")
    loaded = DiffusionPipeline.from_pretrained("someone/enat-tiny", cache_dir=cache_dir)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.transformer.parameters(), pipe.transformer.parameters(), strict=True)
    )


def test_the_card_comes_through_public_seams_only():
    """diffusers' private `_upload_folder` is not overridden: `push_to_hub` is, with public pieces."""
    from enat_diffusers.hub import ENATHubMixin

    assert "_upload_folder" not in vars(ENATHubMixin) and "push_to_hub" in vars(ENATHubMixin)


def test_push_to_a_subfolder_writes_no_card(hub):
    tiny_pipeline().push_to_hub("someone/enat-tiny", subfolder="v2")
    (upload,) = hub.uploads
    assert upload["readme"] is None and upload["path_in_repo"] == "v2"


def test_an_unreachable_hub_is_one_sentence(hub):
    import huggingface_hub.errors

    def unreachable(repo_id, **_kwargs):
        raise huggingface_hub.errors.HTTPError("[Errno -3] Temporary failure in name resolution")

    with (
        mock.patch.object(huggingface_hub, "create_repo", unreachable),
        pytest.raises(ConnectionError, match=r"pushing to the Hub repo 'someone/x' failed .*; check the network"),
    ):
        tiny_pipeline().push_to_hub("someone/x")


def test_a_local_model_card_asks_nothing_of_the_hub_and_says_how_to_install(tmp_path):
    pipe = tiny_pipeline()
    with mock.patch.object(huggingface_hub.ModelCard, "load", side_effect=AssertionError("asked the Hub")):
        card = pipe.model_card("someone/enat-tiny", local=True)
    assert "library_name: diffusers" in card and 'DiffusionPipeline.from_pretrained("someone/enat-tiny")' in card
    assert "pip install enat-diffusers" not in card and "git repository" in card
