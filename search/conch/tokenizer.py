"""CONCH text tokenisation with the `tokenizers` library.

The tokenizer file is used exactly as released, including its byte-level ``add_prefix_space: true``:
the first word is encoded as if preceded by a space, as when CONCH was trained (the reference's
transformers-based loader drops that setting from transformers 4.48 on, which changes every text's
first token).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from search.core.errors import ConfigError


class ConchTokenizer:
    def __init__(self, path: str | Path, context_length: int, pad_id: int = 0) -> None:
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise ConfigError(f"{path}: not a Hugging Face tokenizers file ({exc})") from None
        self.context_length = context_length
        self.pad_id = pad_id
        # Special tokens count towards the limit, so <end_of_text> survives truncation; the last of the
        # context_length slots is always <pad>: the text tower replaces it with its CLS embedding.
        self._tokenizer.enable_truncation(max_length=context_length - 1)
        self._tokenizer.no_padding()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[n, context_length]`` (int64), padded with ``<pad>``."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        out = torch.full((len(encodings), self.context_length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(encodings):
            out[row, : len(encoding.ids)] = torch.tensor(encoding.ids, dtype=torch.long)
        return out
