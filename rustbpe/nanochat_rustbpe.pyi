"""nanochat_rustbpe: a byte-level BPE tokenizer trainer (and encoder) written in Rust."""
from typing import Iterable

GPT4_PATTERN: str
"""The GPT-4 (cl100k_base) split pattern: numbers in groups of up to 3 digits."""
DEFAULT_PATTERN: str
"""nanochat's split pattern: GPT-4's with numbers in groups of up to 2 digits (the default)."""
__version__: str

class Tokenizer:
    """A byte-level BPE tokenizer: 256 byte tokens, then one token per learned merge."""

    def __init__(self) -> None: ...
    def train_from_iterator(
        self, iterator: Iterable[str], vocab_size: int, buffer_size: int = 8192, pattern: str | None = None
    ) -> None:
        """Learn `vocab_size - 256` merges from the strings of `iterator` (fewer if no pair is left).

        Raises ValueError (vocab_size < 256, invalid pattern, empty corpus), TypeError (an item that
        is not a str), and whatever the iterator raises."""
    def get_pattern(self) -> str: ...
    def get_merges(self) -> list[tuple[int, int]]:
        """The merges in order: merge i makes token 256 + i."""
    def get_mergeable_ranks(self) -> list[tuple[bytes, int]]:
        """(token bytes, id) for every token, by id: tiktoken's `mergeable_ranks`."""
    def encode(self, text: str) -> list[int]: ...
    def batch_encode(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel with the GIL released."""
