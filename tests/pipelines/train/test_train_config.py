"""TrainConfig validation, the generated DeepSpeed config and the LR schedule: all before any worker starts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from train_testlib import base_config

from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from pipelines.train.config import TrainConfig
from pipelines.train.deepspeed import ds_config, lr_at

REPO = Path(__file__).resolve().parents[3]


def _cfg(**kw) -> TrainConfig:
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in kw.items()], base={"data": "d"})


def test_batch_not_divisible_names_key_constraint_value():
    with pytest.raises(ConfigError) as e:
        _cfg(**{"batch.micro_batch_size": 4, "num_workers": 2, "batch.global_batch_size": 10})
    msg = str(e.value)
    assert "batch.global_batch_size" in msg and "10" in msg and "multiple" in msg and "= 8" in msg


def test_global_batch_derives_grad_accum_and_contradiction_is_refused():
    c = _cfg(**{"batch.micro_batch_size": 4, "num_workers": 2, "batch.global_batch_size": 24})
    assert c.grad_accum == 3 and c.global_batch_size == 24
    with pytest.raises(ConfigError, match=r"global_batch_size \(24\) != .*grad_accum"):
        _cfg(**{"batch.micro_batch_size": 4, "num_workers": 2, "batch.global_batch_size": 24,
                "batch.grad_accum": 2})


def test_n_embd_not_divisible_by_n_head():
    with pytest.raises(ConfigError) as e:
        _cfg(**{"model.n_embd": 30, "model.n_head": 4})
    msg = str(e.value)
    assert "n_embd" in msg and "n_head" in msg and "30" in msg and "4" in msg


@pytest.mark.parametrize("key, named", [("optimm.lr", "'optimm'"), ("optim.lrr", "'optim.lrr'"), ("zero", "'zero'"),
                                        ("batch.size", "'batch.size'")])
def test_unknown_key_is_refused_with_the_valid_ones(key, named):
    with pytest.raises(ConfigError) as e:
        _cfg(**{key: 1})
    assert "unknown config key" in str(e.value) and named in str(e.value) and "valid keys" in str(e.value)


@pytest.mark.parametrize("kw, words", [
    ({"zero_stage": 4}, ["zero_stage", "4"]),
    ({"offload_params": "true", "zero_stage": 2}, ["offload_params", "zero_stage=3"]),
    ({"offload_optimizer": "true"}, ["offload_optimizer", "zero_stage >= 1"]),
    ({"precision": "fp16"}, ["fp16", "use_gpu"]),
    ({"precision": "int8"}, ["precision", "int8"]),
    ({"optim.min_lr": 1.0, "optim.lr": 0.1}, ["optim.min_lr", "1.0"]),
    ({"keep_last_k": 0}, ["keep_last_k", "0"]),
    ({"init": "raygpt"}, ["init_path"]),
    ({"model.activation": "relu"}, ["activation", "'relu'", "'gelu_tanh'"]),
    ({"launcher": "local", "num_workers": 2}, ["launcher=local", "num_workers=2", "launcher=ray"]),
    ({"launcher": "local", "max_failures": 1}, ["launcher=local", "max_failures=1", "launcher=ray", "--resume"]),
    ({"launcher": "actors"}, ["launcher", "'actors'", "'local'"]),
])
def test_bad_values(kw, words):
    with pytest.raises(ConfigError) as e:
        _cfg(**kw)
    for w in words:
        assert w in str(e.value)


def test_missing_dataset_fails_before_any_worker(tmp_path):
    from pipelines.train.trainer import run

    cfg = base_config(tmp_path / "nope", tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert "data=" in str(e.value) and "does not exist" in str(e.value)
    assert not (tmp_path / "run" / "ray").exists() and not (tmp_path / "run" / "workers").exists()


def test_compile_on_cpu_without_a_cpp_compiler_fails_before_any_worker(tmp_path):
    import torch._inductor.config as inductor_config
    from train_testlib import make_dataset

    from pipelines.train.trainer import run

    data = make_dataset(tmp_path / "data", ["To be, or not to be, that is the question. " * 40])
    # torch's own config patcher (monkeypatch would delete the option on undo: it is no plain attribute)
    with inductor_config.patch({"cpp.cxx": (None, "no-such-cxx-for-raygpt-tests")}):
        with pytest.raises(ConfigError) as e:
            run(base_config(data, tmp_path / "run", compile=True))
    assert inductor_config.cpp.cxx != (None, "no-such-cxx-for-raygpt-tests")
    assert "compile=true" in str(e.value) and "C++ compiler" in str(e.value) and "compile=false" in str(e.value)
    assert not (tmp_path / "run" / "workers").exists()


def test_precision_auto_is_accepted_and_resolved_per_device():
    import torch

    from pipelines.train.bf16 import BF16_MIN_SPEEDUP, cpu_bf16_ok, cpu_bf16_speedup
    from pipelines.train.deepspeed import auto_precision

    assert _cfg(precision="auto").precision == "auto"
    speedup = cpu_bf16_speedup(torch.get_num_threads())
    # measured, not read off CPU flags: bf16 only where oneDNN has it AND it beats fp32 by the margin
    assert auto_precision(use_gpu=False) == ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")
    if not cpu_bf16_ok():
        assert speedup == 0.0 and auto_precision(use_gpu=False) == "fp32"
    else:
        assert speedup > 0.0


def test_bf16_speedup_measures_real_matmuls_and_restores_the_thread_count():
    import torch

    from pipelines.train.bf16 import cpu_bf16_ok, cpu_bf16_speedup

    if not cpu_bf16_ok():
        pytest.skip("this CPU has no bf16 matmul support (AVX512-BF16 / AMX): the speedup is 0 by definition")
    before = torch.get_num_threads()
    r = cpu_bf16_speedup(1, n=128, trials=3)  # a new cache key: really measured
    assert torch.get_num_threads() == before
    assert 0.0 < r < 100.0


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"data: {tmp_path / 'nope'}\nrun_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(cfg), "batch.micro_batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "batch.micro_batch_size must be >= 1, got 0" in err and "Traceback" not in err
    assert main(["train", "--config", str(cfg)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "norun")]) == 2
    assert "not a raygpt training run dir" in capsys.readouterr().err


def test_shipped_configs_load():
    for p in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        if p.name.startswith(("train-", "sft-")):
            c = load_config(TrainConfig, p)
            assert c.max_steps >= 1 and c.data


def test_ds_config_from_train_config():
    c = _cfg(**{"zero_stage": 2, "num_workers": 2, "batch.micro_batch_size": 3, "batch.grad_accum": 2,
                "optim.grad_clip": 0.5})
    d = ds_config(c, world_size=2)
    assert d["train_batch_size"] == 12 and d["gradient_accumulation_steps"] == 2
    assert d["train_micro_batch_size_per_gpu"] == 3 and d["zero_optimization"]["stage"] == 2
    assert d["gradient_clipping"] == 0.5 and "bf16" not in d and "fp16" not in d and "optimizer" not in d
    # the flat gradient buffer guards GPU memory against fragmentation; on a CPU it is only a copy
    assert d["zero_optimization"]["contiguous_gradients"] is False
    assert ds_config(_cfg(zero_stage=2, use_gpu="true"), 2)["zero_optimization"]["contiguous_gradients"] is True
    # ZeRO 0 clips in the loop (which also measures the norm), not in DeepSpeed
    assert ds_config(_cfg(zero_stage=0), 1)["gradient_clipping"] == 0.0
    off = ds_config(_cfg(zero_stage=3, offload_optimizer="true", offload_params="true"), 1)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["optimizer"]["type"] == "AdamW"  # DeepSpeed builds CPUAdam for offloaded partitions
    gpu = ds_config(_cfg(use_gpu="true", precision="bf16"), 1)
    assert gpu["bf16"] == {"enabled": True}
    fp16 = ds_config(_cfg(use_gpu="true", precision="fp16"), 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0
    cpu_bf16 = ds_config(_cfg(precision="bf16"), 1)  # CPU: torch autocast, DeepSpeed stays fp32
    assert "bf16" not in cpu_bf16
    over = ds_config(_cfg(ds_config_override='{"zero_optimization": {"reduce_bucket_size": 1000}, '
                                              '"steps_per_print": 5}'), 1)
    assert over["zero_optimization"]["reduce_bucket_size"] == 1000 and over["zero_optimization"]["stage"] == 0
    assert over["steps_per_print"] == 5


def test_lr_schedule_warmup_cosine_min_lr():
    c = _cfg(**{"optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 10, "max_steps": 110})
    lrs = [lr_at(c, s) for s in range(130)]
    assert lrs[0] < lrs[5] < lrs[9] < 1e-3  # linear warmup
    assert math.isclose(lrs[10], 1e-3)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # cosine decays monotonically
    assert math.isclose(lrs[60], (1e-3 + 1e-4) / 2, rel_tol=1e-9)  # half way = mean of lr and min_lr
    assert all(math.isclose(v, 1e-4) for v in lrs[110:])  # floor after decay_steps (= max_steps)


def test_exponent_numbers_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML) reads `6e-4` as a string; a learning rate written that way must still work
    f = tmp_path / "t.yaml"
    f.write_text("data: d\noptim:\n  lr: 6e-4\n  min_lr: 6E-5\n")
    c = load_config(TrainConfig, f, ["optim.weight_decay=1e-2"])
    assert (c.optim.lr, c.optim.min_lr, c.optim.weight_decay) == (6e-4, 6e-5, 1e-2)
    with pytest.raises(ConfigError, match=r"optim.lr: expected a number, got 'fast'"):
        _cfg(**{"optim.lr": "fast"})


def test_test_hooks_live_in_the_testing_section_only():
    """Test hooks are not product keys: throttle_s and pid_dir sit under `testing:`, off by default."""
    assert _cfg().testing.throttle_s == 0 and _cfg().testing.pid_dir is None
    cfg = _cfg(**{"testing.throttle_s": 0.5, "testing.pid_dir": "/tmp/pids"})
    assert cfg.testing.throttle_s == 0.5 and cfg.testing.pid_dir == "/tmp/pids"
    with pytest.raises(ConfigError, match="unknown config key.*'throttle_s'"):
        _cfg(throttle_s=0.5)
    with pytest.raises(ConfigError, match=r"testing\.throttle_s must be >= 0, got -1"):
        _cfg(**{"testing.throttle_s": -1})


def test_collectives_choice_and_shm_timeout():
    from pipelines.train.deepspeed import install_collectives

    assert _cfg().shm_collectives and _cfg().shm_collectives_timeout_s == 300
    with pytest.raises(ConfigError, match=r"shm_collectives_timeout_s must be > 0 seconds, got 0"):
        _cfg(shm_collectives_timeout_s=0)
    # decided without touching deepspeed.comm: one worker or GPUs have nothing to choose; off means gloo
    assert install_collectives(_cfg(), 1) is None
    assert install_collectives(_cfg(shm_collectives="false"), 2) == "gloo"


def test_every_error_class_of_pipelines_train_is_a_user_error():
    """The CLI prints a UserError as one line (exit 2): every error class defined in pipelines/train is one."""
    import importlib
    import inspect
    import pkgutil

    import pipelines.train
    from pipelines.errors import UserError

    found = {}
    for m in pkgutil.iter_modules(pipelines.train.__path__):
        mod = importlib.import_module(f"pipelines.train.{m.name}")
        found.update({f"{mod.__name__}.{n}": c for n, c in vars(mod).items()
                      if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == mod.__name__})
    assert {"pipelines.train.trainer.TrainError", "pipelines.train.state.CheckpointStateError",
            "pipelines.train.shm_collectives.ShmCollectiveError"} <= set(found), sorted(found)
    assert not [n for n, c in found.items() if not issubclass(c, UserError)], found
