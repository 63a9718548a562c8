"""LRS2/LRS3 `Text:` files (formats.md): transcript after `Text:  `, optional word table."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from ..errors import MavsrError

_BRACES = re.compile(r"[{}]")


def clean_transcript(text: str) -> str:
    """NFC-normalised, without control or invisible format characters (zero-width spaces, BOMs,
    bells), whitespace collapsed. Letters of any script are kept: the LLM's tokenizer decides."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text
                   if unicodedata.category(c) not in ("Cf", "Co", "Cn", "Cs"))
    return " ".join(text.split())


def format_text(text: str, words: list[tuple[str, float, float]], conf: int = 3) -> str:
    lines = [f"Text:  {text.upper()}", f"Conf:  {conf}", "", "WORD START END ASDSCORE"]
    lines += [f"{w.upper()} {s:.2f} {e:.2f} 1.0" for w, s, e in words]
    return "\n".join(lines) + "\n"


def parse_text(path: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """Return (transcript with noise braces stripped, word table [(word, start, end)])."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MavsrError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise MavsrError(f"{path}: cannot read ({e.strerror})") from None
    lines = raw.splitlines()
    if not lines or not lines[0].startswith("Text:"):
        raise MavsrError(f"{path}: first line does not start with 'Text:'")
    text = clean_transcript(_BRACES.sub("", lines[0][len("Text:"):]))
    if not text:
        raise MavsrError(f"{path}: empty transcript")
    words = []
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("WORD START END"))
    except StopIteration:
        return text, words
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) >= 3:
            try:
                words.append((_BRACES.sub("", parts[0]), float(parts[1]), float(parts[2])))
            except ValueError:
                raise MavsrError(f"{path}: bad word-table line {line!r}") from None
    return text, words
