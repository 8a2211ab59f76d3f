"""The releases of torch and transformers that focal_hf's code needs (`focal_hf.requirements`): `setup.cfg` asks
for the same; the code runs at the transformers floor (a real release, installed by pip into a folder put first on
a subprocess's `PYTHONPATH`: `conftest.pip_target`); tracing with a torch too old for it is refused by name; and a
Hub repository's remote code loaded by an older transformers (v4) fails with one message naming the release to
install, not with an error inside transformers."""

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import environment_with_path, pip_target, tiny_config
from packaging.requirements import Requirement
from packaging.version import Version

from focal_hf import FocalForImageClassification, FocalImageProcessor, hub, requirements
from focal_hf.requirements import REQUIREMENTS

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {Requirement(requirement).name: Requirement(requirement) for requirement in REQUIREMENTS}
# the last transformers release before v5: the one remote-code users still on v4 have
TRANSFORMERS_V4 = "4.57.6"


def run_with(site: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python *args` in a subprocess whose imports find the packages in `site` before the installed ones."""
    env = environment_with_path(site, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=1200)


def floor_version(name: str) -> str:
    """The release `REQUIREMENTS` names as the oldest of `name`."""
    (specifier,) = FLOORS[name].specifier
    assert specifier.operator == ">="
    return specifier.version


def test_setup_cfg_requires_the_releases_checked_at_import():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    installed = {
        requirement.name: requirement
        for requirement in map(Requirement, setup["options"]["install_requires"].strip().splitlines())
    }
    for name, floor in FLOORS.items():
        assert {s for s in installed[name].specifier if s.operator == ">="} == set(floor.specifier), name


@pytest.mark.parametrize("trace", ["compile", "export"])
def test_tracing_with_a_torch_too_old_to_trace_names_the_release(monkeypatch, trace):
    """What users of a torch too old to trace the model get from `torch.export` and `torch.compile(fullgraph=True)`
    (checked by hand on 2.11 with the floor raised above it; on 2.9 export fails inside torch):
    `requirements.TRACEABLE` set as such a torch sets it, read by dynamo when it traces."""
    model = FocalForImageClassification(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    monkeypatch.setattr(requirements, "TRACEABLE", False)
    torch._dynamo.reset()
    with pytest.raises(Exception) as error:
        if trace == "compile":
            torch.compile(model, backend="eager", fullgraph=True)(pixel_values)
        else:
            torch.export.export(model, (pixel_values,))
    message = str(error.value)
    assert f"torch.compile and torch.export of Focal models need {requirements.TRACING_REQUIREMENT}" in message
    assert f"pip install -U '{requirements.TRACING_REQUIREMENT}'" in message and "found torch==" in message
    assert isinstance(error.value, RuntimeError if trace == "export" else torch._dynamo.exc.Unsupported)
    monkeypatch.setattr(requirements, "TRACEABLE", True)
    torch._dynamo.reset()
    assert torch.compile(model, backend="eager", fullgraph=True)(pixel_values).logits.shape == (2, 5)


def test_the_model_and_processor_tests_pass_at_the_oldest_transformers_accepted():
    """The parity and image-processing tests, run by pytest on the transformers floor (the installed releases of its
    dependencies satisfy it)."""
    floor = floor_version("transformers")
    site = pip_target(f"transformers=={floor}")
    version = run_with(site, "-c", "import transformers; print(transformers.__version__)")
    assert Version(version.stdout.strip()) == Version(floor), version.stderr[-3000:]
    tests = ["tests/test_parity.py", "tests/test_image_processing.py"]
    result = run_with(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests)
    assert result.returncode == 0, result.stdout[-5000:]
    assert " passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout.splitlines()[-1]


# Loads a remote-code folder as a user of transformers v4 would, each entry point on its own; prints their errors.
OLD_TRANSFORMERS_PROBE = """
import json, sys
sys.modules["focal_hf"] = None  # as for a user without focal_hf
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
errors = {"version": transformers.__version__}
for auto in (AutoConfig, AutoModelForImageClassification, AutoImageProcessor):
    try:
        auto.from_pretrained(sys.argv[1], trust_remote_code=True)
        errors[auto.__name__] = None
    except Exception as error:
        errors[auto.__name__] = [type(error).__name__, str(error)]
print(json.dumps(errors))
"""


def test_remote_code_under_transformers_v4_names_the_release_to_install(tmp_path):
    folder = tmp_path / "remote"
    config = tiny_config()
    FocalForImageClassification(config).save_pretrained(folder)
    hub.add_remote_code(folder, config, FocalImageProcessor.for_image_size(config.image_size))
    assert (folder / "requirements.py").is_file()  # travels with the code that imports it

    site = pip_target(f"transformers=={TRANSFORMERS_V4}", dependencies=True)
    result = run_with(site, "-c", OLD_TRANSFORMERS_PROBE, str(folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert errors.pop("version") == TRANSFORMERS_V4
    requirement = str(FLOORS["transformers"])
    for entry_point, error in errors.items():
        assert error is not None, f"{entry_point} loaded under transformers {TRANSFORMERS_V4}"
        kind, message = error
        assert kind == "ImportError", (entry_point, error)
        assert f"{requirement} is required" in message and f"found transformers=={TRANSFORMERS_V4}" in message
        assert f"pip install -U '{requirement}'" in message
