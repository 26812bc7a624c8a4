"""``--model owner/name``: resolved by huggingface_hub from a cache laid out as it lays it out
(blobs, symlinked snapshots, refs/main), built in tmp_path; no socket may connect meanwhile."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants

from server.errors import ModelLoadError
from server.hf_cache import is_hub_id, snapshot_dir
from server.loader import load


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub reads the cache directory from the environment at import: patch its constant.
    Any attempt to reach the network fails the test."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args: object) -> None:
        raise AssertionError(f"hub id resolution tried the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return tmp_path / "hub"


def cache_model(hub: Path, hub_id: str, model_dir: Path, commit: str = "0123abcd" * 5) -> Path:
    """Move ``model_dir``'s files into the cache as content-named blobs; the snapshot links to them."""
    repo = hub / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_id_loads_from_the_cache(hub, tmp_path):
    pytest.importorskip("transformers")
    from tests.unit.test_parity import checkpoint

    checkpoint(tmp_path / "download", "ernie", tie=True)
    snapshot = cache_model(hub, "acme/tiny-ernie", tmp_path / "download")
    loaded = load("acme/tiny-ernie", "float32", "cpu")
    assert (loaded.name, loaded.path, loaded.config.architecture) == ("acme/tiny-ernie", snapshot,
                                                                      "Ernie4_5ForCausalLM")


def test_a_hub_id_not_in_the_cache_is_one_line_naming_where_it_looked(hub):
    repo = hub / "models--baidu--ERNIE-4.5-0.3B-Paddle"
    expected = (f"model 'baidu/ERNIE-4.5-0.3B-Paddle' is not in the Hugging Face cache (looked in {repo}); "
                f"download it with `hf download baidu/ERNIE-4.5-0.3B-Paddle` or pass a directory")
    with pytest.raises(ModelLoadError) as error:
        load("baidu/ERNIE-4.5-0.3B-Paddle")
    assert str(error.value) == expected
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("feedbeef")  # a ref whose snapshot was deleted
    with pytest.raises(ModelLoadError) as error:
        snapshot_dir("baidu/ERNIE-4.5-0.3B-Paddle")
    assert str(error.value) == expected


def test_an_existing_directory_wins_over_a_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "model").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="acme/model: missing config.json"):
        load("acme/model")


def test_a_snapshot_known_to_miss_files_is_one_line(hub, tmp_path):
    """huggingface_hub 1.22+ caches the file list of a download and refuses a snapshot missing some."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "config.json").write_text("{}")
    snapshot = cache_model(hub, "acme/half", tmp_path / "download", commit="feedbeef" * 5)
    entry = tree_cache.TreeCacheEntry(size=2, blob_id="0" * 40, lfs_sha256=None, lfs_size=None, xet_hash=None)
    tree_cache.write_tree_cache(str(snapshot.parent.parent), "feedbeef" * 5,
                                {"config.json": entry, "model.safetensors": entry})
    with pytest.raises(ModelLoadError) as error:
        snapshot_dir("acme/half")
    assert str(error.value) == (f"model 'acme/half' is only partly in the Hugging Face cache ({snapshot} misses "
                                f"files); finish it with `hf download acme/half` or pass a directory")


@pytest.mark.parametrize("source, expected", [
    ("baidu/ERNIE-4.5-0.3B-Paddle", True), ("meta-llama/Llama-3.2-1B", True), ("Qwen/Qwen2.5-0.5B", True),
    ("tiny", False), ("/models/llama", False), ("a/b/c", False), ("./model", False), ("../model", False),
    ("owner/..", False), ("owner/", False), ("own er/name", False), ("owner/na--me", False),
    ("owner/name.git", False), ("-owner/name", False), ("owner/" + "n" * 97, False),
])
def test_what_counts_as_a_hub_id(source, expected):
    assert is_hub_id(source) == expected
