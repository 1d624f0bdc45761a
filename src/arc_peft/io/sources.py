"""Where an adapter file comes from: a path, a folder laid out as a Hub repo, or
``"hf-hub:user/repo[@revision]"``. ``huggingface_hub`` is an optional extra
(``pip install "arc-peft[hub]"``), imported only when a Hub repo is named; nothing here imports
torch.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "HUB_PREFIX",
    "hub_client",
    "resolve",
    "split_source",
]

HUB_PREFIX = "hf-hub:"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def hub_client() -> Any:
    """The ``huggingface_hub`` module (an optional extra), or an ImportError naming the fix."""
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            "loading from or pushing to the Hugging Face Hub needs huggingface_hub: "
            'pip install "arc-peft[hub]"'
        ) from None
    return huggingface_hub


def split_source(source: str) -> tuple[str, str | None]:
    """``"hf-hub:user/repo@rev"`` -> ``("user/repo", "rev")``."""
    repo = source[len(HUB_PREFIX) :]
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(
            f"{source!r} is not a Hub source: expected 'hf-hub:user/repo' (optionally '@revision')"
        )
    return repo, revision or None


def resolve(source: str | os.PathLike[str]) -> str:
    """The local adapter file for ``source``: a file path (returned as is), a folder holding
    ``adapter.safetensors`` (a Hub repo's layout), or ``"hf-hub:user/repo[@revision]"``
    (downloaded to, or found offline in, huggingface_hub's cache)."""
    path = os.fspath(source)
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        repo, revision = split_source(path)
        return hub_client().hf_hub_download(repo, ADAPTER_FILE, revision=revision)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_FILE)):
        return os.path.join(path, ADAPTER_FILE)
    return path  # a directory without one is refused by the reader, naming it
