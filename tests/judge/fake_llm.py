"""A local fake of the OpenAI (/v1/chat/completions) and Anthropic (/v1/messages) HTTP APIs.

Test double for the paid LLM APIs only: the real SDKs are pointed at it with base_url. Each
request takes the next scripted Reply (a valid verdict, a malformed one, 429 with Retry-After,
500, 401, insufficient_quota, a dropped connection, a slow reply); with nothing scripted it
answers a valid verdict whose score depends on the criterion named in the prompt. Every request
is recorded (body, arrival and finish times, requests in flight at arrival).

Run alone (for the bench): python -m tests.judge.fake_llm --latency-s 0.1 (prints its port).
"""

import argparse
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_SCORES = {"helpfulness": 9, "accuracy": 7, "clarity": 6, "safety": 7,
                  "completeness": 8}
CRITERION_PATTERN = re.compile(r"CRITERION: (\S+)")


@dataclass
class Reply:
    """One scripted answer. verdict None: the per-criterion default verdict."""

    status: int = 200
    verdict: dict[str, Any] | None = None
    text: str | None = None  # raw reply text instead of a verdict (malformed replies)
    error: dict[str, Any] | None = None  # error body for status >= 400
    headers: dict[str, str] = field(default_factory=dict)
    latency_s: float | None = None
    drop: bool = False  # close the connection without answering


def ok(score: int = 8, reasoning: str = "fine", confidence: float = 0.9) -> Reply:
    return Reply(verdict={"score": score, "reasoning": reasoning, "confidence": confidence})


def malformed(text: str = "I think it is pretty good overall.") -> Reply:
    return Reply(text=text)


def rate_limited(retry_after_s: float | None = None, millis: bool = False) -> Reply:
    headers = {}
    if retry_after_s is not None:
        headers = ({"retry-after-ms": str(int(retry_after_s * 1000))} if millis
                   else {"retry-after": str(retry_after_s)})
    return Reply(status=429, headers=headers, error={
        "message": "Rate limit reached", "type": "rate_limit_error",
        "code": "rate_limit_exceeded"})


def server_error() -> Reply:
    return Reply(status=500, error={"message": "internal", "type": "api_error", "code": None})


def unauthorized() -> Reply:
    return Reply(status=401, error={"message": "Incorrect API key provided",
                                    "type": "authentication_error", "code": "invalid_api_key"})


def insufficient_quota() -> Reply:
    return Reply(status=429, error={"message": "You exceeded your current quota",
                                    "type": "insufficient_quota", "code": "insufficient_quota"})


def billing_error() -> Reply:
    """Anthropic's answer when the organisation has no credit left."""
    return Reply(status=400, error={"message": "Your credit balance is too low",
                                    "type": "billing_error", "code": None})


def dropped() -> Reply:
    return Reply(drop=True)


@dataclass
class Recorded:
    """One request as the server saw it."""

    path: str
    body: dict[str, Any]
    arrived: float
    in_flight: int
    status: int = 0
    finished: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased

    @property
    def text(self) -> str:
        """System prompt and every message's content, concatenated."""
        parts = [self.body.get("system") or ""]
        parts += [m.get("content") or "" for m in self.body.get("messages", [])]
        return "\n".join(p if isinstance(p, str) else json.dumps(p) for p in parts)

    @property
    def criterion(self) -> str | None:
        match = CRITERION_PATTERN.search(self.text)
        return match.group(1) if match else None


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops the SYNs of a burst of new connections, which the
    # client then retries after a second: a bench at concurrency 32 would measure that.
    request_queue_size = 1024
    daemon_threads = True


class FakeLlmServer:
    """ThreadingHTTPServer on 127.0.0.1 speaking both wire formats, with usage figures."""

    def __init__(self, latency_s: float = 0.0, scores: dict[str, int] | None = None,
                 input_tokens: int = 500, output_tokens: int = 100) -> None:
        self.latency_s = latency_s
        self.scores = dict(DEFAULT_SCORES if scores is None else scores)
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.requests: list[Recorded] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeLlmServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()

    def billed_usd(self, input_per_mtok: float, output_per_mtok: float) -> float:
        """What the answered (200) requests would have been billed at these prices."""
        with self._lock:
            answered = sum(1 for r in self.requests if r.status == 200)
        return answered * (self.input_tokens * input_per_mtok
                           + self.output_tokens * output_per_mtok) / 1_000_000

    def _begin(self, path: str, body: dict[str, Any],
               headers: dict[str, str]) -> tuple[Recorded, Reply | None]:
        with self._lock:
            self._in_flight += 1
            record = Recorded(path, body, time.monotonic(), self._in_flight, headers=headers)
            self.requests.append(record)
            return record, (self._script.popleft() if self._script else None)

    def _end(self, record: Recorded, status: int) -> None:
        with self._lock:
            self._in_flight -= 1
            record.status, record.finished = status, time.monotonic()

    def default_reply(self, record: Recorded) -> Reply:
        return ok(score=self.scores.get(record.criterion or "", 8),
                  reasoning=f"judged {record.criterion}")


class EchoLlmServer(FakeLlmServer):
    """The fake as a model being evaluated: with nothing scripted, a plain chat completion
    whose text is ECHO_PREFIX + the last user message (so a test knows what was generated
    for which prompt)."""

    def default_reply(self, record: Recorded) -> Reply:
        users = [m.get("content") for m in record.body.get("messages", [])
                 if m.get("role") == "user"]
        return Reply(text=ECHO_PREFIX + str(users[-1] if users else ""))


ECHO_PREFIX = "echo: "


def _handler_for(server: FakeLlmServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and
        # the client's delayed ACK would add ~40 ms to every reply.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            headers = {name.lower(): value for name, value in self.headers.items()}
            record, reply = server._begin(self.path, body, headers)
            reply = reply or server.default_reply(record)
            time.sleep(server.latency_s if reply.latency_s is None else reply.latency_s)
            if reply.drop:
                server._end(record, 0)
                self.close_connection = True
                return
            status, payload = _payload(server, self.path, body, reply)
            record.status = status  # before the reply: the client may count it at once
            _respond(self, status, payload, reply.headers)
            server._end(record, status)

    return Handler


def _respond(handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
             headers: dict[str, str]) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    for name, value in {"content-type": "application/json", **headers}.items():
        handler.send_header(name, value)
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _payload(server: FakeLlmServer, path: str, body: dict[str, Any],
             reply: Reply) -> tuple[int, dict[str, Any]]:
    anthropic = path.rstrip("/").endswith("/messages")
    if reply.status >= 400:
        if anthropic:
            return reply.status, {"type": "error", "error": {
                "type": reply.error.get("type"), "message": reply.error.get("message")}}
        return reply.status, {"error": reply.error}
    if anthropic:
        return 200, _anthropic_message(server, body, reply)
    return 200, _openai_completion(server, body, reply)


def _openai_completion(server: FakeLlmServer, body: dict[str, Any],
                       reply: Reply) -> dict[str, Any]:
    content = reply.text if reply.text is not None else json.dumps(reply.verdict)
    prompt, completion = server.input_tokens, server.output_tokens
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


def _anthropic_message(server: FakeLlmServer, body: dict[str, Any],
                       reply: Reply) -> dict[str, Any]:
    if reply.text is not None:
        content = [{"type": "text", "text": reply.text}]
    else:
        content = [{"type": "tool_use", "id": "toolu_fake", "name": "record_verdict",
                    "input": reply.verdict}]
    return {"id": "msg_fake", "type": "message", "role": "assistant",
            "model": body.get("model", ""), "content": content,
            "stop_reason": "tool_use" if reply.text is None else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": server.input_tokens,
                      "output_tokens": server.output_tokens}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-s", type=float, default=0.1, help="delay of every reply")
    args = parser.parse_args()
    server = FakeLlmServer(latency_s=args.latency_s).start()
    print(server.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
