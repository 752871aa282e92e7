"""Serving an app for the server tests: uvicorn on a free loopback port, in a thread."""

import contextlib
import threading
import time

import uvicorn


@contextlib.contextmanager
def running(app, **config):
    """Serve ``app`` on a free loopback port in a thread; yield (base URL, uvicorn.Server).

    ``config`` goes to ``uvicorn.Config`` (``log_config=None`` leaves logging alone, so uvicorn's
    own records reach pytest's caplog).
    """
    config = {"log_level": "warning", **config}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not shut down"
