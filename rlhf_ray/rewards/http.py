"""A reward hosted behind HTTP: POST a batch as JSON, get one reward per sample back.

Protocol (served by :mod:`rlhf_ray.rewards.server`, easy to implement in any web framework)::

    POST <url>   {"prompts": [...], "responses": [...], "row_fields": {"answer": [...], ...}}
    200          {"rewards": [float, ...]}          # one per sample, same order
    4xx / 5xx    {"error": "..."}                   # any body; its start is shown in the RewardError

Connection errors and 5xx answers are retried with exponential backoff; a 4xx (the request itself
is wrong) is not. Standard library only (urllib), so no new dependency.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

from rlhf_ray.config.job_sections import RewardConfig
from rlhf_ray.rewards.base import RewardError, RewardSource, RowFields

log = logging.getLogger(__name__)

HTTP_BATCH_SIZE = 64
"""Samples per request when the endpoint is named in config (``reward.functions: [http://...]``)."""

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}

TOKEN_ENV: str = RewardConfig.http_token_env  # type: ignore[assignment]
"""The default environment variable of the reward bearer token (``reward.http_token_env``); the server reads it
too. A secret never lives in a config file, a URL or on a command line."""


class HttpReward(RewardSource):
    """Scores batches by POSTing them to ``url`` in chunks of ``batch_size`` samples.

    ``token``: sent as ``Authorization: Bearer <token>`` (the caller reads it from the environment variable
    ``reward.http_token_env`` names). ``timeout_s`` bounds each request; ``retries`` more attempts follow a
    connection error or a 5xx, after ``backoff_s * 2**attempt`` seconds. When called through ``checked_scores``
    with the same timeout, a slow endpoint is reported as a timeout of the whole call.
    """

    def __init__(self, url: str, timeout_s: float, batch_size: int, token: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None, retries: int = 2, backoff_s: float = 0.5):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"reward endpoint must be an http(s):// URL, got {url!r}")
        if parsed.username is not None or parsed.password is not None:
            # The URL is logged, in the config and in every error; a credential in it would be too.
            raise ValueError(f"reward endpoint {parsed.hostname}:{parsed.port or ''} carries a credential in its URL; "
                             "put the token in the environment variable reward.http_token_env names instead")
        if batch_size < 1:
            raise ValueError(f"HttpReward batch_size must be >= 1, got {batch_size}")
        if retries < 0:
            raise ValueError(f"HttpReward retries must be >= 0, got {retries}")
        self.url, self.timeout_s, self.batch_size = url, timeout_s, batch_size
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.headers = {"Content-Type": "application/json", **auth, **(headers or {})}
        self.retries, self.backoff_s = retries, backoff_s
        self.name = url
        # A proxy from the environment never helps reach this machine itself, and often breaks it.
        self._no_proxy = parsed.hostname in _LOOPBACK

    def describe(self) -> str:
        return f"reward endpoint {self.url}"

    def check(self) -> None:
        """The endpoint's host and port accept a connection (within ``timeout_s``), or ``RewardError``."""
        parsed = urllib.parse.urlparse(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=self.timeout_s).close()
        except OSError as exc:
            raise RewardError(f"{self.describe()} is not reachable: {exc} (start it before the run, or fix "
                              "reward.functions)") from exc

    def score(self, prompts: list[str], responses: list[str], row_fields: RowFields) -> list[float]:
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            payload = {"prompts": list(prompts[chunk]), "responses": list(responses[chunk]),
                       "row_fields": {k: list(v[chunk]) for k, v in row_fields.items()}}
            rewards, n = self._post(payload), len(payload["prompts"])
            if not isinstance(rewards, list) or len(rewards) != n:
                got = f"{len(rewards)} rewards" if isinstance(rewards, list) else type(rewards).__name__
                raise RewardError(f"{self.describe()} returned {got} for samples {start}..{start + n - 1} "
                                  f"(expected {n})")
            out.extend(rewards)
        return out

    def _post(self, payload: dict[str, Any]) -> Any:
        try:
            body = json.dumps(payload, default=_json_default).encode()
        except (TypeError, ValueError) as exc:
            raise RewardError(f"{self.describe()}: the batch cannot be sent as JSON ({exc}); "
                              f"row fields must be strings, numbers, lists or dicts") from exc
        handlers = [urllib.request.ProxyHandler({})] if self._no_proxy else []
        opener = urllib.request.build_opener(*handlers)
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with opener.open(request, timeout=self.timeout_s) as resp:
                    text = resp.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as exc:
                detail = _excerpt(exc.read().decode("utf-8", "replace"))
                last = f"HTTP {exc.code}: {detail}"
                if exc.code < 500:
                    raise RewardError(f"{self.describe()} answered {last}") from exc
                log.warning("%s answered %s (attempt %d/%d)", self.describe(), last, attempt + 1, attempts)
                continue
            except (socket.timeout, TimeoutError) as exc:
                # Not retried: a server that is slow now will most likely be slow again, and the
                # caller's timeout covers the whole call.
                raise RewardError(f"{self.describe()} gave no answer within {self.timeout_s:g} s") from exc
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, DNS, a garbled reply
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise RewardError(f"{self.describe()} gave no answer within {self.timeout_s:g} s") from exc
                last = f"connection failed: {reason}"
                log.warning("%s %s (attempt %d/%d)", self.describe(), last, attempt + 1, attempts)
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RewardError(f"{self.describe()} answered with invalid JSON: {_excerpt(text)}") from exc
            if not isinstance(data, dict) or "rewards" not in data:
                raise RewardError(f'{self.describe()} answered without a "rewards" key: {_excerpt(text)}')
            return data["rewards"]
        raise RewardError(f"{self.describe()} failed after {attempts} attempts; last: {last}")


def _json_default(value: Any) -> Any:
    # numpy / torch values in row fields: send them as plain numbers and lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
