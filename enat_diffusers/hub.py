"""Model cards for ENAT pipelines and models pushed to the Hugging Face Hub."""

from pathlib import Path

_CARD = """---
{front_matter}
---

# {title}

{description}

## Usage

```bash
pip install enat-diffusers
```

```python
{usage}
```
"""


class ENATHubMixin:
    """
    Writes an ENAT model card (`README.md`: library and pipeline tags, usage snippet) into the folder that
    `push_to_hub` uploads, in place of diffusers' generic card. Classes set `_card_pipeline_tag`, `_card_tags` and
    implement `_card_usage(repo_id)`.
    """

    _card_pipeline_tag: str | None = None
    _card_tags: tuple[str, ...] = ()

    def _card_usage(self, repo_id: str) -> str:
        raise NotImplementedError

    def model_card(self, repo_id: str) -> str:
        """The `README.md` written next to the weights when pushing to `repo_id`."""
        front_matter = ["library_name: diffusers", "license: apache-2.0"]
        if self._card_pipeline_tag:
            front_matter.append(f"pipeline_tag: {self._card_pipeline_tag}")
        front_matter.append("tags:")
        front_matter += [f"- {tag}" for tag in ("enat", "enat-diffusers", "masked-image-modeling", *self._card_tags)]
        return _CARD.format(
            front_matter="\n".join(front_matter),
            title=f"{repo_id.split('/')[-1]} ({type(self).__name__})",
            description=(
                "An [ENAT](https://arxiv.org/abs/2411.06959) (EfficientNAT, NeurIPS 2024) "
                f"`{type(self).__name__}` for [diffusers](https://github.com/huggingface/diffusers), "
                "saved with the `enat-diffusers` package."
            ),
            usage=self._card_usage(repo_id).strip(),
        )

    def _upload_folder(self, working_dir, repo_id: str, **kwargs):
        if not kwargs.get("subfolder"):
            (Path(working_dir) / "README.md").write_text(self.model_card(repo_id))
        return super()._upload_folder(working_dir, repo_id, **kwargs)
