"""Cleaning one document: normalise its text, redact personal data, and judge its quality.

Three pure functions, applied in this order to every document by `minillm.data` (in worker
processes, so each takes its settings as arguments and touches nothing global):

1. `normalize(text, config)` -> (text, steps that changed it). In order:
   - HTML to text: `<br />`, `<p>` and other block tags become line breaks, other tags of a fixed
     list of real HTML elements (`<i>`, `<a href=...>`, ...) are removed, `<script>`/`<style>`
     elements and `<!-- comments -->` go with their contents, entities (`&amp;`) are decoded.
     Subtle: only known element names count as tags, so `<module>`, `<stdin>` or `a < b > c` in
     ordinary prose survive (Python's own docstrings are full of `<object at 0x...>`).
   - Unicode NFC, so that "é" typed two ways is one string (and one set of tokens).
   - control characters out (C0 controls other than tab and newline, zero-width space, byte order
     marks, bidirectional overrides); line ends become `\n`. Subtle: C1 controls (U+0080..U+009F)
     in real text are Windows-1252 punctuation decoded as Latin-1 (IMDB's reviews hold 772 "\x85"
     that were "…"), so they become that punctuation rather than vanish.
   - whitespace: exotic spaces (no-break, em, ideographic) become plain spaces, runs of spaces inside
     a line collapse to one (indentation at the start of a line is kept, so code survives), trailing
     spaces go, three or more line breaks become two, and the ends are stripped.
   - lowercasing, only when asked: it loses information a model can use.
2. `redact(text, kinds)` -> (text, {kind: (matches, characters)}). E-mail addresses, card numbers
   that pass the Luhn check, IPv4/IPv6 addresses and phone numbers become `[EMAIL]`, `[CARD]`,
   `[IP]`, `[PHONE]`. The order matters: a card number or an IP address would otherwise also look
   like a phone number. Phone numbers are a heuristic (see `_looks_like_phone`): international
   (+44 20 7946 0958), grouped ((555) 123-4567, 555.123.4567, 1-800-555-0199, 07700 900123) and
   national numbers written as one run starting with 0 (09061701461); a bare 10-digit run such as
   2147483647, a date with its hour (1994-02-03 14:15) and a year range followed by a number
   (1940-1944 17) are left alone. Four dotted numbers up to 255 are taken for an IPv4 address,
   version numbers such as 2.7.2.2 included.
3. `quality_problem(text, config)` -> None or the reason to drop: "empty", "too_short", or
   "low_quality" with the detail ("letter_share": too few letters among the visible characters,
   as in tables of numbers or base64; "repeated_lines": too many lines that repeat an earlier line,
   as in boilerplate, the threshold Gopher (Rae et al. 2021) uses is 0.3).
"""

from __future__ import annotations

import html
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

PII_KINDS = ("email", "card", "ip", "phone")  # also the order redaction runs in


@dataclass
class CleanConfig:
    """How each document's text is normalised, redacted and filtered; every step is reported."""

    strip_html: bool = True  # HTML tags to text (<br /> -> line break), entities decoded
    nfc: bool = True  # Unicode NFC normalisation
    strip_control: bool = True  # drop control characters (tab and newline stay)
    normalize_whitespace: bool = True  # collapse spaces, trim lines, at most one blank line in a row
    lowercase: bool = False  # lowercase everything (off: case carries information)
    redact: tuple[str, ...] = PII_KINDS  # PII kinds replaced by [EMAIL] etc.; "none" turns it off
    min_chars: int = 20  # documents shorter than this after cleaning are dropped as too_short
    min_letter_share: float = 0.4  # drop when fewer of the visible characters are letters
    max_repeated_line_share: float = 0.3  # drop when more of the lines repeat an earlier line

    def __post_init__(self) -> None:
        if self.redact in (("none",), ("",)):
            self.redact = ()
        unknown = [kind for kind in self.redact if kind not in PII_KINDS]
        if unknown:
            raise ValueError(f"CleanConfig.redact: unknown kind(s) {', '.join(unknown)}; "
                             f"known: {', '.join(PII_KINDS)} (or none)")
        if self.min_chars < 1:
            raise ValueError(f"CleanConfig.min_chars must be at least 1, got {self.min_chars}")
        for name in ("min_letter_share", "max_repeated_line_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"CleanConfig.{name} must be in [0, 1], got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# normalisation

# Real HTML element names. Block-level ones become a line break, the rest disappear.
_BLOCK_TAGS = ("address article aside blockquote br dd div dl dt figcaption figure footer h1 h2 h3 h4 "
               "h5 h6 header hr li main nav ol p pre section table tbody td tfoot th thead tr ul")
_INLINE_TAGS = ("a abbr b bdi bdo big center cite code del dfn em font i img ins kbd mark nobr q s samp "
                "small span strike strong sub sup tt u var wbr")
_ATTRIBUTE = r"""\s+[\w:.-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>=]+))?"""
_TAG = re.compile(r"</?(%s)(?:%s)*\s*/?>" % ("|".join((_BLOCK_TAGS + " " + _INLINE_TAGS).split()), _ATTRIBUTE),
                  re.IGNORECASE)
_BLOCK = frozenset(_BLOCK_TAGS.split())
# what goes with its contents: <script ...>...</script>, <style ...>...</style>, <!-- ... -->
_HIDDEN_START = re.compile(r"<(?:(script|style)\b|!--)", re.IGNORECASE)
_HIDDEN_END = {"script": re.compile(r"</script\s*>", re.IGNORECASE), "style": re.compile(r"</style\s*>", re.IGNORECASE),
               "!--": re.compile("-->")}
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069"
                      r"\ufeff\ufffe\uffff]")
_C1 = re.compile(r"[\x80-\x9f]")
_ANY_CONTROL = re.compile(_CONTROL.pattern[:-1] + r"\r\x0b\x0c\x1c-\x1e\u2028\u2029\x80-\x9f]")  # any of the above


def _c1_as_windows_1252() -> dict[int, str]:
    """U+0080..U+009F -> what byte 0x80..0x9F means in Windows-1252 (0x85 "…", 0x92 "’", 0x97 "—"),
    or nothing where it means nothing."""
    table = {}
    for code in range(0x80, 0xA0):
        try:
            table[code] = bytes([code]).decode("cp1252")
        except UnicodeDecodeError:
            table[code] = ""
    return table


_C1_TABLE = _c1_as_windows_1252()
_EXOTIC_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def _strip_hidden(text: str) -> str:
    """`<script>`/`<style>` elements and `<!-- comments -->` removed with their contents, in one pass;
    an opener that is never closed stays as text.

    Subtle: once an opener finds no closer, no later opener of its kind can (its closer would have to
    come later still), so that kind is no longer looked for. A regex that tried each opener anew
    rescanned the rest of the text for every one: quadratic ('<!-- x ' * 20,000 took seconds).
    """
    pieces, kept_from, hopeless = [], 0, set()
    for opener in _HIDDEN_START.finditer(text):
        kind = (opener.group(1) or "!--").lower()
        if opener.start() < kept_from or kind in hopeless:  # inside a removed block, or cannot close
            continue
        body = opener.end()
        if kind != "!--":  # an element's start tag runs to the first ">"
            body = text.find(">", body) + 1
            if body == 0:  # no ">" anywhere after: no later start tag can end either
                hopeless.update(("script", "style"))
                continue
        closer = _HIDDEN_END[kind].search(text, body)
        if closer is None:
            hopeless.add(kind)
            continue
        pieces.append(text[kept_from : opener.start()])
        kept_from = closer.end()
    return "".join(pieces) + text[kept_from:] if pieces else text


def _html_to_text(text: str) -> str:
    text = _strip_hidden(text)
    text = _TAG.sub(lambda m: "\n" if m.group(1).lower() in _BLOCK else "", text)
    return html.unescape(text) if _ENTITY.search(text) else text


def normalize(text: str, config: CleanConfig) -> tuple[str, list[str]]:
    """The cleaned text and the names of the steps that changed it (for the report)."""
    changed = []

    def step(name: str, new: str) -> None:
        nonlocal text
        if new != text:
            changed.append(name)
            text = new

    if config.strip_html and ("<" in text or "&" in text):
        step("html", _html_to_text(text))
    if config.nfc and not unicodedata.is_normalized("NFC", text):
        step("nfc", unicodedata.normalize("NFC", text))
    # each step below first makes a cheap test (a substring, one search) that most texts fail
    if config.strip_control and _ANY_CONTROL.search(text):
        new = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text))
        step("control", new.translate(_C1_TABLE) if _C1.search(new) else new)
    if config.normalize_whitespace:
        new = text if text.isascii() else _EXOTIC_SPACE.sub(" ", text)
        new = _INNER_SPACES.sub(" ", new) if "  " in new else new
        new = "\n".join(line.rstrip() for line in new.split("\n"))
        step("whitespace", (_MANY_NEWLINES.sub("\n\n", new) if "\n\n\n" in new else new).strip())
    if config.lowercase:
        step("lowercase", text.lower())
    return text, changed


# ---------------------------------------------------------------------------------------------
# redaction

# Subtle, for speed: Python's re skips quickly to where a pattern can start only when the pattern
# begins with a plain character or set, so the "not preceded by" checks come after the first
# character ((?<![\d.,-]\d) after a \d), and the patterns that cannot start that way run only
# after a cheap search for a hint of them has succeeded.
_EMAIL = re.compile(r"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])[A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                    r"\.[A-Za-z]{2,}\b")
# one run of 13-19 digits, or grouped as cards are printed: 4-4-4-4(-3) or 4-6-4/5 (Amex, Diners)
_CARD = re.compile(r"\d(?<![\d.,=/-]\d)(?:\d{12,18}|\d{3}(?:[ -]\d{4}){3}(?:[ -]\d{1,3})?|\d{3}[ -]\d{6}[ -]\d{4,5})"
                   r"(?!\d|[.,]\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.\[])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+.,/:-])(?:\+[1-9]\d{0,2}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d+(?:[ .-]\d+){0,5}"
                    r"(?![\w]|[.:/-]\d)")
_HINTS = {"email": re.compile("@"), "card": re.compile(r"\d{4}"), "ip": re.compile(r"\d\.\d{1,3}\.\d|:[0-9A-Fa-f]{0,4}:"),
          "phone": re.compile(r"\d[\d ().-]{5,}\d")}


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies: double every second digit from the
    right (subtracting 9 when that gives two digits); the sum must be a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: str) -> bool:
    return luhn_ok(re.sub(r"\D", "", match))


def _is_ipv6(match: str) -> bool:
    # subtle: slices such as a[1:2:3] and times such as 10:30:00 match the pattern but are not
    # valid addresses; "::1"-like strings are valid but too short to tell from slice syntax.
    if sum(1 for group in match.split(":") if group) < 3:
        return False
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return True


def _looks_like_phone(match: str) -> bool:
    """The digit groups of a candidate make a phone number? International numbers (+44 ...) are
    taken as written; national ones need 10-15 digits in at most four groups of 2-8 digits (a
    leading 1, the US trunk prefix, aside) ending in a group of 3 or more (1-800-555-0199,
    (555) 123-4567, 07700 900123), or the French 01 23 45 67 89. That leaves year ranges with a
    number after them (1940-1944 17), lottery numbers (4 8 15 16 23 42) and decimals alone."""
    groups = re.findall(r"\d+", match)
    digits = sum(len(g) for g in groups)
    if match.startswith("+"):
        return 8 <= digits <= 15
    if len(groups) == 1:  # one unbroken run: only a national number with its trunk 0 (09061701461)
        return match.startswith("0") and 10 <= digits <= 12
    if not 10 <= digits <= 15:
        return False
    if len(groups) >= 5:
        return match.startswith("0") and all(len(g) == 2 for g in groups)
    if len(groups) == 2 and not match.startswith(("0", "(")):
        return False  # two groups need a trunk 0 or an (area): 33471-90901 is a part number
    if "." in match and not all(2 <= len(g) <= 4 for g in groups):
        return False  # 555.123.4567, never 3.14159265
    inner = groups[1:] if groups[0] == "1" else groups
    return all(2 <= len(g) <= 8 for g in inner) and len(groups[-1]) >= 3


# kind -> [(pattern, check on the match or None)], tried in order
_PATTERNS = {
    "email": [(_EMAIL, None)],
    "card": [(_CARD, _is_card)],
    "ip": [(_IPV4, None), (_IPV6, _is_ipv6)],
    "phone": [(_PHONE, _looks_like_phone)],
}


def redact(text: str, kinds: tuple[str, ...] = PII_KINDS) -> tuple[str, dict[str, tuple[int, int]]]:
    """Replace personal data with typed placeholders; returns the text and, per kind found,
    (number of matches, characters replaced)."""
    found: dict[str, tuple[int, int]] = {}
    for kind in PII_KINDS:
        if kind not in kinds or not _HINTS[kind].search(text):
            continue
        placeholder, counts = f"[{kind.upper()}]", [0, 0]

        def replace(m: re.Match, accept) -> str:
            if accept is not None and not accept(m.group(0)):
                return m.group(0)
            counts[0] += 1
            counts[1] += len(m.group(0))
            return placeholder

        for pattern, accept in _PATTERNS[kind]:
            text = pattern.sub(lambda m: replace(m, accept), text)
        if counts[0]:
            found[kind] = (counts[0], counts[1])
    return text, found


# ---------------------------------------------------------------------------------------------
# quality

_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_ASCII_SPACE = b" \t\n\r\x0b\x0c"


def letter_share(text: str) -> float:
    """Letters (any script) as a share of the characters that are not whitespace."""
    if text.isascii():  # the common case, many times faster than the general one
        raw = text.encode("ascii")
        visible = len(raw.translate(None, _ASCII_SPACE))
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    else:
        visible = len(text) - sum(map(str.isspace, text))
        letters = sum(map(str.isalpha, text))
    return letters / visible if visible else 0.0


def repeated_line_share(text: str) -> float:
    """The share of non-blank lines that repeat an earlier line of the same document."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    return 1.0 - len(set(lines)) / len(lines) if len(lines) > 1 else 0.0


def quality_problem(text: str, config: CleanConfig) -> tuple[str, str | None] | None:
    """None for a document worth keeping, else (reason, detail): ("empty", None),
    ("too_short", None), ("low_quality", "letter_share" | "repeated_lines")."""
    if not text.strip():
        return "empty", None
    if len(text) < config.min_chars:
        return "too_short", None
    if letter_share(text) < config.min_letter_share:
        return "low_quality", "letter_share"
    if repeated_line_share(text) > config.max_repeated_line_share:
        return "low_quality", "repeated_lines"
    return None
