"""The token-dataset manifest: written last, checked by every reader.

    from pipelines.data.manifest import load_manifest
    m = load_manifest("runs/data/shakespeare")   # DatasetNotReadyError if unfinished

A dataset directory is complete only when `manifest.json` exists; writers produce it last, through
an atomic rename, so a crash mid-run can never leave a manifest next to partial shards.
Does not: read or write token rows (pipelines.data.write does).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import fsspec

from pipelines.errors import UserError

FORMAT = "raygpt-tokens/1"
MANIFEST = "manifest.json"


class DatasetNotReadyError(UserError, RuntimeError):
    """The directory is not a finished raygpt token dataset."""


def _fs_path(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, _, paths = fsspec.get_fs_token_paths(str(uri))
    return fs, paths[0]


from pipelines.runtime import atomic_write_bytes, sha256_file  # noqa: E402 - sha256_file re-exported


def manifest_id(manifest: dict[str, Any]) -> str:
    """Content id: hash of the shard checksums, tokenizer and shape (timings excluded)."""
    core = {
        "format": manifest.get("format"),
        "kind": manifest.get("kind"),
        "tokenizer_id": manifest.get("tokenizer_id"),
        "block_size": manifest.get("block_size"),
        "shards": {s: [sh["sha256"] for sh in v.get("shards", [])] for s, v in manifest.get("splits", {}).items()},
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Write manifest.json atomically (temp file + rename) as the LAST file of a dataset."""
    fs, root = _fs_path(out_dir)
    manifest = {"format": FORMAT, **manifest}
    manifest["id"] = manifest_id(manifest)
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    final = f"{root.rstrip('/')}/{MANIFEST}"
    atomic_write_bytes(final, data, fs)  # a dot-prefixed temp beside it, then a rename: readers see all or nothing
    return final


def load_manifest(out_dir: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """Read a finished dataset's manifest; refuse unfinished or foreign directories.

    verify=True also re-hashes every shard (slow for big data; training checks sizes instead).
    """
    fs, root = _fs_path(out_dir)
    path = f"{root.rstrip('/')}/{MANIFEST}"
    if not fs.exists(root):
        raise DatasetNotReadyError(f"dataset directory {str(out_dir)!r} does not exist; run `raygpt prep` to create it")
    if not fs.exists(path):
        raise DatasetNotReadyError(
            f"dataset {str(out_dir)!r} has no {MANIFEST}: it is unfinished (a prep run was interrupted or is "
            f"still running). Re-run `raygpt prep` with the same config to complete it.")
    try:
        with fs.open(path, "rb") as f:
            m = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetNotReadyError(f"{path} is not valid JSON ({e}); re-run `raygpt prep --overwrite`") from None
    if m.get("format") != FORMAT:
        raise DatasetNotReadyError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}")
    for info in m.get("splits", {}).values():
        for sh in info.get("shards", []):
            p = f"{root.rstrip('/')}/{sh['path']}"
            if not fs.exists(p):
                raise DatasetNotReadyError(f"dataset {str(out_dir)!r}: shard {sh['path']} listed in the manifest is missing")
            if fs.size(p) != sh["bytes"]:
                raise DatasetNotReadyError(
                    f"dataset {str(out_dir)!r}: shard {sh['path']} has {fs.size(p)} bytes, manifest says {sh['bytes']}")
            if verify and sha256_file(p, fs) != sh["sha256"]:
                raise DatasetNotReadyError(f"dataset {str(out_dir)!r}: shard {sh['path']} fails its sha256 check")
    m["root"] = str(out_dir)
    return m


def shard_paths(manifest: dict[str, Any], split: str) -> list[str]:
    root = str(manifest["root"]).rstrip("/")
    if split not in manifest.get("splits", {}):
        raise DatasetNotReadyError(
            f"dataset {root!r} has no split {split!r}; it has {sorted(manifest.get('splits', {}))}")
    return [f"{root}/{sh['path']}" for sh in manifest["splits"][split]["shards"]]
