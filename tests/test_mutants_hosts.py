"""Tests that kill mutants ``make mutate`` found surviving in ``app/jobs/hosts.py``,
``app/jobs/resolve.py`` and ``app/outputs.py`` (docs/mutants.md). Pure functions and the
resolver wrapper, tested directly; the inner resolver is injected through the constructor.
"""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from app.hiapi.schemas import Task, TaskStatus, parse_task_payload
from app.jobs.hosts import HostAllowlist, resolves_to_public
from app.jobs.resolve import AddressRefused, CheckedResolver, LookupFailed
from app.net import is_public_address
from app.outputs import OutputCheck


class Answers(AbstractResolver):
    """Answers every lookup with ``addresses``; records the families asked for and closing."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.families: list[Any] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: Any = socket.AF_INET
    ) -> list[ResolveResult]:  # aiohttp's resolvers default to IPv4 only
        self.families.append(family)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        self.closed = True


# --- hosts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8%eth0", True),  # the zone is set aside, whatever the family
        ("fe80::1%eth0", False),
        ("2001:4860:4860::8888%2", True),
    ],
)
def test_a_zone_is_set_aside_before_the_address_is_read(address: str, public: bool):
    assert is_public_address(address) is public


async def test_resolves_to_public_reads_each_answers_address():
    # IP literals: getaddrinfo answers them without a lookup, and nothing is connected to.
    assert await resolves_to_public("8.8.8.8", 443) is True
    assert await resolves_to_public("127.0.0.1", 443) is False
    assert await resolves_to_public("10.1.2.3", 443) is False


# --- resolve -----------------------------------------------------------------------------


async def test_a_refusal_names_the_host():
    checked = CheckedResolver(Answers("10.0.0.1"))
    with pytest.raises(AddressRefused) as refused:
        await checked.resolve("clips.example", 443)
    assert refused.value.host == "clips.example"
    assert str(refused.value) == (
        "clips.example resolves to a private or local address; refused before connecting"
    )


async def test_every_family_is_asked_for_and_only_the_wanted_one_returned():
    inner = Answers("8.8.8.8", "2001:4860:4860::8888")
    checked = CheckedResolver(inner)
    v6 = await checked.resolve("clips.example", 443, family=socket.AF_INET6)
    assert [a["host"] for a in v6] == ["2001:4860:4860::8888"]
    both = await checked.resolve("clips.example", 443, family=socket.AF_UNSPEC)
    assert [a["host"] for a in both] == ["8.8.8.8", "2001:4860:4860::8888"]
    assert inner.families == [socket.AF_UNSPEC, socket.AF_UNSPEC]


async def test_no_answer_of_the_wanted_family_is_a_failed_lookup():
    checked = CheckedResolver(Answers("8.8.8.8"))
    with pytest.raises(LookupFailed) as failed:
        await checked.resolve("clips.example", 443, family=socket.AF_INET6)
    assert failed.value.strerror == "could not resolve clips.example: no AF_INET6 address"
    empty = CheckedResolver(Answers())
    with pytest.raises(LookupFailed, match=r"^could not resolve clips\.example: no addresses$"):
        await empty.resolve("clips.example", 443)


async def test_private_ok_is_asked_with_the_host_and_port():
    asked: list[tuple[str, int]] = []

    def private_ok(host: str, port: int) -> bool:
        asked.append((host, port))
        return host == "sim.local"

    checked = CheckedResolver(Answers("10.0.0.1"), private_ok=private_ok)
    assert [a["host"] for a in await checked.resolve("sim.local", 9100)] == ["10.0.0.1"]
    with pytest.raises(AddressRefused):
        await checked.resolve("other.local", 9100)
    assert asked == [("sim.local", 9100), ("other.local", 9100)]


async def test_close_closes_the_inner_resolver():
    inner = Answers("8.8.8.8")
    checked = CheckedResolver(inner)
    await checked.close()
    assert inner.closed
    await CheckedResolver().close()  # nothing built yet: nothing to close


# --- outputs -----------------------------------------------------------------------------

CHECK = OutputCheck(HostAllowlist.parse("*.hiapi.ai"), max_retry=timedelta(hours=1))
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def success(*urls: str) -> Task:
    outputs = [{"url": url, "expireAt": None} for url in urls]
    return parse_task_payload({"taskId": "tk-1", "status": "success", "output": outputs})


def test_a_success_without_output_is_returned_as_it_is():
    task = success()
    assert CHECK.vet(task, now=NOW) is task


def test_only_the_first_output_is_rewritten():
    vetted = CHECK.vet(success("https://A.hiapi.ai./1.mp4", "https://B.hiapi.ai./2.mp4"), now=NOW)
    assert [o.url for o in vetted.output] == [
        "https://a.hiapi.ai/1.mp4",
        "https://B.hiapi.ai./2.mp4",
    ]
    assert vetted.status == TaskStatus.success and vetted.task_id == "tk-1"


def test_expire_at_is_the_earlier_of_hiapis_and_the_retry_bound():
    bound = int((NOW + timedelta(hours=1)).timestamp())
    soon = int((NOW + timedelta(minutes=5)).timestamp())
    for given, expected in [(None, bound), (soon, soon), (bound + 1, bound)]:
        task = parse_task_payload(
            {
                "taskId": "tk-1",
                "status": "success",
                "output": [{"url": "https://a.hiapi.ai/x.mp4", "expireAt": given}],
            }
        )
        assert CHECK.vet(task, now=NOW).output[0].expires_at == expected, given


def test_a_refusal_says_why_and_is_logged_with_its_code(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="app.outputs"):
        vetted = CHECK.vet(success("https://evil.example/x.mp4"), now=NOW)
    assert vetted.status == TaskStatus.fail and vetted.output == []
    assert vetted.error is not None and vetted.error.code == "host_not_allowed"
    assert vetted.error.message == (
        "output URL refused: download host not allowed: https://evil.example:443 is not on "
        "DOWNLOAD_ALLOWED_HOSTS"
    )
    [record] = [r for r in caplog.records if r.name == "app.outputs"]
    assert record.getMessage() == (
        "output.refused code=host_not_allowed message=download host not allowed: "
        "https://evil.example:443 is not on DOWNLOAD_ALLOWED_HOSTS"
    )
