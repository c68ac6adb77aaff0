"""Pre-splitting text into chunks before BPE, as GPT-2 and GPT-4 do.

BPE never merges across chunk boundaries: a regular expression first cuts text into words, numbers,
punctuation runs and whitespace runs, so " dog" and "dog." cannot fuse into one token. The pattern is
part of a tokenizer: the same vocabulary with another pattern gives other ids.

Built in, under short names:
- "gpt2":   GPT-2's pattern. We write the contractions as `'(?:[sdmt]|ll|ve|re)` rather than the
            original `'s|'t|'re|'ve|'m|'ll|'d`; the two match exactly the same (no alternative is a
            prefix of another), and the tests check it against tiktoken's on random text.
- "cl100k": GPT-4's pattern, as tiktoken writes it (case-insensitive contractions, numbers of at
            most three digits, a leading non-letter glued to a word).
Any other pattern (a `regex` module pattern string) is accepted too. It must match every character
of the text, otherwise text would vanish; `Splitter.split` checks that for patterns other than the
built-in ones, which are known to cover everything.

Speed: the `regex` module does `\\p{L}` and `\\p{N}`, and Python's `re` does not, but `re` runs about
twice as fast. For the built-in patterns we keep a hand-written ASCII-only translation, used for any
text that is pure ASCII (`str.isascii()` is O(1) in CPython); on ASCII text it matches exactly what
the real pattern matches (tested with hypothesis), so it is an optimisation, not an approximation.

Parallel pre-splitting needs to cut one long text into pieces without changing the chunks. For the
built-in patterns a position whose previous character is not whitespace and whose own character is
whitespace other than CR/LF is always a chunk boundary: no alternative continues a match from a
non-space character into a following space or tab (checked alternative by alternative), and neither
pattern looks behind. `safe_pieces` cuts only there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}

# The same patterns with \p{L} -> [A-Za-z], \p{N} -> [0-9] and \s -> the six ASCII characters that
# Unicode calls White_Space (which is what `regex` and tiktoken mean by \s; Python's `re` would also
# count \x1c-\x1f, so \s is spelled out). Valid only on ASCII text.
_S, _NS = r"[\t\n\x0b\x0c\r ]", r"[^\t\n\x0b\x0c\r ]"
_ASCII_TRANSLATIONS = {
    GPT2_PATTERN: rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+|{_S}+(?!{_NS})|{_S}+""",
    CL100K_PATTERN: (
        rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]++|[0-9]{{1,3}}+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]++[\r\n]*+|"""
        rf"""{_S}++$|{_S}*[\r\n]|{_S}+(?!{_NS})|{_S}"""
    ),
}
# a cut point for safe_pieces: a non-space character, then whitespace that is not CR or LF
_SAFE_CUT = regex.compile(r"(?<=\S)[^\S\r\n]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ASCII_SPACE = frozenset(" \t\n\x0b\x0c\r")


def _cut_before(text: str, start: int, end: int) -> int:
    """The last safe cut in text[start:end] (a space after a non-space), else `start`."""
    pos = end
    while (pos := text.rfind(" ", start + 1, pos)) > start:
        if text[pos - 1] not in _ASCII_SPACE:  # within an ASCII stretch, so ASCII whitespace is all
            return pos
    return start


def resolve_pattern(pattern: str) -> str:
    """A built-in pattern's name -> its regex; any other string is taken as a regex itself."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be 'gpt2', 'cl100k' or a regex string, got {pattern!r}")
    return PATTERNS.get(pattern, pattern)


class Splitter:
    """A compiled split pattern: `split(text)` returns the chunks, in order, covering all of text."""

    def __init__(self, pattern: str, min_ascii_run: int = 256):
        self.pattern = resolve_pattern(pattern)
        self.min_ascii_run = min_ascii_run
        try:
            self.regex = regex.compile(self.pattern)
        except regex.error as err:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {err}") from None
        self.builtin = self.pattern in _ASCII_TRANSLATIONS
        self.ascii_regex = None
        if self.builtin:
            try:
                self.ascii_regex = re.compile(_ASCII_TRANSLATIONS[self.pattern])
            except re.error:  # possessive quantifiers need Python 3.11's re; `regex` still works
                pass

    def split(self, text: str) -> list[str]:
        if self.ascii_regex is not None:
            return self._split_builtin(text)
        # a user pattern may have capturing groups (findall would return those) or leave gaps
        chunks = [m.group() for m in self.regex.finditer(text)]
        if sum(map(len, chunks)) != len(text):
            pos = 0
            for m in self.regex.finditer(text):
                if m.start() != pos:
                    break
                pos = m.end()
            raise ValueError(
                f"split pattern {self.pattern!r} matches nothing at character {pos} ({text[pos:pos + 12]!r}): "
                "a pattern must match every character of the text, or that text would be lost"
            )
        return chunks

    def _split_builtin(self, text: str) -> list[str]:
        """ASCII stretches of at least `min_ascii_run` characters go to the fast `re` pattern, the
        rest to `regex`, each stretch cut at safe positions so the chunks are those of the whole."""
        if text.isascii():
            return self.ascii_regex.findall(text)
        chunks: list[str] = []
        pos, n = 0, len(text)
        found = _NON_ASCII.search(text)
        while found is not None:
            if found.start() - pos >= self.min_ascii_run:
                cut = _cut_before(text, pos, found.start())
                chunks += self.ascii_regex.findall(text, pos, cut)
                pos = cut
            end = found.end()  # grow the non-ASCII stretch over short ASCII gaps
            while (found := _NON_ASCII.search(text, end)) is not None and found.start() - end < self.min_ascii_run:
                end = found.end()
            cut = _SAFE_CUT.search(text, end)
            cut = n if cut is None else cut.start()
            chunks += self.regex.findall(text, pos, cut)
            pos = cut
            if found is not None and found.start() < pos:  # no safe cut before it: it is done already
                found = _NON_ASCII.search(text, pos)
        if pos < n:
            chunks += self.ascii_regex.findall(text, pos)
        return chunks

    def safe_pieces(self, text: str, piece_chars: int) -> Iterator[str]:
        """Cut `text` into pieces of about `piece_chars` whose chunks are exactly the chunks of `text`.

        Only the built-in patterns are known to allow it; any other pattern gets `text` back whole.
        """
        if not self.builtin or len(text) <= piece_chars:
            yield text
            return
        start = 0
        while len(text) - start > piece_chars:
            m = _SAFE_CUT.search(text, start + piece_chars)
            if m is None:
                break
            yield text[start:m.start()]
            start = m.start()
        yield text[start:]
