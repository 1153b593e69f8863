"""The base of every error gptcore raises for bad input (config, sampling params, tokenizer, checkpoint).

    from gptcore.errors import GPTError
    try: ...
    except GPTError as e: print(e)   # a one-line message naming the parameter, the value and the fix

The raygpt CLI prints these without a traceback. Does not: import anything but the standard library.
"""

from __future__ import annotations


class GPTError(ValueError):
    """A user-facing gptcore error: the input breaks a documented constraint."""
