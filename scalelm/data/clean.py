"""Normalise a document's text: Unicode NFC, control characters out, whitespace made regular.

Spaces inside a line are kept as they are (code and verse indent with them); what changes is
exotic whitespace (no-break, em and ideographic spaces become ' '), line endings (all become
'\\n'), trailing spaces (removed), and runs of blank lines (at most one kept).
"""

from __future__ import annotations

import re
import unicodedata

# Every line break Unicode knows, including the lone CR, VT, FF, NEL and the line/paragraph separators.
_NEWLINES = re.compile(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
# C0/C1 control characters except tab and newline, plus invisible characters that carry no text:
# zero-width space, word joiner, soft hyphen and the byte-order mark. ZWJ/ZWNJ stay (scripts and emoji need them).
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\u2060\u00ad\ufeff]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """The normalised form of `text`; documents are compared and deduplicated in this form."""
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()
