"""Plain function tests, no database: hiapi input rules and task parsing, the download host
allowlist, webhook tokens, the MP4 sniff, the download's hash-and-store pipeline, backoff, and
the hiapi client's error mapping.

The client tests use ``httpx.MockTransport`` because the shapes they need (a bare connect
error, a read timeout, a 200 with a non-JSON body) are hard to get from the simulator.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.hiapi.client import HiapiClient
from app.hiapi.errors import HiapiRejected, HiapiTimeout, HiapiUnavailable
from app.hiapi.schemas import (
    MODEL,
    TaskStatus,
    duration_errors,
    image_url_errors,
    input_errors,
    parse_task_payload,
)
from app.jobs.downloader import is_mp4_header
from app.jobs.hosts import HostAllowlist
from app.jobs.sink import Sink
from app.retry import backoff_seconds
from app.security import callback_url, token_matches, webhook_token

IMAGE_URL = "https://example.com/still.jpg"


def create_body(**input_fields: Any) -> dict[str, Any]:
    """A create-task body hiapi accepts, with ``input`` fields overridden (``None`` drops one)."""
    task_input: dict[str, Any] = {
        "image_urls": [IMAGE_URL],
        "prompt": "the cat slowly turns its head toward the camera and blinks",
        "resolution": "1080p",
        "duration": 5,
    }
    task_input.update(input_fields)
    task_input = {k: v for k, v in task_input.items() if v is not None}
    return {
        "model": MODEL,
        "input": task_input,
        "callback": {"url": "https://relay.example.com/webhooks/hiapi/x/y", "when": "final"},
    }


class TestInputErrors:
    def test_valid_body_has_no_errors(self):
        assert input_errors(create_body()) == []

    def test_minimal_body_without_optional_fields_or_callback_has_no_errors(self):
        body = {"model": MODEL, "input": {"image_urls": [IMAGE_URL]}}
        assert input_errors(body) == []

    def test_edge_durations_and_720p_are_valid(self):
        assert input_errors(create_body(duration=3)) == []
        assert input_errors(create_body(duration=15)) == []
        assert input_errors(create_body(resolution="720p")) == []

    def test_missing_image_urls(self):
        body = create_body()
        del body["input"]["image_urls"]
        assert input_errors(body) == [
            'invalid input: image_urls: missing required field "image_urls"'
        ]

    def test_bad_resolution(self):
        assert input_errors(create_body(resolution="4k")) == [
            "invalid input: resolution: value must be one of '720p', '1080p'"
        ]

    def test_duration_below_minimum(self):
        assert input_errors(create_body(duration=2)) == [
            "invalid input: duration: minimum: got 2, want 3"
        ]

    def test_duration_above_maximum(self):
        assert input_errors(create_body(duration=30)) == [
            "invalid input: duration: maximum: got 30, want 15"
        ]

    def test_two_image_urls(self):
        body = create_body(image_urls=[IMAGE_URL, "https://example.com/other.jpg"])
        assert input_errors(body) == ["invalid input: image_urls: maxItems: got 2, want 1"]

    def test_no_image_urls(self):
        assert input_errors(create_body(image_urls=[])) == [
            "invalid input: image_urls: minItems: got 0, want 1"
        ]

    def test_unknown_field_at_root(self):
        body = {**create_body(), "identity_preserving": True}
        assert input_errors(body) == [
            "invalid input: additional properties 'identity_preserving' not allowed"
        ]

    def test_unknown_field_inside_input(self):
        body = create_body(identity_preserving=True)
        assert input_errors(body) == [
            "invalid input: additional properties 'identity_preserving' not allowed"
        ]

    def test_body_that_is_not_an_object(self):
        assert input_errors([]) == ["invalid input: expected object, but got array"]

    def test_every_problem_is_reported_in_hiapi_format(self):
        body = create_body(resolution="4k", duration=2)
        assert input_errors(body) == [
            "invalid input: resolution: value must be one of '720p', '1080p'",
            "invalid input: duration: minimum: got 2, want 3",
        ]


class TestFieldRules:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (5, []),
            (True, ["duration: expected integer, but got boolean"]),
            (5.0, ["duration: expected integer, but got number"]),
            ("5", ["duration: expected integer, but got string"]),
            (None, ["duration: expected integer, but got null"]),
        ],
    )
    def test_duration_must_be_a_json_integer(self, value: Any, expected: list[str]):
        assert duration_errors(value) == expected

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            (IMAGE_URL, []),
            ("http://example.com/still.jpg", ["f: value must be an https URL"]),
            ("https://", ["f: value must be an https URL"]),
            ("", ["f: value must be an https URL"]),
            ("https://example.com/a b.jpg", ["f: value must be an https URL"]),
            (["https://example.com/still.jpg"], ["f: expected string, but got array"]),
        ],
    )
    def test_image_url_must_be_one_https_url(self, url: Any, expected: list[str]):
        assert image_url_errors(url, field="f") == expected


class TestParseTaskPayload:
    TASK = {
        "taskId": "tk-hiapi-01KW3D",
        "status": "success",
        "model": MODEL,
        "output": [
            {"type": "video", "url": "https://temp.hiapi.ai/a/01KW.mp4", "expireAt": 1783131245}
        ],
    }

    def test_accepts_a_bare_task(self):
        task = parse_task_payload(self.TASK)
        assert task.task_id == "tk-hiapi-01KW3D"
        assert task.status is TaskStatus.success
        assert task.output[0].url == "https://temp.hiapi.ai/a/01KW.mp4"
        assert task.output[0].expires_at == 1783131245

    def test_writes_a_task_back_in_hiapis_words(self):
        assert parse_task_payload(self.TASK).wire() == {**self.TASK, "error": None}

    def test_accepts_a_wrapped_task(self):
        task = parse_task_payload({"code": 200, "data": self.TASK})
        assert task.task_id == "tk-hiapi-01KW3D"
        assert task.status is TaskStatus.success

    def test_reads_a_failed_tasks_error(self):
        task = parse_task_payload(
            {
                "taskId": "tk-1",
                "status": "fail",
                "error": {"code": "generation_failed", "message": "boom"},
            }
        )
        assert task.status is TaskStatus.fail
        assert task.error is not None
        assert (task.error.code, task.error.message) == ("generation_failed", "boom")

    def test_handling_task_has_no_output(self):
        task = parse_task_payload({"taskId": "tk-1", "status": "handling"})
        assert task.status is TaskStatus.handling
        assert task.output == []

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param([], id="array"),
            pytest.param("tk-1", id="string"),
            pytest.param(None, id="null"),
            pytest.param(5, id="number"),
            pytest.param({"code": 200, "data": 5}, id="wrapped-non-object"),
            pytest.param({"code": 200, "data": None}, id="wrapped-null"),
        ],
    )
    def test_rejects_non_objects(self, payload: Any):
        with pytest.raises(ValueError, match="JSON object"):
            parse_task_payload(payload)

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param({"status": "success"}, id="missing-taskId"),
            pytest.param({"code": 200, "data": {"status": "success"}}, id="wrapped-missing-taskId"),
            pytest.param({"taskId": "", "status": "success"}, id="empty-taskId"),
        ],
    )
    def test_rejects_a_missing_task_id(self, payload: Any):
        with pytest.raises(ValueError, match="taskId"):
            parse_task_payload(payload)

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param({"taskId": "tk-1", "status": "done"}, id="unknown-status"),
            pytest.param({"taskId": "tk-1"}, id="missing-status"),
            pytest.param({"taskId": "tk-1", "status": None}, id="null-status"),
        ],
    )
    def test_rejects_a_bad_status(self, payload: Any):
        with pytest.raises(ValueError, match="status"):
            parse_task_payload(payload)


class TestHostAllowlist:
    @pytest.fixture
    def default(self) -> HostAllowlist:
        spec = Settings.model_fields["DOWNLOAD_ALLOWED_HOSTS"].default
        assert spec == "*.hiapi.ai"
        return HostAllowlist.parse(spec)

    @pytest.mark.parametrize(
        "url",
        [
            "https://temp.hiapi.ai/x.mp4",
            "https://temp.hiapi.ai:443/x.mp4",
            "https://TEMP.HIAPI.AI/x.mp4",
            "https://a.b.hiapi.ai/x.mp4",
        ],
    )
    def test_default_admits_hiapi_subdomains_over_https(self, default: HostAllowlist, url: str):
        assert default.allows(url), url

    @pytest.mark.parametrize(
        "url",
        [
            pytest.param("http://temp.hiapi.ai/x.mp4", id="plain-http"),
            pytest.param("https://hiapi.ai.evil.com/x.mp4", id="suffix-as-subdomain"),
            pytest.param("https://evilhiapi.ai/x.mp4", id="name-ending-in-hiapi"),
            pytest.param("https://temp.hiapi.ai:8443/x.mp4", id="other-port"),
            pytest.param("https://user@temp.hiapi.ai/x.mp4", id="userinfo"),
            pytest.param("https://user:pw@temp.hiapi.ai/x.mp4", id="userinfo-password"),
            pytest.param("ftp://temp.hiapi.ai/x.mp4", id="other-scheme"),
            pytest.param("/x.mp4", id="relative"),
            pytest.param("not a url", id="garbage"),
        ],
    )
    def test_default_rejects_lookalikes(self, default: HostAllowlist, url: str):
        assert not default.allows(url), url

    def test_malformed_punycode_host_is_refused_not_raised(self, default: HostAllowlist):
        # The URL parses, but its host is invalid IDNA and only fails when decoded. A redirect
        # Location is attacker-controlled; the check must answer False, never raise.
        assert not default.allows("https://xn--tmp-hiapi.ai/x.mp4")
        assert not default.allows(httpx.URL("https://xn--tmp-hiapi.ai/x.mp4"))

    def test_accepts_a_parsed_url(self, default: HostAllowlist):
        assert default.allows(httpx.URL("https://temp.hiapi.ai/x.mp4"))

    def test_origin_entry_admits_exactly_that_origin(self):
        allow = HostAllowlist.parse("*.hiapi.ai, http://127.0.0.1:9100")
        assert allow.allows("http://127.0.0.1:9100/files/abc.mp4")
        assert not allow.allows("http://127.0.0.1:9101/files/abc.mp4")
        assert not allow.allows("https://127.0.0.1:9100/files/abc.mp4")
        assert not allow.allows("http://127.0.0.1/files/abc.mp4")
        assert not allow.allows("http://localhost:9100/files/abc.mp4")
        assert allow.allows("https://temp.hiapi.ai/x.mp4")

    def test_bare_host_entry_admits_only_that_host_over_https(self):
        allow = HostAllowlist.parse("temp.hiapi.ai")
        assert allow.allows("https://temp.hiapi.ai/x.mp4")
        assert not allow.allows("https://other.hiapi.ai/x.mp4")
        assert not allow.allows("http://temp.hiapi.ai/x.mp4")

    def test_empty_spec_admits_nothing(self):
        assert not HostAllowlist.parse("").allows("https://temp.hiapi.ai/x.mp4")

    def test_unreadable_entry_is_a_config_error(self):
        with pytest.raises(ValueError, match="DOWNLOAD_ALLOWED_HOSTS"):
            HostAllowlist.parse("ftp://files.example.com")


class TestWebhookTokens:
    SECRET = b"test-webhook-secret-0123456789abcdef"

    def test_token_is_deterministic(self):
        vid = uuid.uuid4()
        assert webhook_token(self.SECRET, vid) == webhook_token(self.SECRET, vid)

    def test_token_differs_per_video(self):
        assert webhook_token(self.SECRET, uuid.uuid4()) != webhook_token(self.SECRET, uuid.uuid4())

    def test_token_differs_per_secret(self):
        vid = uuid.uuid4()
        assert webhook_token(self.SECRET, vid) != webhook_token(b"another-secret-0123456789", vid)

    def test_token_is_40_hex_chars(self):
        token = webhook_token(self.SECRET, uuid.uuid4())
        assert len(token) == 40
        assert int(token, 16) >= 0

    def test_matching_token_is_accepted(self):
        vid = uuid.uuid4()
        assert token_matches(self.SECRET, vid, webhook_token(self.SECRET, vid))

    @pytest.mark.parametrize(
        "make_token",
        [
            pytest.param(lambda s, v: webhook_token(s, uuid.uuid4()), id="other-video"),
            pytest.param(lambda s, v: webhook_token(b"other-secret-0123456789", v), id="other-key"),
            pytest.param(lambda s, v: webhook_token(s, v)[:-1], id="truncated"),
            pytest.param(lambda s, v: webhook_token(s, v).upper(), id="upper-case"),
            pytest.param(lambda s, v: "", id="empty"),
            pytest.param(lambda s, v: "é" * 40, id="non-ascii"),
        ],
    )
    def test_other_tokens_are_refused(self, make_token: Callable[[bytes, uuid.UUID], str]):
        vid = uuid.uuid4()
        assert not token_matches(self.SECRET, vid, make_token(self.SECRET, vid))

    def test_callback_url_carries_video_and_token(self):
        vid = uuid.uuid4()
        url = callback_url("https://relay.example.com", self.SECRET, vid)
        token = webhook_token(self.SECRET, vid)
        assert url == f"https://relay.example.com/webhooks/hiapi/{vid}/{token}"


class TestIsMp4Header:
    @pytest.mark.parametrize(
        "head",
        [
            b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00",
            b"\x00\x00\x00\x20ftypmp42",
            b"\x00\x00\x00\x08ftyp",
        ],
    )
    def test_ftyp_box_is_mp4(self, head: bytes):
        assert is_mp4_header(head)

    @pytest.mark.parametrize(
        "head",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"\x00\x00\x00", id="short"),
            pytest.param(b"\x00\x00\x00\x08fty", id="seven-bytes"),
            pytest.param(b"ftypisom", id="ftyp-at-start"),
            pytest.param(b"\x00\x00\x00\x08moov", id="other-box"),
            pytest.param(b'{"error": "not found"}', id="json"),
            pytest.param(b"<html><body>", id="html"),
        ],
    )
    def test_anything_else_is_not(self, head: bytes):
        assert not is_mp4_header(head)


class _SlowWriter:
    """A storage writer whose writes take random, overlapping-prone times."""

    key = "clip.mp4"
    poster_key = "clip.jpg"

    def __init__(self, fail_at: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.active = 0
        self.fail_at = fail_at

    async def write(self, data: bytes) -> None:
        self.active += 1
        try:
            assert self.active == 1, "two writes at once"
            await asyncio.sleep(random.uniform(0, 0.004))
            if self.fail_at is not None and len(self.chunks) == self.fail_at:
                raise OSError("disk full")
            self.chunks.append(data)
        finally:
            self.active -= 1

    async def spool(self) -> Path:
        raise NotImplementedError  # the sink only writes

    async def commit(self, poster: bytes | None = None) -> None:
        return None

    async def abort(self) -> None:
        return None


class TestDownloadSink:
    """The downloader's hash-and-store pipeline keeps bytes in order and stops on a failure."""

    async def test_chunks_are_written_and_hashed_in_order(self):
        chunks = [bytes([i]) * random.randint(1, 70_000) for i in range(60)]
        writer, hasher = _SlowWriter(), hashlib.sha256()
        sink = Sink(writer, hasher)
        for chunk in chunks:
            await sink.put(chunk)
        await sink.finish()
        assert writer.chunks == chunks
        assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()

    async def test_a_failed_write_raises_and_nothing_after_it_is_written(self):
        writer = _SlowWriter(fail_at=5)
        sink = Sink(writer, hashlib.sha256())

        async def feed() -> None:
            try:
                for i in range(40):
                    await sink.put(bytes([i]) * 1000)
                await sink.finish()
            finally:
                await sink.cancel()

        with pytest.raises(OSError, match="disk full"):
            await feed()
        assert [c[0] for c in writer.chunks] == [0, 1, 2, 3, 4]
        await asyncio.sleep(0.05)  # nothing still running writes later
        assert len(writer.chunks) == 5


class TestBackoffSeconds:
    @pytest.mark.parametrize("attempt", range(12))
    def test_delay_is_between_half_and_all_of_the_ceiling(self, attempt: int):
        base, cap = 0.5, 30.0
        ceiling = min(cap, base * 2**attempt)
        rng = random.Random(attempt)
        delays = [backoff_seconds(attempt, base=base, cap=cap, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (min(delays), max(delays))

    def test_delay_is_capped(self):
        rng = random.Random(1)
        for attempt in (8, 30, 31, 1000, 10**9):
            delay = backoff_seconds(attempt, base=1.0, cap=60.0, rng=rng)
            assert 30.0 <= delay <= 60.0, (attempt, delay)

    def test_extremes_of_the_jitter_hit_the_bounds(self):
        class Extreme(random.Random):
            def __init__(self, pick_high: bool) -> None:
                super().__init__(0)
                self.pick_high = pick_high

            def uniform(self, a: float, b: float) -> float:
                return b if self.pick_high else a

        assert backoff_seconds(3, base=1.0, cap=60.0, rng=Extreme(False)) == 4.0
        assert backoff_seconds(3, base=1.0, cap=60.0, rng=Extreme(True)) == 8.0

    def test_jitter_spreads_retries(self):
        rng = random.Random(7)
        delays = {backoff_seconds(4, base=1.0, cap=60.0, rng=rng) for _ in range(20)}
        assert len(delays) > 1


# --- hiapi client ----------------------------------------------------------------------------

API_KEY = "sk-unit-test-key"
CALLBACK = "https://relay.example.com/webhooks/hiapi/vid/token"
INVALID_REQUEST = {
    "code": 400,
    "error_code": "INVALID_REQUEST",
    "message": 'invalid input: image_urls: missing required field "image_urls"',
}
PERMISSION_DENIED = {
    "error": {
        "code": "permission_denied",
        "message": "This API key cannot use the selected model...",
        "type": "hiapi_error",
    }
}
Handler = Callable[[httpx.Request], httpx.Response]


async def create_with(handler: Handler, *, prompt: str | None = "blink") -> str:
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), base_url="https://api.hiapi.ai"
    ) as http:
        client = HiapiClient(http, api_key=API_KEY)
        return await client.create_task(
            image_url=IMAGE_URL,
            prompt=prompt,
            resolution="720p",
            duration=3,
            callback_url=CALLBACK,
        )


def answer(status: int, body: Any = None, *, text: str | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text)
        return httpx.Response(status, json=body)

    return handler


def raise_(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


class TestHiapiClientErrors:
    async def test_503_is_unavailable_not_timeout(self):
        body = {"code": 503, "error_code": "SERVICE_UNAVAILABLE", "message": "try later"}
        with pytest.raises(HiapiUnavailable) as info:
            await create_with(answer(503, body))
        assert not isinstance(info.value, HiapiTimeout)
        assert info.value.status_code == 503

    async def test_503_with_html_body_is_unavailable_not_timeout(self):
        with pytest.raises(HiapiUnavailable) as info:
            await create_with(answer(503, text="<html>bad gateway</html>"))
        assert not isinstance(info.value, HiapiTimeout)

    async def test_429_is_unavailable(self):
        with pytest.raises(HiapiUnavailable) as info:
            await create_with(answer(429, {"message": "slow down"}))
        assert not isinstance(info.value, HiapiTimeout)
        assert info.value.status_code == 429

    @pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout])
    async def test_connect_failure_is_unavailable(self, exc_type: type[httpx.TransportError]):
        with pytest.raises(HiapiUnavailable) as info:
            await create_with(raise_(exc_type))
        assert not isinstance(info.value, HiapiTimeout)

    @pytest.mark.parametrize(
        "exc_type", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError]
    )
    async def test_no_answer_after_sending_is_timeout(self, exc_type: type[httpx.TransportError]):
        with pytest.raises(HiapiTimeout):
            await create_with(raise_(exc_type))

    async def test_400_invalid_request_is_rejected_with_hiapis_code_and_message(self):
        with pytest.raises(HiapiRejected) as info:
            await create_with(answer(400, INVALID_REQUEST))
        assert info.value.code == "INVALID_REQUEST"
        assert info.value.message == INVALID_REQUEST["message"]
        assert info.value.status_code == 400

    async def test_401_permission_denied_is_rejected(self):
        with pytest.raises(HiapiRejected) as info:
            await create_with(answer(401, PERMISSION_DENIED))
        assert info.value.code == "permission_denied"
        assert info.value.message == "This API key cannot use the selected model..."
        assert info.value.status_code == 401

    async def test_200_with_non_json_body_is_ambiguous_timeout(self):
        with pytest.raises(HiapiTimeout):
            await create_with(answer(200, text="<html>ok</html>"))

    async def test_200_without_task_id_is_ambiguous_timeout(self):
        with pytest.raises(HiapiTimeout):
            await create_with(answer(200, {"code": 200, "data": {}, "message": "success"}))

    async def test_200_carrying_an_error_code_is_rejected(self):
        with pytest.raises(HiapiRejected) as info:
            await create_with(answer(200, INVALID_REQUEST))
        assert info.value.code == "INVALID_REQUEST"


class TestHiapiClientRequests:
    async def test_create_sends_hiapis_body_with_root_callback_and_bearer_key(self):
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            data = {"code": 200, "data": {"taskId": "tk-hiapi-1"}, "message": "success"}
            return httpx.Response(200, json=data)

        assert await create_with(handler) == "tk-hiapi-1"

        [request] = seen
        assert request.method == "POST"
        assert request.url == "https://api.hiapi.ai/v1/tasks"
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        body = json.loads(request.content)
        assert body["model"] == MODEL
        assert body["input"]["image_urls"] == [IMAGE_URL]
        assert body["input"]["resolution"] == "720p"
        assert body["input"]["duration"] == 3
        assert body["input"]["prompt"] == "blink"
        assert body["callback"] == {"url": CALLBACK, "when": "final"}
        assert "callback" not in body["input"]
        assert input_errors(body) == [], "the client must send what hiapi accepts"

    async def test_create_without_prompt_sends_no_prompt(self):
        seen: list[dict[str, Any]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(json.loads(request.content))
            return httpx.Response(200, json={"code": 200, "data": {"taskId": "tk-2"}})

        await create_with(handler, prompt=None)
        assert "prompt" not in seen[0]["input"]
        assert input_errors(seen[0]) == []

    async def test_get_task_reads_the_wrapped_task(self):
        def handler(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/v1/tasks/tk-3"
            assert request.headers["authorization"] == f"Bearer {API_KEY}"
            task = {"taskId": "tk-3", "status": "handling"}
            return httpx.Response(200, json={"code": 200, "data": task})

        async with httpx.AsyncClient(
            transport=httpx.MockTransport(handler), base_url="https://api.hiapi.ai"
        ) as http:
            task = await HiapiClient(http, api_key=API_KEY).get_task("tk-3")
        assert task.task_id == "tk-3"
        assert task.status is TaskStatus.handling

    async def test_get_task_with_malformed_task_is_unavailable(self):
        handler = answer(200, {"code": 200, "data": {"taskId": "tk-4", "status": "done"}})
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(handler), base_url="https://api.hiapi.ai"
        ) as http:
            with pytest.raises(HiapiUnavailable, match="malformed"):
                await HiapiClient(http, api_key=API_KEY).get_task("tk-4")


def test_a_download_error_never_carries_a_presigned_query():
    # aiohttp names the URL in some messages; its query (a presigned signature) is a secret
    # that must not reach last_error, a video's error message or a log line.
    from app.jobs.downloader import _describe

    exc = TimeoutError(
        "Connection timeout to host https://temp.hiapi.ai/v/clip.mp4?X-Amz-Signature=s3cr3t&x=1"
    )
    text = _describe(exc)
    assert "s3cr3t" not in text and "X-Amz" not in text
    assert text.startswith(
        "TimeoutError: Connection timeout to host https://temp.hiapi.ai/v/clip.mp4"
    )
