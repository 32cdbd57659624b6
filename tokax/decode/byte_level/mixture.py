"""Byte-by-byte mixtures of byte-level models, e.g. tokenized models with different vocabularies.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles" (2024): models whose vocabularies differ
cannot be mixed token by token, but their exact next-byte distributions
(`tokax.decode.byte_level.next_byte`) can. `ByteMixture` computes the mixed
next-byte distribution, with fixed weights or with the Bayesian posterior
weights of the models given the bytes so far.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokax.decode.byte_level.protocol import NextByteModel

__all__ = ["ByteMixture"]


class ByteMixture:
    """Next-byte mixture of byte-level models (e.g. tokenized models with different vocabularies).

    ``rule="fixed"``: P(b | x) = sum_k w_k P_k(b | x) with constant weights w.
    ``rule="bayes"``: the weights are the posterior of the models given the
    bytes so far, w_k(x) = pi_k P_k(x) / sum_j pi_j P_j(x) (prior pi =
    `weights`), so the mixture is the Bayesian model average: its probability
    of a whole byte string is P(x) = sum_k pi_k P_k(x), and its bits/byte is
    at most the best model's plus log2(1 / pi_best) / len(x).
    """

    def __init__(self, models: Sequence[NextByteModel], weights: Sequence[float] | None = None, rule: str = "fixed") -> None:
        if not models:
            raise ValueError("ByteMixture needs at least one model")
        w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (len(models),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum")
        if rule not in ("fixed", "bayes"):
            raise ValueError(f"rule={rule!r}: use 'fixed' or 'bayes'")
        self.models = list(models)
        self.prior = w / w.sum()
        self.rule = rule
        self.weights = self.prior.copy()  # current weights (the posterior under 'bayes')
        self._probs: list[np.ndarray] | None = None  # [K][257] cached for the current text

    def reset(self, prompt: bytes | str) -> None:
        for m in self.models:
            m.reset(prompt)
        self.weights = self.prior.copy()
        self._probs = None

    def component_probs(self) -> list[np.ndarray]:
        """Each model's next-byte distribution ``[257]`` at the current text."""
        if self._probs is None:
            self._probs = [m.next_byte_probs() for m in self.models]
        return self._probs

    def next_byte_probs(self) -> np.ndarray:
        return sum(w * p for w, p in zip(self.weights, self.component_probs()))

    def advance(self, byte: int) -> None:
        if self.rule == "bayes":
            # Posterior update: w_k <- w_k P_k(byte | x) / sum_j w_j P_j(byte | x).
            lik = np.array([p[int(byte)] for p in self.component_probs()])
            post = self.weights * lik
            if post.sum() <= 0:
                raise ValueError(f"every model gives byte {int(byte):#04x} probability zero")
            self.weights = post / post.sum()
        for m in self.models:
            m.advance(byte)
        self._probs = None
