"""Data (a dataset's texts, ids and labels) shown on one line of a report or of `predict`'s output.

Such text comes from wherever the data came from. Printed as it is, a line break in it splits the
report's line (and ``str.splitlines()``, which a script reading the output may use, splits at more
than ``\\n``: vertical tab, form feed, NEL, U+2028, ...), and a control character reaches the
terminal: an escape sequence (``ESC [ 31 m``) recolours it, moves the cursor or sets its title.
`one_line` writes the breaks as spaces or as escapes, and every other control character escaped.
"""

from __future__ import annotations

# what str.splitlines() splits at, besides \r\n
BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# C0 and C1 controls and DEL; and the bidirectional embeddings, overrides and isolates, which reorder what follows
# them on the screen (U+202E shows "abc" as "cba")
_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(code: int) -> str:
    char = chr(code)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


_AS_ESCAPES = str.maketrans({code: _escaped(code) for code in (*_CONTROLS, 0x2028, 0x2029)})
_AS_SPACES = str.maketrans({**{code: _escaped(code) for code in _CONTROLS}, **{ord(c): " " for c in BREAKS + "\t"}})


def one_line(text: str, breaks_as_spaces: bool = False) -> str:
    """`text` on one line, its control characters escaped (``\\x1b``); line breaks and tabs as escapes (``\\n``,
    ``\\t``), or with `breaks_as_spaces` as one space each (a Windows line end, ``\\r\\n``, as one)."""
    if breaks_as_spaces:
        return text.replace("\r\n", " ").translate(_AS_SPACES)
    return text.translate(_AS_ESCAPES)


# Characters of a text shown in a W&B table (a dataset's samples, the misclassified rows). A table holds each text
# whole in the run's files, uploaded at every sync: 100 rows of 1 MB documents are 100 MB per evaluation, for a model
# that reads the first max_length tokens (512 tokens are about 2,000 characters of English).
TABLE_TEXT = 2000


def table_text(text: str | None) -> str | None:
    """`text` for a W&B table cell: its first `TABLE_TEXT` characters, and how many more there are."""
    if text is None or len(text) <= TABLE_TEXT:
        return text
    return f"{text[:TABLE_TEXT]}… [+{len(text) - TABLE_TEXT} characters]"
