"""Which weights rendered a row: a fingerprint of the checkpoint a replica loaded, recorded on every row it commits.

A hub checkpoint is named by its snapshot's commit (`hub:ORG/NAME@COMMIT`, what `model.revision` pins); a local
directory, a tiny preset or a copied object-store checkpoint by the SHA-256 of its files (`sha256:…`: every file's
path relative to the checkpoint, size and content, in path order). Hashing reads the checkpoint once per replica
load (about a second per GB); the replica keeps the digest.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 8 << 20


def directory_digest(root: str) -> str:
    """SHA-256 over every file under `root`: relative path, size and content, in path order."""
    digest = hashlib.sha256()
    files = sorted(os.path.relpath(os.path.join(folder, name), root)
                   for folder, _, names in os.walk(root) for name in names)
    for rel in files:
        full = os.path.join(root, rel)
        digest.update(f"{rel}\0{os.path.getsize(full)}\0".encode("utf-8", "surrogatepass"))
        with open(full, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit of the hub snapshot in the local Hugging Face cache, or None if it is not there."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=["model_index.json"])
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): nothing to name
        return None
    return os.path.basename(os.path.normpath(local))


def weights_fingerprint(model_path: str, storage_options: dict | None = None) -> str | None:
    """The fingerprint of the weights `model_path` loads (see the module's docstring); None for a stand-in."""
    from pipelines.kinds import SIMULATED
    from pipelines.resolve import preset, resolve_model, split_revision

    if model_path.startswith(SIMULATED):
        return None
    if preset(model_path) is None and "://" not in model_path and not os.path.isdir(model_path):
        repo, revision = split_revision(model_path)  # a hub id: its snapshot's commit names it
        commit = _hub_commit(repo, revision)
        return None if commit is None else f"hub:{repo}@{commit}"
    return f"sha256:{directory_digest(resolve_model(model_path, storage_options))}"
