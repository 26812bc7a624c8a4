"""Hugging Face hub ids (``owner/name``) resolved from the local Hugging Face cache; never the network.

Theory of operation: huggingface_hub resolves the id itself, with
``snapshot_download(hub_id, local_files_only=True)``. Offline, that reads ``refs/main`` of
``models--{owner}--{name}/`` in the cache directory and returns ``snapshots/<commit>/`` if it is
there; it makes no request (whatever ``HF_HUB_OFFLINE`` says) and logs nothing. A missing repo, a
ref whose snapshot was deleted, or (huggingface_hub 1.22+, when the download cached its file
list) a snapshot known to miss files, is its ``LocalEntryNotFoundError``, which we translate to
one ``ModelLoadError`` line naming the fix: the operator downloads with ``hf download``, since
nodes start without network.

The cache directory is ``huggingface_hub.constants.HF_HUB_CACHE``, which huggingface_hub derives
from the environment when it is imported ($HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub,
$XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub): a process reads its environment at
start, so tests patch the constant rather than the environment. We read it at each call and pass
it on, so the directory named in the error is the one searched.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # in a computed __all__

from .errors import ModelLoadError


def is_hub_id(source: str) -> bool:
    """``owner/name``, each part as the hub allows it (huggingface_hub's ``validate_repo_id``).

    A bare ``name`` is a valid hub id too, but here it names a preset or a directory."""
    if source.count("/") != 1:
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def snapshot_dir(hub_id: str) -> Path:
    """The cached snapshot of ``hub_id``'s main branch, or a ``ModelLoadError`` naming where it looked."""
    cache_dir = Path(constants.HF_HUB_CACHE).expanduser()
    try:
        return Path(snapshot_download(hub_id, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError as error:
        # IncompleteSnapshotError (huggingface_hub 1.22+) carries the partial snapshot's path
        partial = getattr(error, "snapshot_path", None)
        if partial is not None:
            raise ModelLoadError(f"model {hub_id!r} is only partly in the Hugging Face cache ({partial} misses "
                                 f"files); finish it with `hf download {hub_id}` or pass a directory") from None
        repo = cache_dir / repo_folder_name(repo_id=hub_id, repo_type="model")
        raise ModelLoadError(f"model {hub_id!r} is not in the Hugging Face cache (looked in {repo}); download it "
                             f"with `hf download {hub_id}` or pass a directory") from None
