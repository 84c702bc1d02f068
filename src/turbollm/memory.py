"""Process memory figures for reports (Linux /proc, with a portable fallback)."""

from __future__ import annotations

import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set size now."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def anonymous_bytes() -> int | None:
    """Resident memory the process allocated itself (not file pages); None where unknown."""
    kib = _status_kib("RssAnon")
    return kib * 1024 if kib is not None else None


def resident_file_bytes(path: str) -> int | None:
    """Bytes of the file `path` mapped and resident in this process (its pages in /proc/self/smaps)."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                    inside = len(head) == 6 and head[5].rstrip("\n") == path
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total


def rss_breakdown() -> str:
    """'RSS X (anonymous Y, file-backed Z)': file-backed pages are the mmapped weights, shared
    with the page cache; anonymous pages are what the process allocated itself."""
    anon, file = _status_kib("RssAnon"), _status_kib("RssFile")
    if anon is None or file is None:
        return f"RSS {mib(rss_bytes())}"
    return f"RSS {mib(rss_bytes())} (anonymous {mib(anon * 1024)}, file-backed {mib(file * 1024)})"


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"
