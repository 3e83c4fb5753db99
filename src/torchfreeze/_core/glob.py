"""Globs over dotted qualified names (``"encoder.*.bias"``, ``"**.bias"``), as full-match regexes."""

from __future__ import annotations

import re

__all__ = ["glob_to_regex"]


def glob_to_regex(pattern: str) -> str:
    """Translate a dotted glob into an equivalent full-match regular expression.

    ``*`` matches within one path segment, ``**`` as a whole segment matches any
    number of segments (zero included), ``?`` one character of a segment.

    Args:
        pattern: a glob over qualified names, such as ``"encoder.*.bias"``.

    Returns:
        A regex string to use with ``re.fullmatch``.

    Example:
        >>> import re
        >>> bool(re.fullmatch(glob_to_regex("**.bias"), "encoder.0.bias"))
        True
        >>> bool(re.fullmatch(glob_to_regex("encoder.*"), "encoder.0.weight"))
        False
    """
    segments: list[str] = []
    for segment in pattern.split("."):
        if not (segment == "**" and segments and segments[-1] == "**"):  # "**.**" is "**"
            segments.append(segment)
    out = ""
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            if not last:  # zero or more whole segments, each with its dot
                out += r"(?:[^.]+\.)*"
            elif index == 0:
                out += r".+"
            else:  # "a.**": "a" itself or anything below it
                out = out[: -len(r"\.")] + r"(?:\..+)?"
            continue
        piece = ""
        i = 0
        while i < len(segment):
            char = segment[i]
            if char == "*":
                piece += r"[^.]*"
            elif char == "?":
                piece += r"[^.]"
            elif char == "[":
                end = segment.find("]", i + 1)
                if end == -1:
                    piece += re.escape(char)
                else:
                    body = segment[i + 1 : end]
                    if body.startswith("!"):
                        body = "^" + body[1:]
                    piece += "[" + body + "]"
                    i = end
            else:
                piece += re.escape(char)
            i += 1
        out += piece + ("" if last else r"\.")
    return out
