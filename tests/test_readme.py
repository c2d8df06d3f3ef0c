"""Every code block of README.md runs, except those marked as needing what a test machine does not have."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_MARK = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\s*$")
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
BLOCK = re.compile(r"^```(?P<language>python|bash)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks():
    text = (REPO / "README.md").read_text()
    for match in BLOCK.finditer(text):
        preceding = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP_MARK.search(preceding)
        line = text[: match.start()].count("\n") + 1
        yield pytest.param(
            match.group("language"), match.group("code"), skip.group("reason") if skip else None, id=f"line{line}"
        )


BLOCKS = list(_blocks())


def test_readme_has_runnable_blocks_and_only_known_skip_reasons():
    reasons = [block.values[2] for block in BLOCKS]
    assert any(reason is None for reason in reasons)
    assert {reason for reason in reasons if reason} <= ALLOWED_SKIP_REASONS


@pytest.mark.parametrize("language, code, skip_reason", BLOCKS)
def test_readme_block_runs(language, code, skip_reason, tmp_path):
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
