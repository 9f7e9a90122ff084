"""A small reference server that hosts any reward file, or a generative judge, over the protocol in
:mod:`rlhf_ray.rewards.http`.

Run it next to the data a reward needs (a sandbox, a judge model, a database), then point the
trainer at it with ``reward.functions: [http://host:8000/score]``::

    python -m rlhf_ray.rewards.server --reward examples/rewards/length_penalty.py --port 8000
    python -m rlhf_ray.rewards.server --reward my_rewards.py:code_reward --host 0.0.0.0 --port 8000
    python -m rlhf_ray.rewards.server --judge examples/judges/tiny_cpu.yaml --port 8000

``--judge`` takes a YAML file holding a ``reward.judge`` section (the schema and checks of a training config's, errors
naming ``reward.judge.<key>`` and the file; or a training config, whose judge is served) and runs that judge model on
a vLLM engine in this process (``rewards/judge_engine.py``): each request's samples are judged in one generate call
and scored as in training, ``weight * (clip(s) - min_score) / (max_score - min_score)``; a verdict without a score
answers 500 naming the sample (``on_unparsable: error``) or scores ``default_score`` (``default``). The port is bound
before the model loads; "serving ..." is logged once it can score.

``POST`` (any path) scores a batch; ``GET /health`` answers ``{"status": "ok", "reward": name}``.
A POST must carry ``Authorization: Bearer <token>`` (else 401), on every interface, loopback included (any local
user can reach a loopback port). The token comes from ``--token-file`` (an existing file), else
``$RLHF_RAY_REWARD_TOKEN``; with neither, the server generates one, prints it once on stdout as
``RLHF_RAY_REWARD_TOKEN=<token>`` and, given a ``--token-file`` that does not exist yet, writes it there (mode
0600). The trainer sends it from the variable ``reward.http_token_env`` names. Bodies are capped
(``--max-body-mb``), a client that stops sending is dropped after ``--read-timeout-s``, and at most
``--max-concurrent`` requests are served at once (the next ones wait in the listen queue).
A request that is not a valid batch gets a 400, a reward that fails gets a 500 naming the function and
what went wrong (type, sample index), so the trainer's error names the remote function too; prompts,
responses, file paths and the raised message stay in the server's log. Requests are
served on threads (``ThreadingHTTPServer``); the reward function must tolerate concurrent calls (the judge's engine
takes one batch at a time behind a lock, each waiting at most ``--timeout-s``).
Run it with ``-m`` as above: started as ``python rlhf_ray/rewards/server.py``, the ``http.py``
beside it would shadow the standard library's ``http`` package.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import secrets
import sys
import threading
from pathlib import Path
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

from rlhf_ray.rewards.base import RewardError, RewardSource, checked_scores
from rlhf_ray.rewards.http import TOKEN_ENV

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Largest request accepted by default (a batch of 64 long responses is a few MB)."""
READ_TIMEOUT_S = 60.0
"""A client that sends nothing for this long is dropped (it would otherwise hold a thread forever)."""
MAX_CONCURRENT = 16
"""Requests served at once by default."""


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``max_concurrent`` request threads alive."""

    daemon_threads = True  # an abandoned request thread must not block shutdown

    def __init__(self, address: tuple[str, int], handler: type, max_concurrent: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # the accept loop waits for a free slot: back-pressure, not unbounded threads
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(source: RewardSource, timeout_s: float, token: str, host: str = "127.0.0.1", port: int = 0,
                max_body_bytes: int = MAX_BODY_BYTES, read_timeout_s: float = READ_TIMEOUT_S,
                max_concurrent: int = MAX_CONCURRENT) -> RewardServer:
    """A bound (not yet serving) server scoring with ``source``, ``timeout_s`` per batch; ``port=0`` picks a free port.

    A POST must carry ``Authorization: Bearer <token>`` (``token`` is required: there is no open mode). Serve with
    ``serve_forever()`` (in a thread if needed); the bound port is ``server.server_address[1]``; stop with
    ``shutdown()`` then ``server_close()``.
    """
    if not token or not token.strip():
        raise ValueError("the reward server needs a bearer token (resolve_token makes one)")
    handler = type("RewardHandler", (_RewardHandler,), {
        "source": source, "timeout_s": timeout_s, "token": token, "max_body_bytes": max_body_bytes,
        "timeout": read_timeout_s})
    return RewardServer((host, port), handler, max_concurrent)


def serve_in_thread(server: ThreadingHTTPServer, poll_interval: float = 0.05) -> threading.Thread:
    """Start ``server.serve_forever()`` in a daemon thread and return the thread (tests, notebooks).

    ``shutdown()`` waits up to ``poll_interval`` for the loop to notice; http.server's 0.5 s default
    would make every start/stop in a test suite cost half a second.
    """
    t = threading.Thread(target=server.serve_forever, args=(poll_interval,), name="reward-server", daemon=True)
    t.start()
    return t


class _RewardHandler(BaseHTTPRequestHandler):
    source: RewardSource
    timeout_s: float
    token: str
    max_body_bytes: int

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._send(HTTPStatus.OK, {"status": "ok", "reward": self.source.name})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "POST a batch to score it; GET /health for liveness"})

    def do_POST(self) -> None:  # noqa: N802
        given = self.headers.get("Authorization") or ""
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token (the trainer sends the one "
                                                          "in the environment variable reward.http_token_env names)"})
            return
        try:
            prompts, responses, row_fields = self._read_batch()
        except ValueError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        try:
            rewards = checked_scores(self.source, prompts, responses, row_fields, self.timeout_s)
        except RewardError as exc:
            log.error("%s", exc)  # the whole story stays here; the client gets no samples, paths or messages
            public = exc.public or f"reward {self.source.name!r} failed on this batch (see the server's log)"
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": public})
            return
        self._send(HTTPStatus.OK, {"rewards": rewards})

    def _read_batch(self) -> tuple[list[str], list[str], dict[str, list]]:
        """The request's batch, or ValueError saying what is wrong with it (sent back as a 400)."""
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > self.max_body_bytes:
            raise ValueError(f"expected a JSON body of 1..{self.max_body_bytes} bytes, got Content-Length {length}")
        try:
            data = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError('body must be an object {"prompts": [...], "responses": [...], "row_fields": {...}}')
        prompts, responses = data.get("prompts"), data.get("responses")
        row_fields = data.get("row_fields") or {}
        if not isinstance(prompts, list) or not isinstance(responses, list):
            raise ValueError('"prompts" and "responses" must be lists of strings')
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not isinstance(row_fields, dict):
            raise ValueError('"row_fields" must be an object of lists')
        for key, values in row_fields.items():
            if not isinstance(values, list) or len(values) != len(prompts):
                raise ValueError(f"row field {key!r} must be a list of {len(prompts)} values")
        return prompts, responses, row_fields

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        # One line per request at debug level instead of http.server's unconditional stderr.
        log.debug("%s - " + format, self.address_string(), *args)


def resolve_token(token_file: Optional[Path]) -> str:
    """The server's bearer token: ``token_file`` if it exists, else ``$RLHF_RAY_REWARD_TOKEN``, else a new one.

    A new token is printed once on stdout (``RLHF_RAY_REWARD_TOKEN=<token>``, ready for the trainer's environment)
    and, when ``token_file`` is given, written there readable by its owner only. ValueError for an empty file.
    """
    if token_file is not None and token_file.exists():
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"--token-file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    token = secrets.token_urlsafe(32)
    where = ""
    if token_file is not None:
        # O_EXCL: never follow a link or write into a file someone else created; 0600 from the first byte.
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        where = f" and written to {token_file} (mode 0600)"
    log.info("no --token-file or $%s given: generated a bearer token, printed below once%s; set it where the "
             "trainer runs, in the variable reward.http_token_env names", TOKEN_ENV, where)
    print(f"{TOKEN_ENV}={token}", file=sys.stdout, flush=True)
    return token


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: ``python -m rlhf_ray.rewards.server (--reward path.py[:fn] | --judge judge.yaml) [--host H] [--port N]
    [--timeout-s S]``."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.config.schema import RewardConfig
    from rlhf_ray.rewards import build_reward_source

    p = argparse.ArgumentParser(prog="python -m rlhf_ray.rewards.server", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--reward", help="path/file.py, path/file.py:func, or builtin:<name>")
    what.add_argument("--judge", type=Path, help="a YAML file holding a reward.judge section (or a training config "
                                                 "with one): that judge model, run here on vLLM, scores each batch")
    p.add_argument("--trust-remote-code", action="store_true", help="--judge: let the judge model run its own code")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout-s", type=float, default=RewardConfig.timeout_s,
                   help="per batch; a slower reward answers 500 (default: reward.timeout_s's default)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body")
    p.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S, help="drop a client silent this long")
    p.add_argument("--max-concurrent", type=int, default=MAX_CONCURRENT, help="requests served at once")
    p.add_argument("--token-file", type=Path, default=None,
                   help=f"the bearer token: read from this file if it exists (else ${TOKEN_ENV}); a token generated "
                        "because neither was given is written here (mode 0600)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    judge = None
    if args.judge is not None:
        from rlhf_ray.rewards.judge_engine import JudgeEngineReward, load_judge_config

        try:  # before the token is printed and the model loaded: a bad file fails at once, naming the key
            judge = JudgeEngineReward(load_judge_config(args.judge), lock_timeout_s=args.timeout_s,
                                      trust_remote_code=args.trust_remote_code)
        except ConfigError as exc:
            p.error(str(exc))
    try:
        token = resolve_token(args.token_file)
    except ValueError as exc:
        p.error(str(exc))
    source = judge if judge is not None else build_reward_source(args.reward, args.timeout_s)
    server = make_server(source, args.timeout_s, token, args.host, args.port, int(args.max_body_mb * 2**20),
                         args.read_timeout_s, args.max_concurrent)
    host, port = server.server_address[:2]
    try:
        if judge is not None:
            # Bound first (a port in use fails before minutes of loading); "serving" is logged once it can score.
            log.info("loading the judge %s on vLLM (clients wait in the listen queue meanwhile)", judge.cfg.model)
            log.info("judge loaded in %.1f s", judge.start())
        log.info("serving %s on http://%s:%s (POST a batch with the bearer token; GET /health)", source.describe(),
                 host, port)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
