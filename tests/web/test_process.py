"""The web service as a process (`python -m services.web.server`, what `epochlens-web` runs):
start-up failures are one line on stderr, and SIGTERM stops it cleanly (exit 0)."""

import asyncio
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

from tests.e2e.test_stack import free_port
from tests.e2e.test_startup import bare_env, one_line_failure

COMMAND = [sys.executable, "-m", "services.web.server"]


def test_invalid_setting_is_one_configuration_error_line(tmp_path):
    line = one_line_failure(COMMAND, bare_env(EPOCHLENS_WEB_PORT="eighty"), tmp_path, 2)
    assert line.startswith("configuration error: EPOCHLENS_WEB_PORT: input should be a valid "
                           "integer")


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_failure(COMMAND, bare_env(EPOCHLENS_WEB_PORT=str(port)), tmp_path, 1)
    assert line == f"web: port {port} on 127.0.0.1 is already in use"


def health_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


async def test_sigterm_stops_the_process_cleanly(tmp_path, stack):
    port = free_port()
    env = bare_env(EPOCHLENS_WEB_PORT=str(port), EPOCHLENS_WEB_QUERY_ADDRESS=stack.query.address,
                   EPOCHLENS_WEB_SHUTDOWN_GRACE_S="1")
    process = await asyncio.create_subprocess_exec(
        *COMMAND, env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{port}/healthz"
        while await asyncio.to_thread(health_status, url) != 200:
            assert process.returncode is None, await process.communicate()
            assert time.monotonic() < deadline, "the web service did not become healthy"
            await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr
    text = stderr.decode()
    assert "stopping (grace 1.0s)" in text and "Traceback" not in text


def test_listening_socket_is_tcp_so_responses_are_not_delayed_by_nagle():
    """asyncio sets TCP_NODELAY on accepted connections only when the listening socket's
    proto is IPPROTO_TCP; with proto 0 every response waited about 40 ms (headers and body
    are two writes)."""
    from services.web.server import _bind
    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
