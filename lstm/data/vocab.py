"""A vocabulary: an ordered tuple of tokens (words or characters); a token's id is its position,
by descending count (the PTB tutorial's reader) or sorted (the Keras char example). Encoding
drops a token outside it (PTB's valid/test), maps it to a stand-in such as ``<unk>``, or
raises an error naming it (a prompt the model cannot read).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Optional, Sequence

import numpy as np

from lstm.errors import UserError


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]

    @classmethod
    def by_count(cls, tokens: Iterable[str]) -> "Vocabulary":
        counts = Counter(tokens)
        return cls(tuple(t for t, _ in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))))

    @classmethod
    def sorted_set(cls, tokens: Iterable[str]) -> "Vocabulary":
        return cls(tuple(sorted(set(tokens))))

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @cached_property
    def sha256(self) -> str:
        """Identity of the vocabulary (order included), for checkpoints."""
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()

    def missing(self, tokens: Iterable[str]) -> list[str]:
        """The distinct tokens this vocabulary lacks, sorted."""
        return sorted(set(tokens) - self.ids.keys())

    def encode(
        self, tokens: Sequence[str], *, unknown: Optional[str] = None, what: str = "", unit: str = "token"
    ) -> np.ndarray:
        """int64 ids of ``tokens``; one outside the vocabulary is dropped, becomes ``unknown``, or is a UserError."""
        ids = self.ids
        if what:
            lacking = self.missing(tokens)
            if lacking:
                shown = " ".join(repr(t) for t in lacking[:20]) + (" ..." if len(lacking) > 20 else "")
                raise UserError(
                    f"{what} has {len(lacking)} {unit}(s) the model's vocabulary lacks: {shown}; "
                    "remove or replace them (the vocabulary is the training data's)"
                )
        if unknown is not None:
            stand_in = ids[unknown]
            return np.fromiter((ids.get(t, stand_in) for t in tokens), dtype=np.int64, count=len(tokens))
        return np.fromiter((ids[t] for t in tokens if t in ids), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]
