"""Models and datasets named by their Hugging Face hub id, read through the Hugging Face cache.

A model name that is not a local folder but has the shape of a hub id (``owner/name``), or a data spec's
``hub: owner/name``, is fetched with ``huggingface_hub.snapshot_download`` into the usual cache (``HF_HOME`` /
``HF_HUB_CACHE``), or read from it when it is there already; with ``HF_HUB_OFFLINE=1`` only the cache is read.
Nothing is fetched for a name the user did not give: an export whose recorded base folder is gone asks for
``--base`` instead (see :func:`vlmtune.export.base_of`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""``owner/name`` as the hub spells repository ids (one slash, no leading dot or dash)."""

# The files a checkpoint folder needs: config, weights, tokenizer and processor files, chat templates, and the
# remote code a released MiniCPM-V 2.6 folder names (copied beside a merged checkpoint, never run by vlmtune).
# PyTorch .bin / .pth copies of the weights are left out.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
# A dataset repository's data files, as the hub's own parquet conversion and most uploads lay them out.
DATASET_FILES = ["*.parquet", "*.jsonl", "*.json", "*.csv"]


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repository id."""
    return HUB_ID.fullmatch(name) is not None


def hub_snapshot(repo_id: str, repo_type: str = "model") -> Path:
    """The local folder of ``repo_id`` (a model, or a ``"dataset"``), downloaded into the Hugging Face cache if it
    is not there yet.

    Raises:
        FileNotFoundError: the model is not on the hub (or is gated for this user), or it is not in the cache
            while offline; the message says which and what to do.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        patterns = DATASET_FILES if repo_type == "dataset" else CHECKPOINT_FILES
        folder = Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and the hub cannot be reached"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and not in the Hugging Face cache {constants.HF_HUB_CACHE}{offline}; "
            "download it once online, or give the checkpoint's local folder"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a {repo_type} on the Hugging Face hub you can read "
            "(a gated model needs `hf auth login` after accepting its licence)"
        ) from err
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"{repo_id!r} could not be fetched from the Hugging Face hub: {err}") from err
    logger.info("%s is %s", repo_id, folder)
    return folder
