# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Sharing Focal models on the Hugging Face Hub, one place for the converter and the fine-tuning examples: repo-id
and credential checks made before any work, self-contained remote-code folders, model cards, and uploads that fail
with one clear message (the local folder stays complete)."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from transformers.dynamic_module_utils import get_relative_import_files

from .requirements import REQUIREMENTS

PACKAGE = Path(__file__).resolve().parent
# what `trust_remote_code=True` loads; their relative imports travel with them (`remote_code_files`)
AUTO_MAP = {
    "AutoConfig": "configuration_focal.FocalConfig",
    "AutoModel": "modeling_focal.FocalModel",
    "AutoModelForImageClassification": "modeling_focal.FocalForImageClassification",
    "AutoBackbone": "modeling_focal.FocalBackbone",
    "AutoImageProcessor": "image_processing_focal.FocalImageProcessor",
}
TAGS = ["vision", "image-classification", "focal-transformer"]
CITATION = """@misc{yang2021focal,
    title={Focal Self-attention for Local-Global Interactions in Vision Transformers},
    author={Jianwei Yang and Chunyuan Li and Pengchuan Zhang and Xiyang Dai and Bin Xiao and Lu Yuan and Jianfeng Gao},
    year={2021},
    eprint={2107.00641},
    archivePrefix={arXiv},
    primaryClass={cs.CV}
}"""


class HubError(Exception):
    """A Hub operation that cannot go on; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ checks
def check_repo_id(repo_id: str) -> str:
    """`repo_id` if the Hub accepts it as a model repository id (`name` or `namespace/name`), else a `HubError`."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"{repo_id!r} is not a valid Hub repository id: {error}") from error
    return repo_id


def check_push_access(repo_id: str, token: str | None = None) -> str:
    """Before any work: check `repo_id`, that a token is available and has write access, and that the Hub is
    reachable. Returns the full `namespace/name` id (a bare name goes to the token's user, as `create_repo` does)."""
    check_repo_id(repo_id)
    try:
        user = HfApi(token=token).whoami()
    except LocalTokenNotFoundError as error:
        raise HubError(
            f"Cannot push to {repo_id!r}: no Hugging Face token. Log in with `hf auth login`, set HF_TOKEN, or pass a "
            f"token."
        ) from error
    except OfflineModeIsEnabled as error:
        raise HubError(f"Cannot push to {repo_id!r}: offline mode is on (HF_HUB_OFFLINE is set).") from error
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        why = "the token is invalid or expired" if status == 401 else f"the Hub answered {error}"
        raise HubError(f"Cannot push to {repo_id!r}: {why}.") from error
    except Exception as error:  # DNS, connection refused, timeouts, proxies, ...
        raise HubError(
            f"Cannot push to {repo_id!r}: the Hub is unreachable ({type(error).__name__}: {error})."
        ) from error
    role = (user.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubError(f"Cannot push to {repo_id!r}: the token of {user['name']!r} is read-only; use a write token.")
    return repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"


def upload_command(folder: str | Path, repo_id: str, private: bool = False, exclude: Sequence[str] = ()) -> str:
    """The `hf` command that uploads `folder` to `repo_id` (what to run after a failed push)."""
    command = ["hf", "upload", repo_id, str(folder), ".", "--repo-type", "model"]
    command += ["--private"] if private else []
    for pattern in exclude:
        command += ["--exclude", pattern]
    return shlex.join(command)


def upload_failed(
    folder: str | Path, repo_id: str, error: BaseException, private: bool = False, exclude: Sequence[str] = ()
) -> HubError:
    """The error of a failed upload: what went wrong, that `folder` is complete, and how to upload it later."""
    return HubError(
        f"Uploading {folder} to {repo_id!r} failed ({type(error).__name__}: {error}). The local folder {folder} is "
        f"complete; upload it later with: {upload_command(folder, repo_id, private, exclude)}"
    )


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload",
    exclude: Sequence[str] = (),
) -> str:
    """Create the model repository `repo_id` if needed and upload `folder` into it, less the `exclude` glob patterns
    (e.g. training checkpoints); returns the commit URL. Any failure is one `HubError` naming the command that
    uploads the (complete) folder later."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=list(exclude) or None,
        )
    except Exception as error:
        raise upload_failed(folder, repo_id, error, private, exclude) from error
    return str(getattr(commit, "commit_url", commit))


# ------------------------------------------------------------------------------------------- remote code
def remote_code_files() -> list[Path]:
    """The package files a remote-code folder carries: the modules of `AUTO_MAP` and their relative imports."""
    files: list[Path] = []
    for module in sorted({reference.split(".")[0] for reference in AUTO_MAP.values()}):
        path = PACKAGE / f"{module}.py"
        for file in [path, *map(Path, get_relative_import_files(path))]:
            if file not in files:
                files.append(file)
    return sorted(files)


def add_remote_code(folder: str | Path, config, image_processor) -> None:
    """Make `folder` (holding a saved Focal model) loadable with `trust_remote_code=True` without focal_hf: copy the
    model and image-processing code into it and point `auto_map` (in `config.json` and `preprocessor_config.json`) at
    it. `config` and `image_processor` get the `auto_map` too, so later saves keep it."""
    folder = Path(folder)
    for file in remote_code_files():
        shutil.copyfile(file, folder / file.name)
    config.auto_map = dict(AUTO_MAP)
    image_processor.auto_map = {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}
    config.save_pretrained(folder)
    image_processor.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------- cards
def model_card(
    model_id: str,
    summary: str,
    sections: str = "",
    *,
    remote_code: bool = False,
    license: str | None = None,
    datasets: Sequence[str] = (),
    base_model: str | None = None,
    eval_results: Sequence[EvalResult] = (),
) -> ModelCard:
    """A model card for a Focal image classifier, for the Hub: `pipeline_tag: image-classification`,
    `library_name: transformers`, tags, and only the `license`, `datasets`, `base_model` and `eval_results` given
    (nothing invented). `model_id` (the Hub repo id, or the folder name when not pushed) names the model in the usage
    snippets; `summary` and `sections` are Markdown (description; e.g. conversion or training details)."""
    data = ModelCardData(
        pipeline_tag="image-classification",
        library_name="transformers",
        tags=TAGS + (["custom_code"] if remote_code else []),
        license=license,
        datasets=list(datasets) or None,
        base_model=base_model,
        model_name=model_id if eval_results else None,
        eval_results=list(eval_results) or None,
    )
    usage = f"""## Usage

With focal-hf installed (`pip install focal-hf`), which registers the Focal classes with transformers' Auto classes:

```python
import focal_hf  # noqa: F401
from transformers import pipeline

classifier = pipeline("image-classification", model="{model_id}")
classifier("photo.jpg")
```
"""
    if remote_code:
        usage += f"""
Without focal-hf: the model code is in this repository, so transformers runs it with `trust_remote_code=True`
({" and ".join(f"`{requirement}`" for requirement in REQUIREMENTS)}; an older release is named when the code is loaded):

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{model_id}", trust_remote_code=True)
classifier("photo.jpg")
```
"""
    body = f"# {model_id.split('/')[-1]}\n\n{summary.strip()}\n\n{usage}\n{sections.strip()}\n\n"
    body += f"## Citation\n\n```bibtex\n{CITATION}\n```\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


__all__ = [
    "AUTO_MAP",
    "HubError",
    "add_remote_code",
    "check_push_access",
    "check_repo_id",
    "model_card",
    "push_folder",
    "remote_code_files",
    "upload_command",
    "upload_failed",
]
