"""Quantization with torchao (transformers' `TorchAoConfig`), checked by `tests/torchao_checks.py` in a pytest
subprocess that imports torchao from the test cache.

The test environment does not install torchao: transformers imports it in every process that loads a model once it
is installed, and on a CPU build of torch that import logs warnings (its CUDA libraries fail to load), which would
precede every script's output and error message. `conftest.pip_target` installs the pinned version once, without
dependencies, into the test cache."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import environment_with_path, pip_target

TORCHAO = "torchao==0.18.0"
TESTS = Path(__file__).parent


def test_torchao_quantization_checks_pass():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "torchao_checks.py")],
        env=environment_with_path(pip_target(TORCHAO)),
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\b5 passed\b", result.stdout) and "failed" not in result.stdout, result.stdout[-2000:]
