"""The sweep's content-addressed cache: folders named by the hash of everything that made them.

``models/`` (trained and exported models), ``builds/`` (a cell's model: PTQ/QAT/fp16 output, its
ranges and report) and ``cells/`` (a build evaluated and timed). An entry is written under a
temporary name and renamed into place when complete, so a killed sweep leaves at most a stale
temporary folder (removed on the next run), never a half-written entry.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qtool.artifacts import write_json

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1
"""Bumped when what an entry holds changes meaning; part of every key."""
ENTRY_FILE = "entry.json"
_TMP_PREFIX = ".tmp-"


_ROOT = Path(__file__).resolve().parents[2]  # holds the qtool and calibrators packages
PRESENTATION = ("qtool/report", "qtool/commands", "qtool/cli.py")
"""Code that only shows results; changing it does not invalidate cache entries."""


@functools.lru_cache(maxsize=8)
def code_fingerprint(parts: tuple[str, ...] = ("qtool", "calibrators"), skip: tuple[str, ...] = PRESENTATION) -> str:
    """SHA-256 (16 hex digits) of the Python sources under ``parts`` (paths relative to the repository).

    Part of the keys, so entries made by other code (an edited calibrator, policy, metric ...) are
    not reused; files under ``skip`` do not count.
    """
    h = hashlib.sha256()
    for part in parts:
        base = _ROOT / part
        for f in sorted([base] if base.is_file() else base.rglob("*.py")):
            rel = f.relative_to(_ROOT).as_posix()
            if not any(rel == s or rel.startswith(s + "/") for s in skip):
                h.update(rel.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def content_key(payload: dict[str, Any]) -> str:
    """SHA-256 (24 hex digits) of ``payload`` as canonical JSON, with the cache schema mixed in."""
    text = json.dumps({"cache_schema": CACHE_SCHEMA, **payload}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class Cache:
    """A cache folder with ``models/``, ``builds/`` and ``cells/`` entries."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, kind: str, key: str) -> Path:
        """The folder of entry ``key`` of ``kind`` (it may not exist)."""
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        """True when the entry is complete (renamed into place with its ``entry.json``)."""
        return (self.entry(kind, key) / ENTRY_FILE).is_file()

    def read_entry(self, kind: str, key: str) -> dict[str, Any]:
        """The ``entry.json`` of a complete entry."""
        return json.loads((self.entry(kind, key) / ENTRY_FILE).read_text())

    @contextmanager
    def writing(self, kind: str, key: str, payload: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield a fresh temporary folder; on success write ``entry.json`` and rename it onto the entry.

        If another process completed the same entry meanwhile, its copy is kept and this one dropped
        (both were made from the same inputs). On an exception the temporary folder is removed.
        """
        final = self.entry(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{_TMP_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(3)}"
        tmp.mkdir()
        t0 = time.perf_counter()
        try:
            yield tmp
            _write_entry(tmp, kind, key, payload, time.perf_counter() - t0)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.has(kind, key):
                    raise
                log.info("%s/%s was completed by another process; keeping that copy", kind, key)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clean_stale(self) -> list[Path]:
        """Remove temporary folders left by killed processes (their pid is gone); return what was removed."""
        removed = []
        for kind_dir in (self.root / k for k in ("models", "builds", "cells")):
            if not kind_dir.is_dir():
                continue
            for p in kind_dir.glob(f"{_TMP_PREFIX}*"):
                try:
                    pid = int(p.name.rsplit("-", 2)[1])
                except (IndexError, ValueError):
                    continue
                if not _pid_alive(pid):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        if removed:
            log.info("removed %d unfinished cache entries left by killed runs", len(removed))
        return removed

    @contextmanager
    def partial(self, kind: str, key: str) -> Iterator[Path]:
        """A stable, exclusively locked work folder for a resumable entry (training resumes from it).

        The lock (``flock``) is released when the process ends, however it ends. Callers check
        :meth:`has` inside (another process may have finished the entry while this one waited) and
        rename the folder with :meth:`finish` once complete.
        """
        work = self.root / kind / f".partial-{key}"
        work.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root / kind / f".partial-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process works on the same entry
            if not self.has(kind, key):
                work.mkdir(exist_ok=True)
            yield work

    def finish(self, kind: str, key: str, work: Path, payload: dict[str, Any] | None = None) -> Path:
        """Mark a :meth:`partial` folder complete and rename it onto the entry; return the entry."""
        _write_entry(work, kind, key, payload, None)
        final = self.entry(kind, key)
        os.rename(work, final)
        return final


def _write_entry(folder: Path, kind: str, key: str, payload: dict[str, Any] | None, seconds: float | None) -> None:
    """The ``entry.json`` that marks an entry complete: what it is, when and from what it was made."""
    write_json(folder / ENTRY_FILE, {"kind": kind, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "pid": os.getpid(), "seconds": None if seconds is None else round(seconds, 3),
                                     "inputs": payload or {}})
