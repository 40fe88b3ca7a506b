"""systemd's notify protocol (``sd_notify(3)``): ``KEY=VALUE`` lines in one datagram to ``$NOTIFY_SOCKET``.

``Type=notify``: ``READY=1`` once the socket is bound and every model is loaded (kernel/main.py), ``STATUS=``
with agents, queue and tokens/s, ``WATCHDOG=1`` from the event loop at half ``$WATCHDOG_USEC`` (a hung loop
stops the pings and systemd restarts the service), ``STOPPING=1`` at shutdown.  Without ``$NOTIFY_SOCKET``
(not under systemd, or ``Type=simple``) every call does nothing.  Stdlib only: the protocol is one ``sendto``.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("aiosd.sdnotify")

STATUS_EVERY_S = 2.0  # STATUS= at most this often


class Notifier:
    """The service manager's notify socket, if there is one.  ``env``: the environment to read (the
    kernel's); the variables are left in it, and agents never see them (their environment is scrubbed)."""

    def __init__(self, env=os.environ):
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path  # "@": Linux's abstract namespace
        self.sock = None
        if self.address:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.warning("cannot open a socket to NOTIFY_SOCKET %s: %s", path, exc)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self._next_ping = 0.0
        self._next_status = 0.0

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, **fields) -> bool:
        """Send ``KEY=VALUE`` lines (``READY=1``...); False if there is no socket or systemd did not take it
        (a lost notification is logged, never raised: the kernel serves on)."""
        if self.sock is None:
            return False
        data = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self.sock.sendto(data, self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", ",".join(fields), exc)
            return False

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def tick(self, status) -> None:
        """From the event loop: ``WATCHDOG=1`` when due, and ``STATUS=status()`` every ``STATUS_EVERY_S``."""
        if self.sock is None:
            return
        now = time.monotonic()
        fields = {}
        if self.watchdog_s and now >= self._next_ping:
            fields["WATCHDOG"] = 1
            self._next_ping = now + self.watchdog_s
        if now >= self._next_status:
            fields["STATUS"] = status()
            self._next_status = now + STATUS_EVERY_S
        if fields:
            self.send(**fields)
