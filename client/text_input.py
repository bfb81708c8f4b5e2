"""Where a command line's text comes from: a file, standard input, or the argument itself."""

from __future__ import annotations

import sys
from pathlib import Path


def read_text(argument: str, text_file: Path | None, what: str = "query") -> str:
    """``text_file``'s text if given, else standard input for ``-``, else ``argument``; stripped.

    Raises ``ValueError`` for an empty text and ``OSError`` for an unreadable file. Standard
    input and files are preferred: a command line is visible to every user of the machine."""
    if text_file is not None:
        text = text_file.read_text()
    elif argument == "-":
        if sys.stdin.isatty():
            print(f"{what} (end with Ctrl-D):", file=sys.stderr)
        text = sys.stdin.read()
    else:
        text = argument
    text = text.strip()
    if not text:
        raise ValueError(f"the {what} is empty")
    return text
