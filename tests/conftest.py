import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels (benchmarks/triton_attention.py) run on the CPU by Triton's interpreter: set before anything imports
# triton (transformers does), since Triton reads it when it makes kernels, its own library's included
os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers_sdist import cache_root  # noqa: E402

# torch.compile's cache, unless one is set: kept between runs in the tests' cache folder (warm, the slowest compiled
# test took 90 s instead of 244, run from another clone), and emptied when a run starts with more than this in it
# (each new clone or environment adds up to ~0.4 GB; torch's default folder, in /tmp, is never emptied). Under
# pytest-xdist (`-n 2`) the process that starts the run does it: its workers inherit TORCHINDUCTOR_CACHE_DIR
COMPILE_CACHE_LIMIT = 2 * 2**30


def emptied_if_over(folder: Path, limit: int) -> Path:
    """`folder`, deleted first if its files hold more than `limit` bytes."""
    if sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) > limit:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(emptied_if_over(cache_root() / "torchinductor", COMPILE_CACHE_LIMIT))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._inductor import codecache  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

STARTING_VERBOSITY = transformers_logging.get_verbosity()

# inductor's precompiled C++ headers (~0.15 GB each, a set for each environment: keyed by the compiler's command line)
# go to torch's default cache folder in /tmp whatever TORCHINDUCTOR_CACHE_DIR says (`_HEADER_DIR`, set at import):
# into the compile cache above instead, whose size COMPILE_CACHE_LIMIT bounds
codecache._HEADER_DIR = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "precompiled_headers")
codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")

FIXTURES = Path(__file__).parent / "fixtures"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PARITY_CASES = [
    "v1_fc_224",
    "v1_useconv_224",
    "v2_useconv_224",
    "v1_shift_mean_64",
    "v1_shift_conv_80",
    "v2_shift_max_64",
]


# pytest marks of transformers' common tests (test_transformers_common.py), declared in transformers' own conftest
TRANSFORMERS_MARKS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "slow",
    "torch_compile_test",
)


# what the suite holds at once in the temporary folder (a full-size converted checkpoint and its source, ~0.7 GB), with
# a margin: below it the tests fail by the hundred with ENOSPC, so stop first
NEEDED_TEMPORARY_SPACE = 2 * 2**30


def pytest_configure(config):
    for mark in TRANSFORMERS_MARKS:
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' common tests")


def lack_of_space(folder: Path, needed: int) -> str | None:
    """What to tell when the disk of `folder` (which may not exist yet) has less than `needed` bytes free."""
    free = shutil.disk_usage(next(path for path in (folder, *folder.parents) if path.exists())).free
    if free < needed:
        return (
            f"the tests need {needed / 2**30:.0f} GiB free in the temporary folder {folder}, which has "
            f"{free / 2**30:.1f} GiB: free some space there, or point TMPDIR (or --basetemp) at a disk with room"
        )
    return None


def pytest_sessionstart(session):
    folder = Path(session.config.option.basetemp or tempfile.gettempdir())
    if message := lack_of_space(folder, NEEDED_TEMPORARY_SPACE):
        pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _transformers_verbosity():
    """Each test starts at the verbosity the run started with: the examples, run in-process, set their log level
    (INFO), which would otherwise carry over to every later test's logging."""
    yield
    transformers_logging.set_verbosity(STARTING_VERBOSITY)


@pytest.fixture
def logged_warnings(caplog):
    """A function giving the messages of the warnings (and worse) that `caplog` has caught so far in the test; with
    transformers' `warning_once` (`logging.Logger.warning_once`) forgotten first, so that a warning another test
    logged is logged again here."""
    logging.Logger.warning_once.cache_clear()
    return lambda: [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def import_script(name: str):
    """A script of `benchmarks/` imported as a module (its folder on `sys.path` only while importing)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def environment_with_path(*folders: Path, **variables: str) -> dict[str, str]:
    """This process's environment for a subprocess whose imports find `folders` first (on `PYTHONPATH`, before what
    it held), with `variables` set."""
    paths = [str(folder) for folder in folders] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **variables}


def pip_target(requirement: str, dependencies: bool = False) -> Path:
    """A folder holding `requirement` (`name==version`) installed by pip, without its dependencies unless
    `dependencies`, for a subprocess's `PYTHONPATH`: for a package the test environment does not install, because
    importing it would change every test process (torchao: `tests/test_quantization.py`), or another release of one
    it does (transformers: `tests/test_requirements.py`). Installed once into
    `~/.cache/focal_hf/pip-<name>-<version>[-with-dependencies]/` (`$FOCAL_HF_CACHE` replaces `~/.cache/focal_hf`;
    `transformers_sdist.build_in_cache`); a failed install raises with pip's message."""
    import subprocess

    from transformers_sdist import build_in_cache, cache_root

    def install(folder: Path) -> None:
        command = [sys.executable, "-m", "pip", "install", requirement, "--disable-pip-version-check"]
        command += [] if dependencies else ["--no-deps"]
        result = subprocess.run([*command, "--target", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` exited with status {result.returncode}:\n{result.stderr[-3000:]}"
            )

    name = f"pip-{requirement.replace('==', '-')}{'-with-dependencies' if dependencies else ''}"
    return build_in_cache(cache_root() / name, install)


def synthetic_official_checkpoint(name: str, path: Path) -> Path:
    """An official checkpoint file of architecture `name` as the official code saves it (`{"model": state_dict}`,
    every key and shape of the published one, `official_checkpoints.json`), with random weights; `path`."""
    generator = torch.Generator().manual_seed(0)
    shapes = json.loads((FIXTURES / "official_checkpoints.json").read_text())[name]["state_dict"]
    torch.save({"model": {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in shapes.items()}}, path)
    return path


def official_training_checkpoint(case: str, folder: Path) -> Path:
    """Reference fixture `case` saved as the official training script saves a checkpoint (`utils.save_checkpoint`):
    the weights under "model" beside the optimizer's, scheduler's and apex amp's states, the best accuracy, the epoch
    and the run's config, a frozen yacs `CfgNode` (the fixture's YAML with some of the training sections); the
    file `folder / "ckpt_epoch_299.pth"`."""
    import yaml
    from yacs.config import CfgNode

    original = yaml.safe_load((FIXTURES / f"{case}.yaml").read_text())
    original.update(AMP_OPT_LEVEL="O1", OUTPUT="output/focal", TRAIN={"EPOCHS": 300, "BASE_LR": 5e-4})
    original["DATA"].update(INTERPOLATION="bicubic", BATCH_SIZE=128)
    config = CfgNode(original)
    config.freeze()
    weights = torch.load(FIXTURES / f"{case}.pth", weights_only=True)
    parameters = [torch.nn.Parameter(tensor.clone()) for tensor in weights.values() if tensor.is_floating_point()]
    optimizer = torch.optim.AdamW(parameters, lr=5e-4)
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # (creates the optimizer's state)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300)
    checkpoint = {
        "model": weights,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "max_accuracy": 81.7,
        "epoch": 299,
        "config": config,
        "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 120}},
    }
    path = folder / "ckpt_epoch_299.pth"
    torch.save(checkpoint, path)
    return path


def tiny_config(**overrides):
    """A small, fast Focal model (16 channels, one block per stage) exercising pooling and expansion."""
    from focal_hf import FocalConfig

    kwargs = dict(
        image_size=64,
        embed_dim=16,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
        focal_levels=[2, 2, 2, 2],
        focal_windows=[3, 3, 3, 1],
        expand_sizes=[2, 2, 2, 2],
        num_labels=5,
        drop_path_rate=0.0,
    )
    kwargs.update(overrides)
    return FocalConfig(**kwargs)


class FakeHub:
    """The Hub calls of `huggingface_hub.HfApi`, recorded instead of sent (the Hub is offline in tests)."""

    def __init__(self, monkeypatch, user="you", role="write"):
        import huggingface_hub
        from huggingface_hub import RepoUrl
        from huggingface_hub.utils import filter_repo_objects

        self.calls, self.uploads, self.user, self.role = [], [], user, role

        def whoami(api, *args, **kwargs):
            self.calls.append(("whoami", api.token))
            return {"name": self.user, "auth": {"accessToken": {"role": self.role}}}

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else f'{self.user}/{repo_id}'}")

        def upload_folder(api, *, folder_path, repo_id, **kwargs):
            self.calls.append(("upload_folder", repo_id, kwargs))
            folder = Path(folder_path)
            files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
            patterns = {key: kwargs.get(key) for key in ("allow_patterns", "ignore_patterns")}
            kept = filter_repo_objects(files, **patterns)
            self.uploads.append({path: files[path] for path in kept})  # what `upload_folder` would send
            return f"https://huggingface.co/{repo_id}/commit/0"

        for name, method in (("whoami", whoami), ("create_repo", create_repo), ("upload_folder", upload_folder)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, method)


def hub_http_error(status: int, message: str):
    """An `HfHubHTTPError` as huggingface_hub raises it for an HTTP `status` (built on its own HTTP library)."""
    import importlib

    from huggingface_hub import errors

    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    response = http.Response(status, request=http.Request("POST", "https://huggingface.co/api"))
    return errors.HfHubHTTPError(message, response=response)


@pytest.fixture
def fake_hub(monkeypatch):
    return FakeHub(monkeypatch)


# Loads a folder the way a user without focal_hf does: in a fresh interpreter where `import focal_hf` fails.
REMOTE_CODE_PROBE = """
import sys
sys.modules["focal_hf"] = None  # importing focal_hf (installed or on the path) now raises ImportError
import json
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
folder, image = sys.argv[1], sys.argv[2]
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
print(json.dumps({
    "classes": [type(processor).__name__, type(model).__name__, type(classifier.model).__name__],
    "code": [type(processor).__module__, type(model).__module__],
    "predictions": classifier(Image.open(image), top_k=5),
}))
"""


def load_without_focal_hf(folder, image, tmp_path) -> dict:
    """`AutoImageProcessor`, `AutoModelForImageClassification` and the pipeline on `folder` with
    `trust_remote_code=True`, in a subprocess that cannot import focal_hf; returns their classes and predictions."""
    import json
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_PROBE, str(folder), str(image)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
