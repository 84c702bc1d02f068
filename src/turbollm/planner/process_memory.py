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
    """Bytes of the file `path` resident in this process, each file page counted once.

    A file mapped twice (two readers of one GGUF in a process) shares its pages, so summing
    the mappings' Rss would count them twice. Instead each mapping's pages are looked up in
    /proc/self/pagemap (bit 63: present; readable without privileges) and marked by their
    offset in the file."""
    import os

    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    try:
        n_pages = -(-os.stat(path).st_size // page)
        resident = np.zeros(n_pages, dtype=bool)
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5].rstrip("\n") != path:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                first = int(fields[2], 16) // page  # the mapping's first page in the file
                count = min((end - start) // page, n_pages - first)
                if count <= 0:
                    continue
                pagemap.seek(start // page * 8)
                entries = np.frombuffer(pagemap.read(count * 8), dtype=np.uint64)
                resident[first : first + len(entries)] |= (entries >> np.uint64(63)).astype(bool)
    except OSError:
        return None
    return int(resident.sum()) * page


def rss_breakdown() -> str:
    """'RSS X (anonymous Y, file-backed Z)': file-backed pages are the mmapped weights, shared
    with the page cache; anonymous pages are what the process allocated itself."""
    anon, file = _status_kib("RssAnon"), _status_kib("RssFile")
    if anon is None or file is None:
        return f"RSS {mib(rss_bytes())}"
    return f"RSS {mib(rss_bytes())} (anonymous {mib(anon * 1024)}, file-backed {mib(file * 1024)})"


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"
