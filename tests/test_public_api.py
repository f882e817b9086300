"""The package's front door: lazy names, the version, and lens_rome 0.1's import paths."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lens_rome


def test_import_lens_rome_loads_no_torch():
    code = "import sys, lens_rome; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_version_comes_from_the_installed_metadata():
    assert lens_rome.__version__ == importlib.metadata.version("lens_rome")


@pytest.mark.parametrize("name", lens_rome.__all__)
def test_every_public_name_resolves(name):
    assert getattr(lens_rome, name) is not None


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'tarce'"):
        lens_rome.tarce  # noqa: B018


@pytest.mark.parametrize("old, name, new", [
    ("lens_rome.rome", "edit", "lens_rome.editing.rome"),
    ("lens_rome.rome", "RomeHyperParams", "lens_rome.editing.hparams"),
    ("lens_rome.rome", "EditRequest", "lens_rome.data.requests"),
    ("lens_rome.hooks", "Gaussian", "lens_rome.tracing.noise_rules"),
    ("lens_rome.hooks", "restore", "lens_rome.tracing.interventions"),
    ("lens_rome.memit", "MemitHyperParams", "lens_rome.editing.memit"),
    ("lens_rome.models", "load_model", "lens_rome.model.loading"),
    ("lens_rome.statistics", "model_fingerprint", "lens_rome.model.adapter"),
])
def test_old_paths_still_import_with_a_deprecation_warning(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_the_old_tracing_module_is_the_new_package():
    from lens_rome.tracing import TraceResult, trace

    assert lens_rome.tracing.trace is trace and lens_rome.TraceResult is TraceResult


def test_an_old_path_without_the_name_says_so():
    module = importlib.import_module("lens_rome.hooks")
    with pytest.raises(AttributeError, match="'lens_rome.hooks' has no attribute 'nothing'"):
        module.nothing  # noqa: B018
