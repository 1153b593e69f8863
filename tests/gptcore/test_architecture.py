"""gptcore's shape: small files and functions, no import cycles, one error base, stable import paths.

    python -m pytest tests/gptcore/test_architecture.py -q

Static checks read the sources with `ast`; the rest imports gptcore and builds one tiny model. Type checking
itself is `python -m mypy gptcore` (make lint), not a test: it takes minutes on a cold cache.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import gptcore
from gptcore.config import GPTConfig
from gptcore.errors import GPTError
from gptcore.model import GPT

GPTCORE = Path(gptcore.__file__).parent
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _sources() -> dict[str, Path]:
    return {f"gptcore.{p.stem}" if p.stem != "__init__" else "gptcore": p for p in sorted(GPTCORE.glob("*.py"))}


def test_files_and_functions_stay_small():
    too_long = []
    for name, path in _sources().items():
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            too_long.append(f"{name}: {n} lines (max {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                length = (node.end_lineno or node.lineno) - start + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines (max {MAX_FUNCTION_LINES})")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def _module_level_imports(path: Path) -> set[str]:
    """gptcore modules imported by statements that run at import time (not inside functions)."""
    found: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gptcore"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptcore"):
                found.add(node.module)
                # `from gptcore import x` may name a submodule
                found.update(f"{node.module}.{a.name}" for a in node.names if (GPTCORE / f"{a.name}.py").exists()
                             and node.module == "gptcore")
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", [])
                      + [s for h in getattr(node, "handlers", []) for s in h.body])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def test_no_import_cycles():
    modules = _sources()
    graph = {name: sorted(m for m in _module_level_imports(path) if m in modules and m != name)
             for name, path in modules.items()}
    # every module imports its package first; the package __init__ importing nothing keeps that acyclic
    assert graph["gptcore"] == [], f"gptcore/__init__.py must not import submodules: {graph['gptcore']}"
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, path + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            walk(name, [name])


def test_every_gptcore_error_class_is_a_gpterror():
    classes = []
    for info in pkgutil.walk_packages(gptcore.__path__, "gptcore."):
        mod = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if obj.__module__ == mod.__name__ and issubclass(obj, BaseException):
                classes.append(obj)
    assert classes, "found no error classes at all?"
    stray = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, GPTError)]
    assert not stray, f"user-facing gptcore errors must inherit gptcore.errors.GPTError: {stray}"


def test_engine_input_errors_are_gpt_errors_and_still_value_errors():
    from gptcore.engine import Engine, EngineError, PromptTooLongError
    from gptcore.sampling import SamplingParams

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16)).eval()
    with pytest.raises(EngineError, match="max_batch_size must be an integer >= 1"):
        Engine(model, max_batch_size=0)
    eng = Engine(model, kernel="torch")
    with pytest.raises(EngineError, match="needs a tokenizer"):
        eng.generate("hello", SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineError, match=r"must be in \[0, vocab_size=64\)"):
        eng.generate([[1, 99]], SamplingParams(max_new_tokens=2))
    with pytest.raises(PromptTooLongError):
        eng.generate([[1] * 15], SamplingParams(max_new_tokens=2))
    for err in (EngineError, PromptTooLongError):
        assert issubclass(err, GPTError) and issubclass(err, ValueError)  # callers catching ValueError still do
    assert eng.generate([[1, 2]], SamplingParams(max_new_tokens=2, temperature=0))[0].outputs[0].token_ids


def test_names_keep_their_import_paths_after_the_split():
    from gptcore import checkpoint, engine, engine_forward, hf, tokenizer, tokenizer_formats

    for name in ("export_hf", "import_hf", "hf_config_dict", "config_from_hf_dict", "to_hf_state_dict",
                 "from_hf_state_dict", "code_version", "CheckpointError", "save_checkpoint", "load_checkpoint",
                 "verify_checkpoint", "checkpoint_id", "read_config", "read_tokenizer", "Checkpoint"):
        assert callable(getattr(checkpoint, name)), name
    assert checkpoint.to_hf_state_dict is hf.to_hf_state_dict
    assert engine._Linear is engine_forward.PackedLinear  # tests patch gptcore.engine._Linear.BIG
    for name in ("Engine", "EngineError", "PromptTooLongError", "RequestOutput", "CompletionOutput", "StepOutput"):
        assert hasattr(engine, name), name
    for name in ("Tokenizer", "TokenizerError", "train_bpe", "train_char", "EOT"):
        assert hasattr(tokenizer, name), name
    assert tokenizer.TokenizerError is tokenizer_formats.TokenizerError


def test_parameter_names_and_order_are_gpt2s():
    """GPT.transformer is a typed module now (it was an nn.ModuleDict): the state dict must not notice."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    per_layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"]
    want = (["transformer.wte.weight", "transformer.wpe.weight"]
            + [f"transformer.h.{i}.{n}" for i in range(2) for n in per_layer]
            + ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"])
    assert list(model.state_dict()) == want
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    assert [type(b).__name__ for b in model.transformer.blocks()] == ["Block", "Block"]
