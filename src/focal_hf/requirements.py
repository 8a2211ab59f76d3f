# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""The oldest PyTorch and transformers releases the Focal model code runs on, checked when it is imported.

pip enforces `setup.cfg`'s requirements when focal_hf is installed, but not when a Hub repository's remote code
(`trust_remote_code=True`) is loaded, nor after a later downgrade: there an older release would fail with an
`ImportError` or `AttributeError` far from its cause. Importing this module (the first import of the modules that
transformers loads first: the configuration and the image processor) checks both and otherwise says in one
`ImportError` which release to install.

These are the floors of the model code in eager mode, inference and training (torch 2.6 lacks
`torch.compiler.is_exporting`; transformers 5.17 and older import `AutoImageProcessor` only with torchvision), and
`setup.cfg`'s: they refuse no release the code runs on. Tracing the model (`torch.compile`, `torch.export`, so also
ONNX and AOTInductor) needs a newer torch, `TRACING_REQUIREMENT` (torch 2.9 specialises exported sizes), checked
when tracing starts (`check_tracing_requirement`); the examples need a newer transformers (`setup.cfg`'s `examples`
extra). `tests/test_requirements.py` runs the parity and image-processing tests at the transformers floor.
"""

import importlib.metadata

from packaging.requirements import Requirement
from transformers.utils.versions import require_version

REQUIREMENTS = ("torch>=2.7", "transformers>=5.18")
TRACING_REQUIREMENT = "torch>=2.11"


def check_requirements() -> None:
    """Raise an `ImportError` naming the release to install if torch or transformers is older than `REQUIREMENTS`."""
    for requirement in REQUIREMENTS:
        require_version(
            requirement,
            f"The Focal Transformer's code (focal_hf, or a model repository's remote code) needs {requirement}: "
            f"pip install -U '{requirement}'",
        )


def check_tracing_requirement() -> None:
    """While `torch.compile` or `torch.export` traces the model: a `RuntimeError` naming the release to install if
    torch is older than `TRACING_REQUIREMENT`, where tracing would fail inside torch. `torch.export` raises it and
    `torch.compile(fullgraph=True)` fails with it; plain `torch.compile` (dynamo skips a frame that raises) runs the
    model's forward uncompiled."""
    if not TRACEABLE:
        raise RuntimeError(
            f"torch.compile and torch.export of Focal models need {TRACING_REQUIREMENT}, found torch=={TORCH_VERSION}: "
            f"pip install -U '{TRACING_REQUIREMENT}'. In eager mode the model runs on {REQUIREMENTS[0]}."
        )


check_requirements()  # first, before anything here reads the installed releases
TORCH_VERSION = importlib.metadata.version("torch")
# constants, as dynamo reads them when it traces `check_tracing_requirement`
TRACEABLE = Requirement(TRACING_REQUIREMENT).specifier.contains(TORCH_VERSION, prereleases=True)
