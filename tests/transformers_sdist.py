"""transformers' own common model tests, taken from the sdist of the installed transformers.

`pip download transformers==<installed version> --no-binary :all: --no-deps` gives the source distribution, whose
`tests/` holds `test_modeling_common.py` (`ModelTesterMixin`), `test_backbone_common.py` (`BackboneTesterMixin`) and
`test_configuration_common.py` (`ConfigTester`). They are downloaded once into
`~/.cache/focal_hf/transformers-tests-<version>/` (`$FOCAL_HF_CACHE` replaces `~/.cache/focal_hf`), staged in a
temporary folder and renamed into place, and imported from there as the package `transformers_common_tests`.

The three modules import a few helpers that the sdist does not ship; `common_tests()` provides stand-ins for them.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import transformers

PACKAGE = "transformers_common_tests"
MODULES = ("test_modeling_common", "test_backbone_common", "test_configuration_common")


def cache_root() -> Path:
    return Path(os.environ.get("FOCAL_HF_CACHE", Path.home() / ".cache" / "focal_hf"))


def build_in_cache(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, a folder of the test cache, made once: `build(folder)` fills a new folder inside a staging folder
    beside `target` (which `build` may also use for its downloads), renamed into place once complete, so that `target`
    either does not exist or is whole; where a concurrent build finished first, its folder is kept. Returns `target`."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as staging:
        folder = Path(staging) / "tree"
        build(folder)
        try:
            os.rename(folder, target)
        except OSError:
            if not target.is_dir():  # not a concurrent build that finished first
                raise
    return target


def _download_and_extract(version: str, folder: Path) -> None:
    """Download transformers' sdist (beside `folder`) and write its top-level `tests/*.py` to
    `folder/transformers_common_tests/`."""
    sdist = folder.parent / "sdist"
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}"]
    command += ["--no-binary", ":all:", "--no-deps", "--disable-pip-version-check", "-d", str(sdist)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(sdist.glob("transformers-*.tar.gz"))
    if result.returncode != 0 or len(archives) != 1:
        raise RuntimeError(
            f"transformers' common model tests come from the transformers {version} source distribution on "
            f"PyPI, and downloading it failed: `{' '.join(command)}` exited with status {result.returncode}.\n"
            f"{result.stderr[-3000:]}\nThese tests need PyPI, or a pip index that has the sdist, once per "
            f"transformers version."
        )
    package = folder / PACKAGE
    package.mkdir(parents=True)
    with tarfile.open(archives[0]) as archive:
        for member in archive.getmembers():
            path = PurePosixPath(member.name)  # transformers-<version>/tests/<name>.py
            if member.isfile() and len(path.parts) == 3 and path.parts[1] == "tests" and path.suffix == ".py":
                (package / path.name).write_bytes(archive.extractfile(member).read())
    missing = [name for name in MODULES if not (package / f"{name}.py").is_file()]
    if missing:
        raise RuntimeError(f"The transformers {version} sdist has no tests/{missing[0]}.py; cannot run its tests.")
    (package / "__init__.py").write_text("")  # also what test_configuration_common's direct import executes


def _install_stand_ins() -> None:
    """Modules imported by the common tests that the sdist lacks (they live in transformers' repository)."""

    def module(name: str, **attributes) -> None:
        stand_in = types.ModuleType(f"{PACKAGE}.{name}")
        stand_in.__dict__.update(attributes)
        sys.modules.setdefault(stand_in.__name__, stand_in)

    # tests/exporters/test_export.py: `ModelTesterMixin` derives from its `ExportTesterMixin`, the tests of
    # transformers' exporters (dynamo, ONNX, ExecuTorch, ...) with their per-model skip lists. Not run here: focal-hf
    # tests exporting its models itself.
    module("exporters", __path__=[])
    module("exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
    # tests/generation/test_utils.py: only checked with `issubclass`, for models that can `generate()`.
    module("generation", __path__=[])
    module("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
    # tests/utils/test_configuration_utils.py: a non-default value for each attribute that every config has, which
    # `ConfigTester.check_config_arguments_init` passes to the config class and expects back.
    module("utils", __path__=[])
    module(
        "utils.test_configuration_utils",
        config_common_kwargs={
            "return_dict": False,
            "output_hidden_states": True,
            "output_attentions": True,
            "dtype": "float16",
            "chunk_size_feed_forward": 5,
            "architectures": ["BertModel"],
            "id2label": {0: "label"},
            "label2id": {"label": "0"},
            "problem_type": "regression",
        },
    )


def common_tests() -> types.SimpleNamespace:
    """transformers' common test modules for the installed transformers (downloaded once), as the attributes
    `modeling`, `backbone` and `configuration`."""
    version = transformers.__version__
    root = build_in_cache(
        cache_root() / f"transformers-tests-{version}", functools.partial(_download_and_extract, version)
    )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _install_stand_ins()
    modules = {name.removeprefix("test_").removesuffix("_common"): f"{PACKAGE}.{name}" for name in MODULES}
    return types.SimpleNamespace(**{key: importlib.import_module(name) for key, name in modules.items()})
