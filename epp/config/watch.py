"""Watches a config file and hands each new version to a reload function.

Polls the file's stat signature (mtime, size, inode) like the manifest watcher does: it
works on every filesystem and in Kubernetes ConfigMap volumes, whose files change by a
symlink swap that inotify-based watchers often miss. When the signature changes the file
is read and, if its text differs from the last text handed over, passed to `reload`
(`Picker.reload_config`), which validates it, swaps it in or keeps the old config, and
reports the outcome. A file that cannot be read (mid-swap, deleted) keeps the running
config; that is logged once per outage.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from epp.config.document import ConfigError

logger = logging.getLogger(__name__)

Signature = tuple[int, int, int]


class ConfigFileWatcher:
    def __init__(
        self,
        path: Path,
        reload: Callable[[str | None, str], None],
        *,
        poll_interval_s: float = 0.5,
        loaded_text: str | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.path = path
        self._reload = reload
        self._poll_interval_s = poll_interval_s
        self._signature = self._stat()
        self._text = loaded_text
        self._unreadable = False
        self.checks_with_change = 0

    def _stat(self) -> Signature | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> bool:
        """Reload if the file changed; True when a new text was handed to `reload` and it
        was accepted."""
        signature = self._stat()
        if signature == self._signature:
            return False
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            if not self._unreadable:
                logger.warning(
                    "config file %s cannot be read (%s); keeping the running config",
                    self.path,
                    getattr(error, "strerror", None) or error,
                )
            self._unreadable = True
            return False
        self._unreadable = False
        self._signature = signature
        if text == self._text:
            return False
        self._text = text
        self.checks_with_change += 1
        try:
            self._reload(text, f"--config-file {self.path}")
        except ConfigError:
            return False  # reported by reload(); the old config keeps serving
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                self.check()
            except Exception:  # the watcher must outlive any one bad reload
                logger.exception("config file %s: reload failed unexpectedly", self.path)
