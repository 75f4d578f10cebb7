"""Text that is safe to put on a terminal. Whatever the control plane or an agent
answers may hold strings an attacker chose (a request path, the ``iss`` of a refused
token, an agent's name, a policy message); printed as they are, a terminal would obey
the escape sequences among them (clear the screen, rewrite earlier lines, set the
window title) and bidi overrides would make text read in another order than it is.

:func:`printable` shows every character that is not printable (``str.isprintable``:
the C0 and C1 controls, DEL, format characters such as the bidi overrides and
zero-width characters, line and paragraph separators, surrogates, spaces other than
the ASCII one, unassigned code points) as a visible escape, ``\\x1b``, ``\\u202e``, ``\\n``,
so it can be read and never acts. Markup is another matter: the CLI prints data as
Rich ``Text``, which interprets none (``cli/_common.py``)."""

from __future__ import annotations

import logging

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: object) -> str:
    """``value`` as text with every character that is not printable escaped visibly;
    ``None`` is the empty string. One line in, one line out: a newline is shown as
    ``\\n``, so data can never start a line of its own."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def printable_lines(text: str) -> str:
    """A multi-line text made printable line by line (the newlines that separate its
    lines stay; every other character that is not printable is escaped)."""
    return "\n".join(printable(line) for line in text.split("\n"))


class PrintableFormatter(logging.Formatter):
    """A log formatter whose every record is one printable line: messages carry what
    the network answered (an error description, a peer's name)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))
