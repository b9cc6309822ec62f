"""MAGVITv2-style causal video tokenizer with FSQ (Yu et al. 2023; Mentzer et al. 2023; NBP, Ren et al. 2025).

Public API: :class:`TokenizerConfig`, :class:`VideoTokenizer`, :class:`FSQ`, :func:`save_tokenizer`,
:func:`load_tokenizer`, :func:`tokenizer_sha256`.
"""

from .checkpoint import load_tokenizer, save_tokenizer, tokenizer_sha256
from .config import TokenizerConfig
from .fsq import FSQ
from .model import VideoTokenizer

__all__ = ["TokenizerConfig", "VideoTokenizer", "FSQ", "save_tokenizer", "load_tokenizer", "tokenizer_sha256"]
