import argparse

import pytest

from enat_diffusers.script_utils import add_deprecated_flag, require_optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_inference_steps", type=int, default=8)
    add_deprecated_flag(parser, "--steps", "--num_inference_steps", removed_in="0.3")
    return parser


def test_deprecated_flag_sets_the_new_destination_and_warns_with_the_replacement():
    with pytest.warns(FutureWarning, match="--steps is deprecated.*use --num_inference_steps"):
        args = _parser().parse_args(["--steps", "12"])
    assert args.num_inference_steps == 12


def test_new_flag_alone_gives_no_warning_and_old_flag_is_hidden_from_help(recwarn):
    parser = _parser()
    assert parser.parse_args([]).num_inference_steps == 8
    assert parser.parse_args(["--num_inference_steps", "4"]).num_inference_steps == 4
    assert not recwarn.list
    assert "--steps" not in parser.format_help()


def test_missing_optional_dependency_stops_with_the_pip_command():
    with pytest.raises(SystemExit, match=r'pip install "enat-diffusers\[app\]"'):
        require_optional("no_such_module_for_enat", "app", "the web app")
    assert require_optional("json", "app", "x").dumps([1]) == "[1]"
