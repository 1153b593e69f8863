"""gptcore: a pure single-device GPT library (model, tokenizer, sampling, engine, checkpoint format).

Imports torch and tokenizer libraries only: never ray, deepspeed or torch.distributed (a test checks).
"""

__version__ = "0.1.0"
