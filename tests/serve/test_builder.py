"""The application builder takes its typed arguments or, from a `serve deploy` config file, the
same as a mapping (no Ray cluster or engine needed to build it)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from mergeserve.serve.builder import AppArgs, build_app
from mergeserve.serve.server import ServeOptions, app_args, resolve_checkpoints


def test_build_app_from_typed_args_and_from_a_config_files_mapping(tiny_family):
    from ray.serve import Application

    opts = ServeOptions(checkpoints=[str(tiny_family["mistral"]["code"])], api_key="k")
    args = app_args(opts, resolve_checkpoints(opts), "cpu", check_hardware=False)
    assert isinstance(args, AppArgs) and args.api_key == "k"
    mapping = yaml.safe_load(yaml.safe_dump(args.model_dump()))  # what --emit-config writes
    assert isinstance(build_app(args), Application) and isinstance(build_app(mapping), Application)
    with pytest.raises(ValidationError, match="api_kee"):
        build_app({**mapping, "api_kee": "k"})
