"""GPTConfig: the shape of a GPT-2-style model, validated at construction, plus named presets.

    from gptcore.config import GPTConfig, preset
    cfg = preset("shakespeare-char", vocab_size=65)

Does not: know about training hyper-parameters (pipelines.train owns those) or devices.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from gptcore.errors import GPTError


class ConfigError(GPTError):
    """A configuration value breaks a constraint. The message names field, constraint, value, fix."""


# activation name -> the `approximate` argument of torch.nn.functional.gelu
ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width (C); head size is n_embd // n_head
    block_size: int = 1024  # maximum context length in tokens (learned position table size)
    vocab_size: int = 50257  # rows of the token embedding (= columns of the tied lm_head)
    dropout: float = 0.0  # dropout on embeddings, attention output and MLP output (training only)
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them; HF export writes zeros without)
    # MLP non-linearity: GPT-2's tanh-approximated GELU ("gelu_new" in HF), or the exact (erf) GELU that
    # nanoGPT trains with (HF "gelu"; on CPU its kernels are ~2x faster than the tanh form's)
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-5  # GPT-2's LayerNorm epsilon
    name: str = field(default="custom", compare=False)  # preset name, for logs only

    def __post_init__(self) -> None:
        errors = []

        def check(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"{f} must be an integer >= 1, got {v!r}; set {f} to a positive integer")
        if not errors:
            check(self.n_embd % self.n_head == 0,
                  f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head} "
                  f"(remainder {self.n_embd % self.n_head}); pick n_head among "
                  f"{[h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]}")
        check(isinstance(self.dropout, (int, float)) and 0.0 <= float(self.dropout) < 1.0,
              f"dropout must be in [0, 1), got {self.dropout!r}; use 0.0 to disable it")
        check(isinstance(self.bias, bool), f"bias must be true or false, got {self.bias!r}")
        check(self.activation in ACTIVATIONS,
              f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}; 'gelu_tanh' is GPT-2's, "
              f"'gelu' the exact GELU")
        check(isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0,
              f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if errors:
            raise ConfigError("invalid GPTConfig:\n  - " + "\n  - ".join(errors))

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def gelu_approximate(self) -> str:
        return ACTIVATIONS[self.activation]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)


# Named presets. The GPT-2 family matches OpenAI's released shapes so HF checkpoints import 1:1.
PRESETS: dict[str, dict[str, Any]] = {
    # runs a few training steps in seconds on one CPU core; for tests and smoke runs
    "debug": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=256),
    # nanoGPT's README CPU recipe (shakespeare_char with the laptop overrides)
    "shakespeare-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0),
    # bench shape "tiny"
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=4096),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """Config of a named preset, with fields overridden (e.g. vocab_size of your tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], "name": name, **overrides})
