"""Hot reload: watch the config file and every file it references.

Directories are watched, not files, because Kubernetes updates a mounted ConfigMap or Secret by
swapping a ``..data`` symlink inside the mount directory; a watch on the old file would never fire.
(inotify, not polling: watchfiles' poller compares modification times to the second and misses quick
successive edits.) Events on files the sidecar writes itself (its decision log, its published revocation list) are
ignored; any other event triggers :meth:`Runtime.reload`, which first compares a digest of the
files it read and skips the rebuild when nothing changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

__all__ = ["watch_and_reload"]

_log = structlog.get_logger("agent_authz.watch")


async def watch_and_reload(
    watched: Callable[[], frozenset[Path]],
    reload: Callable[[], bool],
    stop: asyncio.Event,
    *,
    ignore: Callable[[Path], bool] = lambda _: False,
    debounce_ms: int = 50,
) -> None:
    """Reload whenever a watched file's directory changes, until ``stop`` is set.

    Args:
        watched: returns the files to watch (re-read after each reload: the set may change).
        reload: attempts a reload; returns whether a new config is active.
        stop: ends the watch.
        ignore: paths whose changes never matter (files this process writes).
        debounce_ms: how long watchfiles groups events (ms).
    """
    while not stop.is_set():
        files = watched()
        dirs = sorted({str(path.absolute().parent) for path in files})

        def relevant(_: watchfiles.Change, path: str) -> bool:
            return not ignore(Path(path))

        async for _changes in watchfiles.awatch(
            *dirs,
            stop_event=stop,
            debounce=debounce_ms,
            step=20,
            recursive=False,
            ignore_permission_denied=True,
            watch_filter=relevant,
        ):
            try:
                reload()
            except Exception:  # never let the watcher die
                _log.exception("config_reload_crashed")
            if watched() != files:
                break  # re-arm with the new set of directories
