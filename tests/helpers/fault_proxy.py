"""A fault-injecting HTTP proxy between an S3 client and the test server, on 127.0.0.1.

Every request is forwarded to the server unless the proxy's ``rule`` picks a fault for
it. ``rule(method, path_and_query) -> fault or None`` is asked once per request;
faults are what a real network and a busy store do:

* ``"slowdown"``: answer 503 ``SlowDown`` without forwarding (throttling);
* ``"drop"``: close the connection without forwarding or answering;
* ``"drop_after"``: forward, then close without answering (the outcome is unknown to
  the client: the server applied the request);
* ``"truncate"``: forward, then send the response's headers and half of its body;
* ``"stall"``: wait ``stall_seconds`` before forwarding (past the client's timeout);
* ``"stall_body"``: forward, send the headers and half of the body, then wait
  ``stall_seconds`` and close (a transfer that stops in the middle).

``proxy.seen`` records ``(method, path, fault)`` for every request, for assertions.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse
from collections.abc import Callable

Rule = Callable[[str, str], "str | None"]

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """The proxy; ``endpoint`` is its URL. Stop it with :meth:`stop`."""

    def __init__(self, upstream: str, rule: Rule | None = None, stall_seconds: float = 3.0) -> None:
        target = urllib.parse.urlsplit(upstream)
        self.rule: Rule = rule or (lambda method, path: None)
        self.stall_seconds = stall_seconds
        self.seen: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    fault = proxy.rule(self.command, self.path)
                    proxy.seen.append((self.command, self.path, fault))
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(_SLOWDOWN)
                    return
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                data = response.read()
                upstream_conn.close()
                if fault == "drop_after":
                    self.close_connection = True
                    return
                self.send_response(response.status)
                head = self.command == "HEAD"  # its Content-Length is the object's
                for k, v in response.getheaders():
                    if k.lower() in ("connection", "transfer-encoding"):
                        continue
                    if k.lower() == "content-length" and not head:
                        continue
                    self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault in ("truncate", "stall_body"):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if fault == "stall_body":
                        time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()


def nth(method: str, fragment: str, fault: str, times: int = 1, skip: int = 0) -> Rule:
    """A rule: the requests of ``method`` whose path contains ``fragment`` get ``fault``,
    ``times`` of them, after the first ``skip`` such requests."""
    count = 0

    def rule(m: str, path: str) -> str | None:
        nonlocal count
        if m != method or fragment not in path:
            return None
        count += 1
        return fault if skip < count <= skip + times else None

    return rule
