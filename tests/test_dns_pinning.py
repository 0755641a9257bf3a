"""Names are resolved once, every answer is checked, and only checked addresses are connected to.

The resolver is one we control (no real DNS), handed in through the constructors
(``download_session(..., resolver=...)``, ``Notifier(..., resolver=...)``). Its answers point at
real servers on 127.0.0.1 that count every TCP connection they accept: a refused name must
cost no connection at all (so ``last_error`` can't tell an API caller whether a port is open).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lifecycle, repository
from app.context import download_session
from app.db import create_engine, create_sessionmaker, utc_now
from app.hiapi.schemas import Task
from app.jobs.downloader import Downloader, DownloadSettings
from app.jobs.hosts import HostAllowlist
from app.jobs.notifier import Notifier
from app.jobs.resolve import AddressRefused, CheckedResolver, LookupFailed
from app.models import Status, Via
from app.net import is_public_address
from app.storage.local import LocalStorage
from tests import clips
from tests.conftest import ServiceFactory, Sim
from tests.test_frontend_api import NOTIFY_SECRET

MP4 = clips.good_mp4()  # a real clip: every download is opened with PyAV
LEASE = timedelta(seconds=30)
PUBLIC_V6 = "2001:4860:4860::8888"  # never connected to: every test refuses or pins elsewhere


class ScriptedResolver(AbstractResolver):
    """Answers from a script, one step per lookup: an exception to raise, or (address, port)
    pairs. The last step repeats. Records every lookup."""

    def __init__(self, *steps: BaseException | list[tuple[str, int]]) -> None:
        self.steps = list(steps)
        self.lookups: list[tuple[str, int]] = []

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
        self.lookups.append((host, port))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, BaseException):
            raise step
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=answer_port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address, answer_port in step
        ]

    async def close(self) -> None:
        pass


def lookup_failure() -> OSError:
    return OSError(-2, "Name or service not known")


class CountingServer:
    """A real HTTP/1.1 server on 127.0.0.1 (TLS if given a context) that counts connections,
    records request heads and TLS server names, and answers every request with ``body``."""

    def __init__(self, body: bytes = MP4, tls: ssl.SSLContext | None = None) -> None:
        self.body = body
        self.tls = tls
        self.connections = 0
        self.heads: list[bytes] = []
        self.server_names: list[str | None] = []
        self.server: asyncio.Server | None = None
        if tls is not None:
            tls.sni_callback = self._sni

    def _sni(self, sock: Any, name: str | None, ctx: Any) -> None:
        self.server_names.append(name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\nconnection: close\r\n"
                + f"content-length: {len(self.body)}\r\n\r\n".encode()
                + self.body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> CountingServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
async def sm(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    yield create_sessionmaker(engine)
    await engine.dispose()


# ---------------------------------------------------------------------------------------------
# Which addresses are public


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("ff02::1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
        # IPv4-mapped
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::ffff:8.8.8.8", True),
        # IPv4-compatible (deprecated, still routed by some stacks)
        ("::127.0.0.1", False),
        ("::10.0.0.1", False),
        ("::8.8.8.8", True),
        # NAT64, the well-known prefix: public only if the IPv4 address it carries is
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("64:ff9b::808:808", True),
        # NAT64, local-use prefix: refused whole
        ("64:ff9b:1::808:808", False),
        ("64:ff9b:1:7f00:1::", False),
        # 6to4
        ("2002:7f00:1::", False),
        ("2002:a00:1::1", False),
        ("2002:808:808::1", True),
        # Teredo: refused whole
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
        ("2001::1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


# ---------------------------------------------------------------------------------------------
# The resolver itself


async def test_checked_resolver_refuses_a_mixed_answer_and_fails_closed() -> None:
    inner = ScriptedResolver(
        lookup_failure(),
        [(PUBLIC_V6, 443), ("10.0.0.1", 443)],
        [("8.8.8.8", 443), (PUBLIC_V6, 443)],
    )
    checked = CheckedResolver(inner)
    with pytest.raises(LookupFailed, match="could not resolve clips.example"):
        await checked.resolve("clips.example", 443)
    with pytest.raises(AddressRefused, match="private or local"):
        await checked.resolve("clips.example", 443)
    # All answers are checked, but only the family asked for is returned.
    answers = await checked.resolve("clips.example", 443, family=socket.AF_INET)
    assert [a["host"] for a in answers] == ["8.8.8.8"]
    assert len(inner.lookups) == 3
    lenient = CheckedResolver(ScriptedResolver([("10.0.0.1", 9)]), private_ok=lambda h, p: True)
    assert [a["host"] for a in await lenient.resolve("sim.local", 9)] == ["10.0.0.1"]


# ---------------------------------------------------------------------------------------------
# The downloader


async def downloading_video(
    sm: async_sessionmaker[AsyncSession], url: str
) -> tuple[uuid.UUID, str]:
    """A video whose clip is at ``url``, in ``downloading``, with its lease held by the owner."""
    now = utc_now()
    owner = uuid.uuid4().hex
    task_id = f"dns-{uuid.uuid4().hex}"
    task = Task.model_validate(
        {
            "taskId": task_id,
            "status": "success",
            "output": [{"type": "video", "url": url, "expireAt": 4102444800}],
        }
    )
    async with sm() as session, session.begin():
        video, _ = await lifecycle.create_video(
            session,
            params=lifecycle.NewVideo("https://example.invalid/a.jpg", None, "720p", 3),
            idempotency_key=None,
            now=now,
            submit_hold=timedelta(0),
        )
        await lifecycle.record_submit_success(
            session, video_id=video.id, task_id=task_id, now=now, poll_after=timedelta(0)
        )
        outcome = await lifecycle.apply_task(
            session,
            video_id=video.id,
            task=task,
            via=Via.callback,
            owner=owner,
            now=now,
            lease=LEASE,
        )
    assert outcome == lifecycle.ApplyOutcome.download_claimed
    return video.id, owner


async def claim_again(sm: async_sessionmaker[AsyncSession], video_id: uuid.UUID) -> str:
    owner = uuid.uuid4().hex
    async with sm() as session, session.begin():
        claimed = await lifecycle.claim_download(
            session,
            video_id=video_id,
            owner=owner,
            now=utc_now() + timedelta(seconds=5),  # past the retry's backoff
            lease=LEASE,
        )
    assert claimed is not None
    return owner


async def reload(sm: async_sessionmaker[AsyncSession], video_id: uuid.UUID) -> Any:
    async with sm() as session:
        return await repository.get(session, video_id)


class Rig:
    def __init__(
        self, sm: async_sessionmaker[AsyncSession], tmp_path: Path, allow: str, resolver: Any
    ) -> None:
        self.http = download_session(HostAllowlist.parse(allow), concurrency=1, resolver=resolver)
        storage = LocalStorage(tmp_path / "clips")
        storage.ensure_dirs()
        self.downloader = Downloader(
            sessionmaker=sm,
            http=self.http,
            storage=storage,
            allowlist=HostAllowlist.parse(allow),
            settings=DownloadSettings(
                max_bytes=1 << 20, lease=LEASE, retry_base=0.05, retry_max=0.5
            ),
            stop=asyncio.Event(),
            clock=utc_now,
        )


@pytest.fixture
async def rig_factory(
    sm: async_sessionmaker[AsyncSession], tmp_path: Path
) -> AsyncIterator[Callable[[str, Any], Rig]]:
    rigs: list[Rig] = []

    def make(allow: str, resolver: Any) -> Rig:
        rigs.append(Rig(sm, tmp_path, allow, resolver))
        return rigs[-1]

    yield make
    for rig in rigs:
        await rig.http.close()


async def test_download_name_that_fails_then_rebinds_to_loopback_never_connects(
    sm: async_sessionmaker[AsyncSession], rig_factory: Callable[[str, Any], Rig]
) -> None:
    async with CountingServer() as internal:
        resolver = ScriptedResolver(lookup_failure(), [("127.0.0.1", internal.port)])
        rig = rig_factory("*.clips.example", resolver)
        video_id, owner = await downloading_video(sm, "https://cdn.clips.example/a.mp4")

        await rig.downloader.run(video_id, owner)  # the lookup fails: retried, not passed
        video = await reload(sm, video_id)
        assert video.status == Status.downloading and video.lease_owner is None
        assert "could not resolve cdn.clips.example" in video.last_error

        await rig.downloader.run(video_id, await claim_again(sm, video_id))  # now 127.0.0.1
        video = await reload(sm, video_id)
        assert video.status == Status.failed
        assert video.error_code == "host_not_allowed"
        assert "private or local" in video.error_message
        assert resolver.lookups == [("cdn.clips.example", 443)] * 2
        assert internal.connections == 0


async def test_download_name_with_one_public_and_one_private_answer_is_refused(
    sm: async_sessionmaker[AsyncSession], rig_factory: Callable[[str, Any], Rig]
) -> None:
    async with CountingServer() as internal:
        resolver = ScriptedResolver([("127.0.0.1", internal.port), (PUBLIC_V6, internal.port)])
        rig = rig_factory("*.clips.example", resolver)
        video_id, owner = await downloading_video(sm, "https://cdn.clips.example/a.mp4")
        await rig.downloader.run(video_id, owner)
        video = await reload(sm, video_id)
        assert (video.status, video.error_code) == (Status.failed, "host_not_allowed")
        assert internal.connections == 0


async def test_download_connects_to_the_address_its_lookup_returned(
    sm: async_sessionmaker[AsyncSession], rig_factory: Callable[[str, Any], Rig]
) -> None:
    """An origin named in DOWNLOAD_ALLOWED_HOSTS may be private: the one lookup's answer is
    what gets connected to (nothing else could reach ``clips.example``), with the name as Host."""
    async with CountingServer() as origin:
        resolver = ScriptedResolver([("127.0.0.1", origin.port)])
        rig = rig_factory(f"http://clips.example:{origin.port}", resolver)
        video_id, owner = await downloading_video(sm, f"http://clips.example:{origin.port}/a.mp4")
        await rig.downloader.run(video_id, owner)
        video = await reload(sm, video_id)
        assert video.status == Status.ready, video.last_error
        assert video.size_bytes == len(MP4)
        assert resolver.lookups == [("clips.example", origin.port)]
        assert origin.connections == 1
        assert f"host: clips.example:{origin.port}".encode() in origin.heads[0].lower()


# ---------------------------------------------------------------------------------------------
# The notifier


class Clock:
    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now


async def notification_for(sm: async_sessionmaker[AsyncSession], notify_url: str) -> uuid.UUID:
    """A failed video with ``notify_url``: its ``video.failed`` delivery is pending."""
    now = utc_now() - timedelta(seconds=1)
    task_id = f"dns-{uuid.uuid4().hex}"
    async with sm() as session, session.begin():
        video, _ = await lifecycle.create_video(
            session,
            params=lifecycle.NewVideo(
                "https://example.invalid/a.jpg", None, "720p", 3, notify_url=notify_url
            ),
            idempotency_key=None,
            now=now,
            submit_hold=timedelta(0),
        )
        await lifecycle.record_submit_success(
            session, video_id=video.id, task_id=task_id, now=now, poll_after=timedelta(0)
        )
        failed = Task.model_validate(
            {"taskId": task_id, "status": "fail", "error": {"code": "boom", "message": "no"}}
        )
        await lifecycle.apply_task(
            session,
            video_id=video.id,
            task=failed,
            via=Via.callback,
            owner=None,
            now=now,
            lease=LEASE,
        )
    return video.id


def make_notifier(
    sm: async_sessionmaker[AsyncSession],
    http: Any,
    resolver: AbstractResolver,
    clock: Clock,
    *,
    allow_local: bool,
) -> Notifier:
    async def render(video_id: uuid.UUID) -> dict[str, Any]:
        return {"id": str(video_id)}

    return Notifier(
        sessionmaker=sm,
        http=http,
        secret=b"notify-secret",
        render=render,
        max_attempts=5,
        allow_local=allow_local,
        retry_base=0.01,
        retry_max=0.01,
        interval=1.0,
        clock=clock,
        resolver=resolver,
    )


async def latest(sm: async_sessionmaker[AsyncSession], video_id: uuid.UUID) -> Any:
    async with sm() as session:
        return await repository.latest_notification(session, video_id)


@pytest.fixture
async def notify_http() -> AsyncIterator[Any]:
    async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
        yield client


async def test_notify_name_that_fails_then_rebinds_to_loopback_never_connects(
    sm: async_sessionmaker[AsyncSession], notify_http: Any
) -> None:
    async with CountingServer() as internal:
        resolver = ScriptedResolver(lookup_failure(), [("127.0.0.1", internal.port)])
        clock = Clock()
        notifier = make_notifier(sm, notify_http, resolver, clock, allow_local=False)
        video_id = await notification_for(sm, f"https://hooks.example:{internal.port}/v")

        assert await notifier.tick() == 1
        note = await latest(sm, video_id)
        assert (note.status, note.attempts) == ("pending", 1)  # to be retried
        assert "could not resolve hooks.example" in note.last_error

        clock.now += timedelta(seconds=5)
        assert await notifier.tick() == 1
        note = await latest(sm, video_id)
        assert note.attempts == 2 and note.last_status_code is None
        assert "private or local" in note.last_error
        assert "refused before connecting" in note.last_error
        assert str(internal.port) not in note.last_error
        assert resolver.lookups == [("hooks.example", internal.port)] * 2
        assert internal.connections == 0


async def test_notify_name_with_one_public_and_one_private_answer_is_refused(
    sm: async_sessionmaker[AsyncSession], notify_http: Any
) -> None:
    async with CountingServer() as internal:
        resolver = ScriptedResolver([(PUBLIC_V6, 443), ("127.0.0.1", internal.port)])
        notifier = make_notifier(sm, notify_http, resolver, Clock(), allow_local=False)
        video_id = await notification_for(sm, f"https://hooks.example:{internal.port}/v")
        assert await notifier.tick() == 1
        note = await latest(sm, video_id)
        assert note.status == "pending" and "private or local" in note.last_error
        assert internal.connections == 0


async def test_notify_posts_to_the_checked_address_with_the_name_as_host(
    sm: async_sessionmaker[AsyncSession], notify_http: Any
) -> None:
    async with CountingServer(body=b"") as receiver:
        resolver = ScriptedResolver([("127.0.0.1", receiver.port)])
        notifier = make_notifier(sm, notify_http, resolver, Clock(), allow_local=True)
        video_id = await notification_for(sm, f"http://hooks.example:{receiver.port}/v")
        assert await notifier.tick() == 1
        note = await latest(sm, video_id)
        assert note.status == "delivered", note.last_error
        assert resolver.lookups == [("hooks.example", receiver.port)]
        assert receiver.connections == 1
        head = receiver.heads[0].lower()
        assert head.startswith(b"post /v http/1.1")
        assert f"host: hooks.example:{receiver.port}".encode() in head


def tls_pair(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for ``name`` only (signed by a CA made here), and a
    client context that trusts that CA and nothing else."""
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("test ca", ca_key, "test ca", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert(name, key, "test ca", ca_key, ca=False)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*_pem_files(leaf, key))
    client = ssl.create_default_context(
        cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    return server, client


def _pem_files(leaf: x509.Certificate, key: Any) -> tuple[str, str]:
    folder = Path(tempfile.mkdtemp())
    (folder / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(folder / "cert.pem"), str(folder / "key.pem")


async def test_notify_over_tls_sends_the_name_as_sni_and_verifies_the_certificate_for_it(
    sm: async_sessionmaker[AsyncSession],
) -> None:
    server_tls, client_tls = tls_pair("hooks.example")
    async with (
        CountingServer(body=b"", tls=server_tls) as receiver,
        httpx.AsyncClient(verify=client_tls, timeout=5) as http,
    ):
        resolver = ScriptedResolver([("127.0.0.1", receiver.port)])
        notifier = make_notifier(sm, http, resolver, Clock(), allow_local=True)
        video_id = await notification_for(sm, f"https://hooks.example:{receiver.port}/v")
        assert await notifier.tick() == 1
        note = await latest(sm, video_id)
        assert note.status == "delivered", note.last_error
        assert receiver.server_names == ["hooks.example"]
        assert f"host: hooks.example:{receiver.port}".encode() in receiver.heads[0].lower()


# ---------------------------------------------------------------------------------------------
# At submit


PRIVATE_LITERALS = [
    "https://127.0.0.1/h",
    "https://10.1.2.3:8443/h",
    "https://169.254.169.254/latest/meta-data",
    "https://[::1]/h",
    "https://[::ffff:127.0.0.1]/h",
    "https://[::127.0.0.1]/h",
    "https://[64:ff9b::7f00:1]/h",
    "https://[2002:7f00:1::]/h",
    "https://2130706433/h",  # 127.0.0.1 spelt as one number
]


async def test_submit_refuses_a_notify_url_at_a_private_ip_literal(
    services: ServiceFactory, sim: Sim
) -> None:
    service = await services.start(NOTIFY_SECRET=NOTIFY_SECRET)
    messages = []
    for notify_url in PRIVATE_LITERALS:
        response = await service.client.post(
            "/v1/videos",
            json={"image_url": "https://example.invalid/a.jpg", "notify_url": notify_url},
        )
        assert response.status_code == 422, (notify_url, response.text)
        error = response.json()["error"]
        assert error["field"] == "notify_url", notify_url
        messages.append(error["message"])
    assert "127.0.0.1 is a private or local address" in messages[0]
    assert "NOTIFY_ALLOW_LOCAL" in messages[0]
    assert "::ffff:127.0.0.1 is a private or local address" in messages[4]
    assert "write it as 127.0.0.1" in messages[-1]
    assert (await sim.stats())["create_requests"] == 0
    listed = await service.client.get("/v1/videos")
    assert listed.json()["items"] == []  # nothing stored


async def test_submit_takes_a_local_notify_url_with_notify_allow_local(
    services: ServiceFactory, sim: Sim
) -> None:
    service = await services.start(NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True)
    video = await service.submit(notify_url="http://127.0.0.1:9/h")
    assert video["notify"]["status"] == "waiting"


async def test_download_through_a_proxy_still_refuses_a_name_at_a_private_address(
    sm: async_sessionmaker[AsyncSession],
    rig_factory: Callable[[str, Any], Rig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Through HTTPS_PROXY the proxy resolves the clip's host, so the session's resolver never
    # sees it. ``localhost`` (admitted by name, from /etc/hosts: no DNS) is checked first.
    async with CountingServer() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        rig = rig_factory("localhost", ScriptedResolver([("127.0.0.1", proxy.port)]))
        video_id, owner = await downloading_video(sm, "https://localhost/a.mp4")
        await rig.downloader.run(video_id, owner)
        video = await reload(sm, video_id)
        assert (video.status, video.error_code) == (Status.failed, "host_not_allowed")
        assert proxy.connections == 0
