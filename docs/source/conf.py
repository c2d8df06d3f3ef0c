"""Sphinx configuration of the enat-diffusers docs.

Build (what CI and tests/test_docs.py run; warnings, broken links and missing references fail it):

    python -m sphinx -W --keep-going -n -b html docs/source docs/_build/html
"""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # autodoc documents this checkout's enat_diffusers, not an installed copy

import enat_diffusers  # noqa: E402

project = "enat-diffusers"
author = "enat-diffusers contributors"
copyright = "enat-diffusers contributors, Apache-2.0"
release = enat_diffusers.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links are checked like references
myst_enable_extensions = ["colon_fence"]

html_theme = "furo"
html_title = f"enat-diffusers {release}"
html_show_sourcelink = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
default_role = "literal"  # `x` in docstrings is code, as in diffusers' docstrings
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_param = False  # diffusers-style types are prose ("PIL image or a list of them"), not class names

# Types from other libraries are not documented here (no intersphinx: the build reads nothing from the network), so
# strict reference checking (-n) ignores them; every reference to an enat_diffusers name must resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|diffusers|transformers|peft|PIL|numpy|np|collections|typing|argparse|pathlib|os)(\..*)?"),
    (r"py:.*", r"(Tensor|LongTensor|FloatTensor|BoolTensor|Generator|Image|ndarray|Path|PathLike|Callable)"),
    (r"py:.*", r"(ModelMixin|ConfigMixin|SchedulerMixin|DiffusionPipeline|BaseOutput|PeftAdapterMixin)"),
    (r"py:.*", r"(AttentionMixin|AttentionModuleMixin|ImagePipelineOutput|NamedTuple|dataclass)"),
    # internal building blocks named in public signatures, not part of the API
    (r"py:class", r"enat_diffusers\..*\.(ENATBlock|ENATEditingPipelineBase)"),
    (r"py:.*", r"(int|float|str|bool|dict|list|tuple|None|optional|defaults to .*|\*optional\*)"),
]

# Docstrings follow diffusers' conventions (markdown-flavoured Google style): [`Name`] links, ```py fences.
# Turn them into reStructuredText for autodoc: a name exported by enat_diffusers becomes a checked reference, any
# other name a literal.
_LINK = re.compile(r"\[`~?([\w.]+)`\]")
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>\w*)\s*$")


def _link(match: re.Match) -> str:
    name = match.group(1)
    short = name.rsplit(".", 1)[-1]
    if name.startswith("enat_diffusers.") or short in enat_diffusers.__all__:
        target = name if name.startswith("enat_diffusers.") else f"enat_diffusers.{short}"
        return f":py:obj:`~{target}`"
    return f"``{name}``"


def _join_wrapped_parameter_names(lines: list[str]) -> list[str]:
    """An argument entry whose name or type wraps onto the next line ("a, b,\\n c:" or "x (`A` or\\n `B`):") as one line,
    which is what napoleon reads as an entry."""
    joined, section_indent = [], None
    for line in lines:
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            joined.append(line)
            section_indent = -1
            continue
        if section_indent == -1 and stripped:
            section_indent = indent
        previous = joined[-1].strip() if joined else ""
        continues = previous.endswith(",") or previous.count("(") > previous.count(")")
        if section_indent and section_indent > 0 and stripped and joined and continues and not previous.endswith(":"):
            previous_indent = len(joined[-1]) - len(joined[-1].lstrip())
            if previous_indent == section_indent and (indent > section_indent or previous.endswith(",")):
                joined[-1] = f"{joined[-1].rstrip()} {stripped}"
                continue
        if stripped and section_indent and section_indent > 0 and indent < section_indent:
            section_indent = None
        joined.append(line)
    return joined


def _dedent_to_first_line(lines: list[str]) -> list[str]:
    """diffusers' `replace_example_docstring` inserts an "Examples:" section indented less than the rest, so Python's
    docstring cleaning leaves the rest indented (an rst block quote, where napoleon finds no sections). Dedent the rest
    to the first line; the Examples section (from its header to the next section header) keeps its own indentation."""
    first = next((line for line in lines if line.strip()), "")
    indent = len(first) - len(first.lstrip())
    dedented, in_examples = [], False
    for line in lines:
        line_indent = len(line) - len(line.lstrip())
        if line.strip() and line_indent < indent:
            in_examples = True
        elif in_examples and line_indent == indent and re.match(r"^\w[\w ]*:$", line.strip()):
            in_examples = False
        dedented.append(line if in_examples else line[min(indent, line_indent) :])
    return dedented


def _diffusers_docstring_to_rst(app, what, name, obj, options, lines):
    lines[:] = _dedent_to_first_line(lines)
    if what == "property" and lines and ": " in lines[0].split("`")[0]:
        # napoleon reads "text: more" on a property's first line as "type: description"; it is prose here
        lines[0] = lines[0].replace(": ", " — ", 1)
    lines[:] = _join_wrapped_parameter_names(lines)
    converted, in_fence, indent = [], False, ""
    for line in lines:
        fence = _FENCE.match(line)
        if fence and not in_fence:
            in_fence, indent = True, fence.group("indent")
            language = {"py": "python", "": "text"}.get(fence.group("language"), fence.group("language"))
            converted += [f"{indent}.. code-block:: {language}", ""]
            continue
        if fence and in_fence:
            in_fence = False
            converted.append("")
            continue
        if in_fence:
            converted.append(f"{indent}   {line[len(indent) :]}" if line.strip() else "")
        else:
            converted.append(_LINK.sub(_link, line))
    lines[:] = converted


def setup(app):
    # before napoleon (priority 500), which reads the converted Google-style sections
    app.connect("autodoc-process-docstring", _diffusers_docstring_to_rst, priority=400)
