"""uvicorn around the app, with a graceful shutdown: on SIGINT/SIGTERM (or stop()) it stops accepting, gives
in-flight requests grace_s seconds to finish, then ends the rest cleanly (a stream gets an error event and
[DONE]) and stops the engine loop. In the foreground for `lanner serve`, or on a thread (tests, notebooks)."""
import socket
import threading
import time

import uvicorn

from lanner.server.async_engine import AsyncEngine


class Server(uvicorn.Server):
    def __init__(self, app, engine: AsyncEngine, grace_s: float = 30.0, **config):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=grace_s + 5, **config))
        self.engine, self.grace_s = engine, grace_s

    def handle_exit(self, sig, frame) -> None:
        self.begin_shutdown()
        super().handle_exit(sig, frame)

    def begin_shutdown(self, grace_s: float | None = None) -> None:
        loop = self.engine.loop
        if loop is not None and not self.should_exit and not loop.is_closed():
            loop.call_soon_threadsafe(self.engine.end_all_after, self.grace_s if grace_s is None else grace_s)


class BackgroundServer:
    """The server on a thread of this process, on an already bound loopback socket (port 0: any free one)."""

    def __init__(self, app, engine: AsyncEngine, host: str = "127.0.0.1", port: int = 0, grace_s: float = 30.0,
                 log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.engine = engine
        self.server = Server(app, engine, grace_s, log_level=log_level, access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="lanner-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, grace_s: float | None = None, timeout: float = 120.0) -> None:
        """What SIGINT/SIGTERM do."""
        self.server.begin_shutdown(grace_s)
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
