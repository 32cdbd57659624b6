"""What a byte-level model is: the interface that sampling, scoring and mixing use.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles" (2024) turn a tokenized model into a model
over bytes; once it is one, nothing downstream needs its tokens. Anything
with ``reset(prompt)`` (condition on the prompt's bytes),
``next_byte_probs()`` (a ``[257]`` distribution: bytes 0..255, then `STOP`
= 256 for the end of the text) and ``advance(byte)`` (append one byte) is a
`NextByteModel`: `ByteLM` and `ByteMixture` are.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["NextByteModel"]


class NextByteModel(Protocol):
    def reset(self, prompt: bytes | str) -> None: ...

    def next_byte_probs(self) -> np.ndarray: ...

    def advance(self, byte: int) -> None: ...
