"""The main job end to end on the embedded default corpus, shrunk to seconds of training.

    pytest tests/test_demo.py -q
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.demo import DemoConfig, run


def test_demo_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="pretrain_steps"):
        load_config(DemoConfig, None, ["pretrain_steps=0"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(DemoConfig, None, ["pretrain_step=5"])
    with pytest.raises(ConfigError, match=r"torch_threads: must be >= 0 .* got -1"):
        load_config(DemoConfig, None, ["torch_threads=-1"])
    with pytest.raises(ConfigError, match=r"num_beams: must be >= 1, got 0"):
        load_config(DemoConfig, None, ["num_beams=0"])
    with pytest.raises(ConfigError, match=r"copy_bias: must be a finite number"):
        load_config(DemoConfig, None, ["copy_bias=.inf"])
    cfg = load_config(DemoConfig, None, ["num_beams=1", "copy_bias=0"])  # plain greedy summaries
    assert (cfg.num_beams, cfg.copy_bias) == (1, 0)


@pytest.mark.slow
def test_demo_end_to_end(ray_session, tmp_path):
    # Serve tests of this session may have left Serve running on another port; the demo starts its own
    from ray import serve

    serve.shutdown()
    cfg = DemoConfig(out=str(tmp_path / "demo"), vocab_size=512, block_size=64, preset="debug",
                     pretrain_steps=6, sft_steps=4, micro_batch_size=4, generate_limit=4, articles=1,
                     article_samples=3, max_new_tokens=8, serve=True)
    info = run(cfg)
    out = Path(cfg.out)
    # every stage left its artefact, and the readers accept them
    from gptcore.checkpoint import load_checkpoint
    from pipelines.data.manifest import load_manifest

    assert load_manifest(out / "data/pretrain")["splits"]["train"]["tokens"] > 0
    assert load_manifest(out / "data/sft")["kind"] == "sft"
    ck = load_checkpoint(info["sft"]["last_checkpoint"])
    assert ck.config.block_size == 64
    # one worker trains on every core of the machine (torch_threads 0 = cores / workers), not Ray's 1 CPU
    import os

    tc = json.loads((out / "train/pretrain/config.json").read_text())["config"]
    assert tc["torch_threads"] == len(os.sched_getaffinity(0)), tc.get("torch_threads")
    assert json.loads((out / "generate/summaries/manifest.json").read_text())
    # ROUGE of the model and of the lead baseline on the same held-out ids
    systems = info["rouge"]["systems"]
    # ... and of the model before fine-tuning, so the report shows what SFT added
    assert set(systems) == {"raygpt (pretrained only)", "raygpt (SFT)", "lead-1"} and info["rouge"]["n"] == 4
    # articles: the most likely of `article_samples` samples per title, by the model's own likelihood
    best = info["best_articles"]
    assert len(best) == 1 and all(b["n"] == cfg.article_samples and b["mean_logprob"] < 0 for b in best.values())
    # where the time went: every stage, training split into start-up / steps / the rest
    t = info["timings"]
    assert {"corpus", "pretrain: optimizer steps", "sft: optimizer steps", "batch generation (Ray Data)"} <= set(t)
    assert all(v >= 0 for v in t.values())
    # the endpoint answered through the official client
    assert info["serve"]["usage"]["prompt_tokens"] > 0
    report = (out / "report/report.md").read_text()
    for needle in ("## Data", "## Training", "## Where the time went", "ROUGE", "raygpt (pretrained only)",
                   "most likely of 3 samples", "## Serve", "## Artefacts"):
        assert needle in report
    for png in ("loss_pretrain.png", "rouge.png", "data_drops.png", "time.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a re-run reuses the finished stages instead of retraining (the endpoint, no stage with outputs and
    # checked above, is not started a second time)
    info2 = run(dataclasses.replace(cfg, serve=False))
    assert info2["pretrain"]["last_checkpoint"] == info["pretrain"]["last_checkpoint"]
