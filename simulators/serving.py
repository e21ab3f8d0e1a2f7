"""What every loopback simulator server shares: serving in a background thread, stopping, `with`."""

from __future__ import annotations

import socketserver
import threading
from typing import Self


class ServedInBackground:
    """`start()` serves `self._server` in a daemon thread; `stop()` sets `self._stopping` first, which ends the
    answers a simulator holds open (hangs, stalls, trickles), then shuts the server down. Usable as `with`."""

    _server: socketserver.BaseServer
    _stopping: threading.Event
    _thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
