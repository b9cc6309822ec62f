"""Text condition ids from a text tokenizer file the user supplies (UCF-101 text conditioning, NBP Table 6).

The NBP paper and its release condition UCF-101 models on the class name as text: the folder name split at
its lower-to-upper case boundaries and lower-cased ("ApplyEyeMakeup" -> "apply eye makeup", "YoYo" -> "yo
yo"), tokenized by the LLaMA tokenizer (32,000 ids) with its special tokens, i.e. the BOS id ``<s>``
first and no EOS, then right-padded / truncated to 8 ids (the model's ``num_condition_tokens``;
:func:`megatron_nbp.layouts.hybrid.pad_text_ids` does that at training and generation time, so the
shards store the unpadded ids). The condition vocabulary of the model is then 64K video codes + 32K text
ids + the L special tokens.

Two file formats are read, each by its own library; nothing is downloaded:

* a SentencePiece model (``tokenizer.model``, LLaMA's own format), read by ``sentencepiece``; the BOS id
  is prepended when the model defines one (LLaMA: 1);
* a Hugging Face ``tokenizer.json``, read by ``tokenizers``; the special tokens are the ones its
  post-processor adds (LLaMA's adds ``<s>``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nbp_common.files import sha256_file

TextTokenizerKind = Literal["sentencepiece", "tokenizers"]

CLASS_NAME_TEXT_RULE = "class folder name split at lower-to-upper case boundaries, lower-cased"
"""How :func:`class_name_text` makes a text of a class name (recorded in the manifest)."""

_CASE_BOUNDARY = re.compile(r"(?<=[a-z])(?=[A-Z])")


def class_name_text(name: str) -> str:
    """The text of a UCF-101 class name, as the NBP release makes it: a space at every lower-to-upper case
    boundary, then lower case ("ApplyEyeMakeup" -> "apply eye makeup"; other characters are kept)."""
    return _CASE_BOUNDARY.sub(" ", name).lower()


@dataclass
class TextTokenizer:
    """A text tokenizer loaded from a user's file (:meth:`load`): text -> ids with its special tokens.

    Attributes:
        path: the file. kind: "sentencepiece" (``.model``) or "tokenizers" (``tokenizer.json``).
        vocab_size: number of ids (SentencePiece pieces; ``tokenizers``' vocabulary with added tokens);
            every id is below it. sha256: hex SHA-256 of the file's bytes.
    """

    path: Path
    kind: TextTokenizerKind
    vocab_size: int
    sha256: str
    _impl: Any = field(repr=False, default=None)
    _cache: dict[str, list[int]] = field(repr=False, default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Read a ``tokenizer.json`` (``tokenizers``) or, for any other name, a SentencePiece model.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the library cannot read it (the message names the file and the library).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer file not found: {path}")
        kind: TextTokenizerKind = "tokenizers" if path.suffix.lower() == ".json" else "sentencepiece"
        try:
            if kind == "tokenizers":
                from tokenizers import Tokenizer

                impl = Tokenizer.from_file(str(path))
                vocab = impl.get_vocab_size(with_added_tokens=True)
            else:
                import sentencepiece

                impl = sentencepiece.SentencePieceProcessor(model_file=str(path))
                vocab = impl.get_piece_size()
        except Exception as exc:  # both libraries raise their own (Rust / C++) exception types
            raise ValueError(f"cannot read text tokenizer {path} with {kind} (a SentencePiece .model or a "
                             f"tokenizers tokenizer.json): {exc}") from None
        return cls(path, kind, int(vocab), sha256_file(path), impl)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with the tokenizer's special tokens (SentencePiece: BOS first when the model has
        one; tokenizer.json: what its post-processor adds), not padded or truncated."""
        if text not in self._cache:
            if self.kind == "tokenizers":
                ids = self._impl.encode(text, add_special_tokens=True).ids
            else:
                ids = self._impl.encode(text, add_bos=self._impl.bos_id() >= 0)
            self._cache[text] = [int(i) for i in ids]
        return list(self._cache[text])

    def class_name_ids(self, name: str) -> list[int]:
        """Ids of a class name's text (:func:`class_name_text`)."""
        return self.encode(class_name_text(name))

    def manifest_entry(self) -> dict:
        """What the tokenization job records in ``manifest.json`` under ``text_tokenizer``."""
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "text": CLASS_NAME_TEXT_RULE}

    def check_vocab_size(self, text_vocab_size: int | None) -> None:
        """Refuse a model whose text vocabulary is not this tokenizer's.

        Raises:
            ValueError: naming both sizes.
        """
        if text_vocab_size != self.vocab_size:
            raise ValueError(f"text tokenizer {self.path} has {self.vocab_size} ids, the model's "
                             f"text_vocab_size is {text_vocab_size}")


def load_text_tokenizer(tokenizer: "str | os.PathLike | TextTokenizer") -> TextTokenizer:
    """A :class:`TextTokenizer` as given, or loaded from a file (:meth:`TextTokenizer.load`)."""
    return tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer.load(tokenizer)
