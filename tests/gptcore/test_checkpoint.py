"""The checkpoint directory: round trip, checksums, clear errors, atomic writes, and no unpickling ever.

    .venv/bin/python -m pytest tests/gptcore/test_checkpoint.py -q
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from gptcore import checkpoint as ck
from gptcore.checkpoint import CheckpointError, checkpoint_id, load_checkpoint, save_checkpoint
from gptcore.config import GPTConfig
from gptcore.model import GPT

REPO = Path(__file__).resolve().parents[2]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak! 1234 ?;-'&$\n"


@pytest.fixture(scope="module")
def tok():
    from gptcore.tokenizer import train_char

    return train_char(iter([TEXT]), special_tokens=("<|endoftext|>",))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tok.vocab_size)).eval()


@pytest.fixture
def saved(tmp_path, model, tok) -> Path:
    meta = {"step": 7, "tokens_seen": 7 * 512, "parents": {"data_manifest_id": "d" * 64, "train_config_hash": "c1"}}
    return save_checkpoint(tmp_path / "ckpt", model, tok, meta)


def _rewrite_checksums(path: Path) -> None:
    """Make checksums.json consistent again after an edit (what a careless or hostile editor would do)."""
    files = {n: {"sha256": hashlib.sha256((path / n).read_bytes()).hexdigest(), "bytes": (path / n).stat().st_size}
             for n in ck.CHECKED_FILES}
    (path / ck.CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files}))


def test_round_trip_preserves_logits_meta_and_tying(saved, model, tok):
    ckpt = load_checkpoint(saved)
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(ckpt.model(x)[0], model(x)[0])
    assert ckpt.model.lm_head.weight is ckpt.model.transformer.wte.weight
    assert not ckpt.model.training
    assert ckpt.config == model.config
    assert ckpt.tokenizer.vocab_size == tok.vocab_size and ckpt.tokenizer.encode("speak") == tok.encode("speak")
    assert ckpt.meta["step"] == 7 and ckpt.meta["tokens_seen"] == 3584
    assert ckpt.meta["parents"]["data_manifest_id"] == "d" * 64
    assert ckpt.meta["code_version"] and ckpt.meta["created_at"]
    assert ckpt.meta["tokenizer_id"] == tok.id
    assert json.loads((saved / "config.json").read_text())["format"] == "raygpt-checkpoint/1"
    assert sorted(p.name for p in saved.iterdir()) == sorted(ck.CHECKED_FILES + (ck.CHECKSUMS_FILE,))

    # the tied embedding is stored once, and the header says so
    from safetensors import safe_open

    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
        assert f.metadata()["tied"] == "lm_head.weight=transformer.wte.weight"

    # id = content hash: stable, independent of where the directory lives
    assert ckpt.id == checkpoint_id(saved) == hashlib.sha256((saved / "checksums.json").read_bytes()).hexdigest()
    moved = saved.parent / "elsewhere"
    os.rename(saved, moved)
    assert checkpoint_id(moved) == ckpt.id


def test_dtype_and_state_dict_saving(tmp_path, model, tok):
    p = save_checkpoint(tmp_path / "bf16", model.state_dict(), tok, {}, config=model.config, dtype=torch.bfloat16)
    c = load_checkpoint(p)
    assert c.model.lm_head.weight.dtype == torch.bfloat16  # default: as stored
    assert load_checkpoint(p, dtype=torch.float32).model.lm_head.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="config="):
        save_checkpoint(tmp_path / "x", model.state_dict(), tok, {})


@pytest.mark.parametrize("name", ck.CHECKED_FILES + (ck.CHECKSUMS_FILE,))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_altered_byte_is_detected(saved, name, where):
    f = saved / name
    data = bytearray(f.read_bytes())
    i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[i] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved)
    if name != ck.CHECKSUMS_FILE:  # a damaged checksums.json makes some other file look altered
        assert name in str(e.value) and "altered" in str(e.value)


@pytest.mark.parametrize("name", ck.CHECKED_FILES + (ck.CHECKSUMS_FILE,))
def test_truncated_or_missing_file_is_detected(saved, name):
    f = saved / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved)
    assert name in str(e.value)
    if name != ck.CHECKSUMS_FILE:
        assert "truncated" in str(e.value)
    f.unlink()
    with pytest.raises(CheckpointError, match=f"{name}.* missing|missing.*{name}|{name} is missing"):
        load_checkpoint(saved)


def test_tokenizer_vocab_mismatch_is_refused(saved, tmp_path, model):
    from gptcore.tokenizer import train_char

    other = train_char(iter(["abc"]), special_tokens=())
    (saved / "tokenizer.json").write_text(other.to_json_str())
    _rewrite_checksums(saved)  # consistent checksums: only the vocab check can catch it
    with pytest.raises(CheckpointError, match=rf"vocab_size 3 .*vocab_size {model.config.vocab_size}"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="vocab_size"):
        save_checkpoint(tmp_path / "bad", model, other, {})
    assert not (tmp_path / "bad").exists()


def test_unknown_format_non_directory_and_missing_path(saved, tmp_path):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["format"] = "raygpt-checkpoint/99"
    (saved / "config.json").write_text(json.dumps(cfg))
    _rewrite_checksums(saved)
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'raygpt-checkpoint/99'"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (saved / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete raygpt checkpoint"):
        load_checkpoint(saved)


class _Booby:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_booby_trapped_pickle_never_runs(saved, tmp_path):
    # the trap works: unpickling it does create the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Booby(str(probe)))).close()
    assert probe.exists()

    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"transformer.wte.weight": _Booby(str(marker))})
    for name in ("model.safetensors", "model.pt", "pytorch_model.bin"):
        (saved / name).write_bytes(payload)
    torch.save({"x": _Booby(str(marker))}, saved / "model.ckpt")  # zip-pickle flavour, too
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(saved)  # caught by the checksum
    _rewrite_checksums(saved)  # even with consistent checksums, weights are only ever parsed as safetensors
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(saved)
    assert not marker.exists()


def test_no_unpickling_loader_in_sources():
    """No torch.load / pickle.load in gptcore; elsewhere torch.load only with weights_only=True."""
    bad = []
    for root in ("gptcore", "pipelines", "jobs"):
        for f in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)):
                    continue
                call = f"{node.func.value.id}.{node.func.attr}"
                safe_kw = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                              for k in node.keywords)
                if call in ("pickle.load", "pickle.loads", "cloudpickle.loads") and root == "gptcore":
                    bad.append(f"{f.relative_to(REPO)}:{node.lineno} {call}")
                if call == "torch.load" and (root == "gptcore" or not safe_kw):
                    bad.append(f"{f.relative_to(REPO)}:{node.lineno} {call}")
    assert not bad, bad


def test_atomic_write_crash_leaves_nothing(tmp_path, model, tok, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", model, tok, {})
    assert list(tmp_path.iterdir()) == []  # no target, no temp directory

    # an existing checkpoint survives a crashed overwrite, and is only replaced when asked
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    first = save_checkpoint(tmp_path / "ckpt", model, tok, {"step": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(first, model, tok, {"step": 2})
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(first, model, tok, {"step": 2}, overwrite=True)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert load_checkpoint(first).meta["step"] == 1
    save_checkpoint(first, model, tok, {"step": 3}, overwrite=True)
    assert load_checkpoint(first).meta["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
