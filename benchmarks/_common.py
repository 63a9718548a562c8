"""Shared by the benchmark scripts: print a report and optionally write it to a file; a process's
resident memory and its peak (Linux /proc)."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], out: Path | None) -> str:
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)
    return text


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> int:
    """Reset the process's peak resident memory to what it holds now (Linux: clear_refs 5); -> that, in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS")
