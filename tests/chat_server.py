"""A local OpenAI-compatible chat server for tests (`/v1/chat/completions` on 127.0.0.1, an ephemeral port).

`script` answers the next requests (status and payload), then `reply` translates the user's text. Every request's
body and headers are kept. Importable by tests: `from chat_server import ChatServer, pseudo_french`.

`ChatServer(reply=translator)` with `translator` (a deterministic stand-in for a translator in any of ja/fr/es, the
language read from the system prompt) serves the paper-shaped end-to-end test: a 135M model cannot translate well
enough to pass the translate contract (benchmarks/RESULTS.md), and the test needs translations that do, and some
that do not.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# fmt: off
FRENCH = [
    "le", "la", "les", "un", "une", "de", "du", "et", "est", "dans", "avec", "pour", "sur", "pomme", "chat", "maison",
    "nous", "avons", "trouvé", "très", "bien", "alors", "donc",
]
# fmt: on


WORDS = {
    "fr": FRENCH,
    "es": ["el", "la", "los", "de", "del", "que", "en", "con", "para", "por", "manzana", "gato", "casa", "tenemos",
           "entonces", "muy", "bien", "es", "una", "sobre"],
    "ja": ["りんご", "ねこ", "いえ", "です", "ます", "これは", "それから", "ともだち", "かいます", "あります", "ので"],
}  # fmt: skip
LANGUAGES = {"French": "fr", "Spanish": "es", "Japanese": "ja"}


def pseudo_translation(text: str, lang: str) -> str:
    """A deterministic stand-in for a translator: every English word becomes a word of `lang`, markers stay."""
    words = WORDS[lang]
    return re.sub(r"[A-Za-z]+", lambda m: words[sum(map(ord, m.group())) % len(words)], text)


def pseudo_french(text: str) -> str:
    return pseudo_translation(text, "fr")


def translator(body: dict) -> str:
    """The pseudo translation into the language the system prompt asks for; a text about Mia loses its first
    marker, whatever the attempt, so its record is quarantined."""
    system = body["messages"][0]["content"]
    lang = next(code for name, code in LANGUAGES.items() if f"into {name}" in system)
    text = body["messages"][-1]["content"]
    reply = pseudo_translation(text, lang)
    return re.sub(r"⟦\d+⟧", "", reply, count=1) if "Mia" in text else reply


def completion(text: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-translator",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
    }


Action = Callable[[dict], tuple[int, object]]


def status(code: int, payload: object = None) -> Action:
    return lambda body: (code, payload if payload is not None else {"error": {"message": f"status {code}"}})


def sleepy(seconds: float) -> Action:
    def act(body: dict) -> tuple[int, object]:
        time.sleep(seconds)
        return 200, None

    return act


class ChatServer:
    def __init__(self, reply: Callable[[dict], str] | None = None) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.script: list[Action] = []
        self.reply: Callable[[str], str] = pseudo_french
        # Replies computed from the whole request (`translator`), instead of from the user's text (`reply`).
        self.reply_to_request = reply
        self.block_at: int | None = None  # hang on this request number (1-based), for crash tests
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    number = len(server.requests)
                    action = server.script.pop(0) if server.script else None
                if server.block_at == number:
                    server.blocked.set()
                    server.release.wait(30)
                    return
                status_code, payload = action(body) if action else (200, None)
                if payload is None and server.reply_to_request is not None:
                    payload = completion(server.reply_to_request(body))
                elif payload is None:
                    payload = completion(server.reply(body["messages"][-1]["content"]))
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status_code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status_code == 429:
                        self.send_header("Retry-After-Ms", "10")
                    if status_code >= 500:
                        self.send_header("Retry-After-Ms", "10")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def texts(self) -> list[str]:
        return [request["messages"][-1]["content"] for request in self.requests]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
