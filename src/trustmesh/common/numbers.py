"""Numbers that arrive as text from the network: query parameters (``since``,
``after``, ``start``, ``end``, ``index``, ``size``, ``first``, ``second``, ``limit``),
path parameters (a policy revision), form fields (``lifetime``), headers
(``Last-Event-ID``, ``Content-Length``) and identifiers that end in one (SSF ``jti``).

Python's ``int()`` and ``str.isdigit()`` accept far more than decimal digits: ``int``
takes ``+7``, `` 7 ``, ``7_0`` and every Unicode decimal digit (``٣`` is 3), and
``isdigit`` also says yes to superscripts and other digits that ``int`` then refuses
(``²``: a 500 where a 400 was due). Here there is one reading: ASCII ``0``-``9`` only,
at least one and at most ``max_digits`` of them (18 by default, so every value fits
in a signed 64-bit column), nothing else around them."""

from __future__ import annotations

from trustmesh.common.errors import InvalidRequest

MAX_DIGITS = 18


def parse_decimal(text: str | None, max_digits: int = MAX_DIGITS) -> int | None:
    """The non-negative integer ``text`` spells in ASCII decimal digits, or ``None``
    for anything else (empty, a sign, spaces, ``_``, other digits, too long)."""
    if text is None or not 0 < len(text) <= max_digits:
        return None
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def require_decimal(text: str | None, name: str, max_digits: int = MAX_DIGITS) -> int:
    """:func:`parse_decimal`, or :class:`InvalidRequest` naming the parameter."""
    value = parse_decimal(text, max_digits)
    if value is None:
        raise InvalidRequest(
            f"{name} must be a non-negative integer of at most {max_digits} ASCII digits (0-9)"
        )
    return value


def require_seconds(text: str | None, name: str, default: float = 0.0) -> float:
    """A duration in seconds as ``S`` or ``S.F`` (ASCII digits, at most 6 before and 3
    after the point), or :class:`InvalidRequest` naming the parameter; ``nan``, ``inf``,
    exponents and signs are refused, not clamped."""
    if text is None or text == "":
        return default
    whole, dot, fraction = text.partition(".")
    seconds = parse_decimal(whole, 6)
    if seconds is None or (dot and parse_decimal(fraction, 3) is None):
        raise InvalidRequest(f"{name} must be a number of seconds such as 25 or 0.5")
    return float(text)
