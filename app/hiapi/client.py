"""A small typed client for hiapi's task endpoints (create and poll)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from app.hiapi.errors import HiapiRejected, HiapiTimeout, HiapiUnavailable
from app.hiapi.schemas import MODEL, Task, parse_task_payload

__all__ = ["HiapiClient"]


class HiapiClient:
    """Wraps an ``httpx.AsyncClient`` whose ``base_url`` is hiapi's; it owns no database state.

    Error mapping decides whether a retry may create a second paid task:
    a connect failure, 5xx or 429 means no task was created; a read timeout after the
    body was sent is ambiguous and raised as ``HiapiTimeout``.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self._http = http
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._observe = observe or (lambda endpoint, result: None)

    async def create_task(
        self,
        *,
        image_url: str,
        prompt: str | None,
        resolution: str,
        duration: int,
        callback_url: str,
    ) -> str:
        task_input: dict[str, Any] = {
            "image_urls": [image_url],
            "resolution": resolution,
            "duration": duration,
        }
        if prompt is not None:
            task_input["prompt"] = prompt
        body = {
            "model": MODEL,
            "input": task_input,
            "callback": {"url": callback_url, "when": "final"},
        }
        data = await self._request("POST", "/v1/tasks", json=body)
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id:
            # A 2xx may mean the task exists even though we can't read its id: ambiguous.
            raise HiapiTimeout("hiapi accepted the request but returned no taskId")
        return task_id

    async def get_task(self, task_id: str) -> Task:
        data = await self._request("GET", f"/v1/tasks/{task_id}")
        try:
            return parse_task_payload(data)
        except ValueError as exc:
            raise HiapiUnavailable(f"hiapi returned a malformed task: {exc}") from None

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        endpoint = "create" if method == "POST" else "get"
        try:
            response = await self._http.request(method, path, headers=self._headers, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            self._observe(endpoint, type(exc).__name__)
            raise HiapiUnavailable(f"hiapi unreachable: {type(exc).__name__}") from None
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            # The request may have been received: the task may exist upstream.
            self._observe(endpoint, type(exc).__name__)
            raise HiapiTimeout(f"no answer from hiapi: {type(exc).__name__}") from None
        status = response.status_code
        self._observe(endpoint, str(status))
        if status in (502, 504):
            # A gateway gave up waiting: hiapi behind it may have created the task.
            raise HiapiTimeout(f"hiapi answered {status} (gateway)", status_code=status)
        if status == 429 or status >= 500:
            raise HiapiUnavailable(f"hiapi answered {status}", status_code=status)
        try:
            body = response.json()
        except ValueError:
            error = HiapiTimeout if status < 300 else HiapiUnavailable
            raise error(
                f"hiapi answered {status} with a non-JSON body", status_code=status
            ) from None
        if status >= 400:
            code, message = _error_fields(body, status)
            raise HiapiRejected(code, message, status_code=status)
        if isinstance(body, dict) and body.get("code") not in (None, 200):
            code, message = _error_fields(body, status)
            raise HiapiRejected(code, message, status_code=status)
        return body.get("data") if isinstance(body, dict) else None


def _error_fields(body: Any, status: int) -> tuple[str, str]:
    """Read hiapi's two error shapes: ``{"error": {code, message}}`` and
    ``{"code", "error_code", "message"}``."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("code") or f"http_{status}"), str(err.get("message") or "")
        if "error_code" in body or "message" in body:
            return str(body.get("error_code") or f"http_{status}"), str(body.get("message") or "")
    return f"http_{status}", f"hiapi answered {status}"
