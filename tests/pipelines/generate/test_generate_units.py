"""Fast checks of the generate stage's parts: templates, config, plan, ids, input listing, quality gate."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.generate.config import GenerateConfig, GenerateTesting
from pipelines.generate.pipeline import (
    atomic_write_bytes,
    derive_seed,
    list_input_files,
    make_plan,
    row_hash,
    url_to_fs,
)
from pipelines.generate.templates import TemplateError, fields, render, resolve_template

REQ = dict(checkpoint="c", input="i", output="o")


# ---- templates ------------------------------------------------------------------------------


def test_task_default_templates_pick_the_column_the_input_has():
    assert resolve_template("summarize", None, ["id", "article"]) == "{article}\n\nTL;DR:"
    assert resolve_template("summarize", None, ["id", "text"]) == "{text}\n\nTL;DR:"
    assert resolve_template("article", None, ["id", "title"]) == "Title: {title}\n\n"
    assert resolve_template("complete", None, ["prompt"]) == "{prompt}"
    with pytest.raises(TemplateError, match="needs an input column"):
        resolve_template("article", None, ["id", "body"])


def test_explicit_template_is_checked_against_columns_and_rendered():
    tpl = "Headline: {title}\nBody: {article}\nSummary:"
    assert fields(tpl) == ["title", "article"]
    assert resolve_template("summarize", tpl, ["title", "article"]) == tpl
    with pytest.raises(TemplateError, match=r"\['title'\]"):
        resolve_template("summarize", tpl, ["article"])
    assert render(tpl, {"title": "T", "article": "abcdefgh"}, max_field_chars=3) == "Headline: T\nBody: abc\nSummary:"
    assert render("{a}|{b}", {"a": None, "b": 1}) == "|1"
    for bad in ("{0}", "{a.b}", "{a!r}", "{a:>5}", "{"):
        with pytest.raises(TemplateError):
            fields(bad)


# ---- config ---------------------------------------------------------------------------------


def test_config_validation_names_field_value_and_fix():
    with pytest.raises(ConfigError) as e:
        GenerateConfig(checkpoint="", input="i", output="o", chunk_rows=0, task="poem", num_gpus=-1)
    msg = str(e.value)
    for part in ("checkpoint is required", "chunk_rows must be an integer >= 1, got 0", "task must be one of",
                 "num_gpus must be >= 0"):
        assert part in msg
    with pytest.raises(ConfigError, match="temperature"):
        GenerateConfig(**REQ, sampling={"temperature": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        GenerateConfig(**REQ, sampling={"temprature": 1})
    with pytest.raises(ConfigError, match="template"):
        GenerateConfig(**REQ, template="{0}")


@pytest.mark.parametrize("name", ["generate-summarize", "generate-article", "generate-complete"])
def test_shipped_configs_load(name):
    cfg = load_config(GenerateConfig, f"jobs/configs/{name}.yaml", [f"{k}={v}" for k, v in REQ.items()])
    assert cfg.sampling["max_new_tokens"] > 0


def test_cli_maps_bare_sampling_keys_and_flags_beat_the_file(tmp_path):
    import argparse

    from pipelines.generate.cli import build_config

    yml = tmp_path / "g.yaml"
    yml.write_text("task: complete\nbatch_size: 4\nsampling: {max_new_tokens: 5}\n")
    ns = argparse.Namespace(checkpoint="ck", input="in.jsonl", output="out", task="summarize", config=str(yml),
                            overrides=["temperature=0.5", "n=2", "concurrency=3", "sampling.top_k=7"])
    cfg = build_config(ns)
    assert cfg.task == "summarize" and cfg.batch_size == 4 and cfg.concurrency == 3
    assert cfg.sampling == {"max_new_tokens": 5, "temperature": 0.5, "n": 2, "top_k": 7}


def test_generation_key_ignores_runtime_settings():
    a = GenerateConfig(**REQ, concurrency=1, batch_size=8)
    b = GenerateConfig(**{**REQ, "output": "elsewhere"}, concurrency=4, batch_size=32,
                       testing=GenerateTesting(debug_delay_s=1.0))
    c = GenerateConfig(**REQ, sampling={"temperature": 0.5})
    assert a.generation_key() == b.generation_key() != c.generation_key()


# ---- plan / ids -----------------------------------------------------------------------------


def test_plan_is_deterministic_whatever_the_row_order():
    ids = [f"id{i:03d}" for i in range(25)]
    hashes = [row_hash({"id": i}) for i in ids]
    ns = [1] * 20 + [3] * 5
    p1 = make_plan(ids, hashes, ns, chunk_rows=10)
    order = list(range(25))
    random.Random(0).shuffle(order)
    p2 = make_plan([ids[i] for i in order], [hashes[i] for i in order], [ns[i] for i in order], chunk_rows=10)
    assert p1["chunks"] == p2["chunks"]
    assert [c["ids"] for c in p1["chunks"]] == [10, 10, 5]
    assert p1["chunks"][2]["rows"] == 15  # n=3 for the last five ids
    assert [c["name"][:10] for c in p1["chunks"]] == ["part-00000", "part-00001", "part-00002"]
    # the name carries a digest of the ids: another id set gives another name
    p3 = make_plan(ids[:-1] + ["zzz"], hashes, ns, chunk_rows=10)
    assert p3["chunks"][0]["name"] == p1["chunks"][0]["name"] and p3["chunks"][2]["name"] != p1["chunks"][2]["name"]


def test_plan_keeps_one_row_per_duplicated_id_and_applies_limit():
    p = make_plan(["b", "a", "b", "c"], ["h9", "h1", "h2", "h3"], [1, 1, 2, 1], chunk_rows=2)
    assert p["ids"] == 3 and p["duplicate_rows"] == 1
    assert p["keep_hash"] == {"b": "h2"}  # smallest row hash wins, whichever came first
    assert p["chunks"][0]["rows"] == 3  # a (n=1) + b (its kept row has n=2)
    lim = make_plan(["b", "a", "c"], ["1", "2", "3"], [1, 1, 1], chunk_rows=2, limit=2)
    assert lim["ids"] == 2 and lim["last_id"] == "b"


def test_row_ids_and_seeds_are_stable():
    assert row_hash({"a": 1, "b": "x"}) == row_hash({"b": "x", "a": 1}) != row_hash({"a": 2, "b": "x"})
    assert derive_seed(0, "doc-1") == derive_seed(0, "doc-1") != derive_seed(1, "doc-1")
    assert 0 <= derive_seed(5, "x") < 2 ** 31


# ---- storage --------------------------------------------------------------------------------


def test_input_listing_by_format(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "a" / "_SUCCESS").write_text("")
    (tmp_path / "a" / ".hidden.jsonl").write_text("")
    _, files, fmt = list_input_files(str(tmp_path / "a"))
    assert fmt == "jsonl" and [os.path.basename(f) for f in files] == ["x.jsonl"]
    pq.write_table(pa.table({"id": [1]}), tmp_path / "a" / "y.parquet")
    with pytest.raises(ConfigError, match="mixes formats"):
        list_input_files(str(tmp_path / "a"))
    _, files, fmt = list_input_files(f"file://{tmp_path}/a/*.parquet")
    assert fmt == "parquet" and len(files) == 1
    (tmp_path / "c.csv").write_text("id,text\n1,hi\n")
    assert list_input_files(str(tmp_path / "c.csv"))[2] == "csv"
    with pytest.raises(ConfigError, match="does not exist"):
        list_input_files(str(tmp_path / "nope"))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    fs, root = url_to_fs(str(tmp_path))
    target = f"{root}/d/f.bin"
    atomic_write_bytes(fs, target, b"one")
    atomic_write_bytes(fs, target, b"two")
    assert open(target, "rb").read() == b"two"
    assert os.listdir(tmp_path / "d") == ["f.bin"]


# ---- quality gate ---------------------------------------------------------------------------


def test_quality_gate_flags_empty_and_repetitive_text():
    from pipelines.generate.predictor import quality_reasons

    fine = "The council approved the budget for the new library after a long debate on Monday evening."
    r = quality_reasons([None, "", "   ", fine, "the cat " * 30, "ok ok"])
    assert r[0] is None and r[1] == r[2] == "empty" and r[3] is None
    assert r[4].startswith("repetition:") and r[5] is None  # too short to judge


# ---- prepare_batch (needs the tokenizer of a real checkpoint) ---------------------------------


def test_prepare_batch_builds_prompts_params_and_error_rows(tiny_checkpoint):
    from pipelines.generate.pipeline import prepare_batch

    rows = [
        {"id": "a", "article": "the team won the cup", "temperature": 0.5, "n": 2},
        {"id": "b", "article": "the council said", "temperature": -3.0, "n": None},
        {"id": None, "article": "police are asking " * 40, "temperature": None, "n": None},  # too long; hashed id
    ]
    out = prepare_batch(pa.Table.from_pylist(rows), ckpt_dir=str(tiny_checkpoint), id_column="id",
                        template="{article} TL;DR:", max_field_chars=0, param_columns=["temperature", "n"],
                        sampling={"max_new_tokens": 4}, seed=7, block_size=64).to_pylist()
    a, b, c = out
    assert a["_id"] == "a" and a["prompt"] == "the team won the cup TL;DR:" and a["_error"] is None
    pa_ = json.loads(a["_params"])
    assert pa_["temperature"] == 0.5 and pa_["n"] == 2 and pa_["max_new_tokens"] == 4
    assert a["_n"] == 2 and a["_seed"] == derive_seed(7, "a") == pa_["seed"] and a["_plen"] == len(a["_prompt_ids"])
    # SamplingParams is validated by the actor (torch is loaded there): here the row passes through
    assert b["_error"] is None and json.loads(b["_params"])["temperature"] == -3.0 and b["_n"] == 1
    assert c["_id"] == c["_hash"] and "prompt too long" in c["_error"] and "block_size=64" in c["_error"]
