"""The spooled request body (read like bytes from a file) and the STOW-RS memory budget."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from triage.serve.budget import ByteBudget
from triage.serve.multipart import split_multipart
from triage.serve.spool import BodyTooLarge, FileBody, InvalidLength, Spooled, spool_body


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def spool(tmp_path: Path, data: bytes, **opts: object) -> Spooled:
    kwargs: dict[str, object] = {"declared_length": None, "limit": 10**9, "min_free_bytes": 0}
    kwargs.update(opts)
    return asyncio.run(spool_body(chunks_of(data, 1000), tmp_path, **kwargs))  # type: ignore[arg-type]


def test_a_spooled_body_reads_like_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FileBody, "WINDOW", 7)  # delimiters straddle every window edge
    data = (
        b"pre\r\n--xyz\r\nA: 1\r\n\r\n" + bytes(range(256)) * 3 + b"\r\n--xyz\r\n\r\nb\r\n--xyz--"
    )
    spooled = spool(tmp_path, data)
    assert spooled.path.read_bytes() == data and spooled.size == len(data)
    with spooled.opened() as body:
        assert len(body) == len(data)
        assert body[0] == data[0] and body[-1] == data[-1]
        assert body[5:40] == data[5:40] and body[len(data) - 3 :] == data[-3:]
        for needle in (b"--xyz", b"\r\n\r\n", b"absent", bytes([255, 0, 1])):
            for start in (0, 1, 9, 30):
                assert body.find(needle, start) == data.find(needle, start)
        assert body.find(b"--xyz", 0, 10) == data.find(b"--xyz", 0, 10)
        got = [(p.headers, body[p.start : p.end]) for p in split_multipart(body, "xyz")]
    want = [(p.headers, data[p.start : p.end]) for p in split_multipart(data, "xyz")]
    assert got == want and len(got) == 2
    spooled.remove()
    assert list(tmp_path.iterdir()) == []


def test_an_over_limit_body_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(BodyTooLarge):
        spool(tmp_path, b"x" * 5000, limit=4096)
    with pytest.raises(BodyTooLarge):
        spool(tmp_path, b"x", declared_length="10737418240", limit=4096)
    with pytest.raises(InvalidLength):
        spool(tmp_path, b"x", declared_length="1e3")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_body_spools_to_an_empty_file(tmp_path: Path) -> None:
    spooled = spool(tmp_path, b"")
    with spooled.opened() as body:
        assert len(body) == 0 and body[0:10] == b"" and body.find(b"--") == -1
    spooled.remove()


def test_the_budget_holds_parts_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("a", "big", "c")}

        async def part(name: str, size: int) -> None:
            async with budget.hold(size) as held:
                order.append(f"{name}+{held}")
                assert budget.used <= budget.capacity
                await release[name].wait()
            order.append(f"{name}-")

        tasks = [asyncio.create_task(part("a", 60))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(part("big", 10**9)))  # more than the whole budget
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(part("c", 10)))  # fits, but waits behind "big"
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a+60"]
        release["a"].set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a+60", "a-", "big+100"]
        release["big"].set()
        release["c"].set()
        await asyncio.gather(*tasks)
        assert budget.used == 0
        return order

    assert asyncio.run(scenario()) == ["a+60", "a-", "big+100", "big-", "c+10", "c-"]


def test_a_cancelled_waiter_does_not_block_the_budget() -> None:
    async def scenario() -> int:
        budget = ByteBudget(10)
        gate = asyncio.Event()

        async def hold(size: int) -> None:
            async with budget.hold(size):
                await gate.wait()

        first = asyncio.create_task(hold(10))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(hold(10))
        await asyncio.sleep(0)
        waiter.cancel()
        gate.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await waiter
        async with budget.hold(10):
            pass
        return budget.used

    assert asyncio.run(scenario()) == 0


def test_file_body_reads_past_short_preads(tmp_path: Path) -> None:
    path = tmp_path / "b"
    path.write_bytes(b"0123456789" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        body = FileBody(fd, 10_000)
        assert body[9_995:] == b"56789"
        with pytest.raises(IndexError):
            body[10_000]
    finally:
        os.close(fd)
