"""Model cards for ENAT pipelines and models pushed to the Hugging Face Hub."""

import contextlib
import tempfile
from pathlib import Path

import huggingface_hub
import huggingface_hub.errors
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import ModelCard, ModelCardData

_DESCRIPTION = """An [ENAT](https://arxiv.org/abs/2411.06959) (EfficientNAT, NeurIPS 2024) `{class_name}` for
[diffusers](https://github.com/huggingface/diffusers), saved with the `enat-diffusers` package.

## Usage

`enat-diffusers` is not on a package index: install it from its git repository (`pip install -e .` in a clone, or
`pip install "git+<repository URL>"`), then:

```python
{usage}
```"""

CARD_TAGS = ("enat", "enat-diffusers", "masked-image-modeling")


class ENATHubMixin:
    """
    `push_to_hub` for ENAT pipelines and models: the saved folder with an ENAT model card (`README.md`: library and
    pipeline tags, a usage snippet that loads the repo). The card is made with diffusers' model-card helpers, so a
    card already in the repo is kept and only gets the missing tags. Classes set `_card_pipeline_tag`, `_card_tags`
    and implement `_card_usage(repo_id)`.
    """

    _card_pipeline_tag: str | None = None
    _card_tags: tuple[str, ...] = ()

    def _card_usage(self, repo_id: str) -> str:
        raise NotImplementedError

    def model_card(self, repo_id: str, token: str | None = None, local: bool = False) -> str:
        """The text of the model card (`README.md`) pushed with the weights to `repo_id`: the card already in the
        repo if there is one (offline or new repos: diffusers' template), with our description, tags and usage.
        `local=True` builds it from the template alone, without asking the Hub (a folder saved without pushing)."""
        from diffusers import DiffusionPipeline

        description = _DESCRIPTION.format(class_name=type(self).__name__, usage=self._card_usage(repo_id).strip())
        if local:
            card = ModelCard.from_template(ModelCardData(), model_description=description)
        else:
            card = load_or_create_model_card(
                repo_id, token=token, is_pipeline=isinstance(self, DiffusionPipeline), model_description=description
            )
        existing = set(card.data.tags or [])
        card = populate_model_card(card, tags=[tag for tag in (*CARD_TAGS, *self._card_tags) if tag not in existing])
        if card.data.license is None:
            card.data.license = "apache-2.0"
        if self._card_pipeline_tag and card.data.pipeline_tag is None:
            card.data.pipeline_tag = self._card_pipeline_tag
        return str(ModelCard(str(card)))

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
    ) -> str:
        """
        Uploads what `save_pretrained` writes to the Hub repo `repo_id` (created if needed), with the ENAT model card
        unless `subfolder` is given. Same arguments as diffusers' `push_to_hub`; returns the commit's URL.
        """
        with _hub_errors_in_one_sentence(repo_id):
            repo_id = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            with _hub_errors_in_one_sentence(repo_id):
                if not subfolder:
                    (Path(folder) / "README.md").write_text(self.model_card(repo_id, token=token))
                return huggingface_hub.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    path_in_repo=subfolder,
                    token=token,
                    commit_message=commit_message or f"Upload {type(self).__name__}",
                    create_pr=create_pr,
                )


@contextlib.contextmanager
def _hub_errors_in_one_sentence(repo_id: str):
    """Network and authentication failures of the Hub calls as one sentence instead of a transport traceback."""
    try:
        yield
    except huggingface_hub.errors.HTTPError as error:  # transport errors and the Hub's HTTP errors
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = "log in with `hf auth login` or pass `token=`" if status in (401, 403) else "check the network"
        raise ConnectionError(
            f"pushing to the Hub repo {repo_id!r} failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'}); {hint}"
        ) from None
