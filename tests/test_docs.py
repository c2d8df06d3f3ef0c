"""The docs: every code block of README.md and of the docs site (docs/source) runs, except those marked as needing
what a test machine does not have, and the site builds in strict mode (warnings, broken links and unresolved
references fail it)."""

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import PIL.Image
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS_SOURCE = REPO / "docs" / "source"
PAGES = [REPO / "README.md", *sorted(DOCS_SOURCE.rglob("*.md"))]
SKIP_MARK = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]+)\) -->\s*$")
ANY_MARK = re.compile(r"^\s*<!--\s*(docs|readme)-test\b")  # a marker line (prose may quote one)
ALLOWED_SKIP_REASONS = {
    "installs packages",
    "runs the whole test suite",
    "needs downloaded checkpoints",
    "needs a GPU",
    "needs a dataset",
    "needs the reference repository",
    "runs a full-size benchmark",
}
# What a warning on stderr looks like: Python's warnings, diffusers' and transformers' logger warnings we know of.
WARNING_MARKS = ("Warning:", "will be ignored", "non-standard module", "deprecated", "cannot verify")
# Not ours: torchao (the `quant` extra, installed for the tests) registers enums with torch's pytree when diffusers
# imports it, which torch 2.13 logs as deprecated from torch/utils/_pytree.py. A user without that extra never sees it.
THIRD_PARTY_NOISE = ("torch/utils/_pytree.py:",)
# Set ENAT_UPDATE_SCREENSHOT=1 to write the README's picture of the site (as tests/test_app_browser.py does the app's).
SITE_SCREENSHOT = REPO / "assets" / "docs_site.png"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
BLOCK = re.compile(r"^```(?P<language>python|bash)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)


def _where(page: Path, text: str, position: int) -> str:
    return f"{page.relative_to(REPO)}:{text[:position].count(chr(10)) + 1}"


def _blocks():
    """Each distinct block once (the same block on two pages runs once), named by its first page and line."""
    seen = set()
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            preceding = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP_MARK.search(preceding)
            key = (match.group("language"), match.group("code"))
            if key in seen:
                continue
            seen.add(key)
            yield pytest.param(
                *key, skip.group("reason") if skip else None, id=_where(page, text, match.start()).replace("/", ".")
            )


BLOCKS = list(_blocks())


def test_docs_have_runnable_blocks_and_only_known_skip_reasons():
    reasons = [block.values[2] for block in BLOCKS]
    assert any(reason is None for reason in reasons)
    unknown = {reason for reason in reasons if reason} - ALLOWED_SKIP_REASONS
    assert not unknown, f"unknown skip reasons {sorted(unknown)}; allowed: {sorted(ALLOWED_SKIP_REASONS)}"


def test_every_skip_marker_is_well_formed_and_right_before_a_block():
    misplaced = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for index, line in enumerate(lines):
            if not ANY_MARK.search(line):
                continue
            next_line = lines[index + 1] if index + 1 < len(lines) else ""
            if not SKIP_MARK.search(line) or not re.match(r"```(python|bash)\s*$", next_line):
                misplaced.append(f"{page.relative_to(REPO)}:{index + 1}: {line.strip()}")
    assert not misplaced, (
        "a skip marker must read `<!-- docs-test: skip (REASON) -->` on the line right before a ```python or ```bash "
        "block:\n" + "\n".join(misplaced)
    )


@pytest.mark.parametrize("language, code, skip_reason", BLOCKS)
def test_docs_block_runs(language, code, skip_reason, tmp_path):
    if skip_reason:
        pytest.skip(skip_reason)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        # `python` in a block is the interpreter running the tests, as in an activated environment
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    # Blocks use repository paths (examples/...) and write files: they run in a scratch folder that links those.
    for folder in ("examples", "conversion"):
        (tmp_path / folder).symlink_to(REPO / folder, target_is_directory=True)
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{language} block failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
    if language == "python":  # the documented Python paths warn nothing (progress bars are all they print there)
        noise = [
            line
            for line in result.stderr.splitlines()
            if any(mark in line for mark in WARNING_MARKS) and not any(source in line for source in THIRD_PARTY_NOISE)
        ]
        assert not noise, f"python block warned:\n{code}\n--- warnings ---\n" + "\n".join(noise[:10])


def test_readme_links_and_pictures_point_at_files_of_the_repository():
    # README.md is not part of the site, so the strict build does not check its links
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text)
    assert targets
    missing = [target for target in targets if not (REPO / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def _missing_docs_tools() -> list[str]:
    return [name for name in ("sphinx", "myst_parser", "furo") if importlib.util.find_spec(name) is None]


def _docs_conf():
    spec = importlib.util.spec_from_file_location("docs_conf", DOCS_SOURCE / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_diffusers_style_docstrings_become_restructuredtext():
    # as Python cleans a `__call__` docstring after diffusers' `replace_example_docstring`: the inserted "Examples:"
    # header is indented less than the rest
    lines = [
        "    Generates images.",
        "",
        "    Args:",
        "        transformer ([`ENATTransformer2DModel`]): Predicts tokens; see [`~diffusers.AmusedScheduler`].",
        "        steps, guidance_scale,",
        "        generator:",
        "            As for [`ENATPipeline`].",
        "",
        "Examples:",
        "    ```py",
        "    >>> pipe = load_demo_pipeline()",
        "    ```",
        "",
        "    Returns:",
        "        images",
    ]
    _docs_conf()._diffusers_docstring_to_rst(None, "method", "name", None, {}, lines)
    text = "\n".join(lines)
    assert "Args:" in lines and "Returns:" in lines  # top level again: napoleon reads them as sections
    assert ":py:obj:`~enat_diffusers.ENATTransformer2DModel`" in text  # our names: checked references
    assert "``diffusers.AmusedScheduler``" in text  # other libraries' names: literals, not broken references
    assert "    steps, guidance_scale, generator:" in lines  # a wrapped list of names is one entry for napoleon
    # the example is a code block inside the Examples section (indented below its header)
    assert lines[lines.index("Examples:") + 1 :][:3] == [
        "    .. code-block:: python",
        "",
        "       >>> pipe = load_demo_pipeline()",
    ]
    assert "```" not in text


def test_docs_site_builds_in_strict_mode(tmp_path):
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(f"the `docs` extra is not installed (missing {', '.join(missing)}): pip install -e '.[docs]'")
    output = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q", "-b", "html"]
    result = subprocess.run(
        [*command, str(DOCS_SOURCE), str(output)],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    problems = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, "docs build failed:\n" + "\n".join(problems or result.stderr.splitlines()[-30:])
    # every page is in the site, and the API pages carry the rendered docstrings
    for page in DOCS_SOURCE.rglob("*.md"):
        assert (output / page.relative_to(DOCS_SOURCE).with_suffix(".html")).is_file(), page
    pipeline_page = (output / "api" / "pipelines" / "enat.html").read_text()
    assert 'id="enat_diffusers.ENATPipeline.__call__"' in pipeline_page
    assert "num_images_per_prompt" in pipeline_page

    update = os.environ.get("ENAT_UPDATE_SCREENSHOT") == "1"
    seen = _look_at_site(output, SITE_SCREENSHOT if update else tmp_path / "site.png")
    assert seen["title"].startswith("enat-diffusers"), seen["title"]
    assert "Editing" in seen["sidebar"] and "ENATPipeline" in seen["sidebar"], seen["sidebar"]
    assert not seen["broken_images"], seen["broken_images"]


def _look_at_site(site: Path, screenshot: Path) -> dict:
    """Serves the built site on localhost, opens its front page in headless Chromium and takes a screenshot."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright's Python package")
    chromium = os.environ.get("ENAT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("the site was built; looking at it needs Debian's chromium package")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html", wait_until="load")
            seen = {
                "title": page.title(),
                "sidebar": page.inner_text(".sidebar-tree"),
                "broken_images": page.eval_on_selector_all(
                    "article img", "images => images.filter(image => !image.naturalWidth).map(image => image.src)"
                ),
            }
            page.screenshot(path=str(screenshot))
            # few colours: a small file to commit
            PIL.Image.open(screenshot).convert("RGB").quantize(colors=64).save(screenshot, optimize=True)
            browser.close()
        server.shutdown()
    return seen
