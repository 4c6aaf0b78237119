"""Headers nats-py cannot parse must not stop a connection's reader.

nats-py 2.16 decodes an inline status line (``NATS/1.0 <status> <description>``)
outside its ``try``: bytes there that are no UTF-8 raise out of its read loop, which
stops reading while the connection still reports itself connected, so every
subscription of that connection stalls. Anyone who may publish to one subject an agent
subscribes to could send them. The bus drops such headers instead.
"""

from __future__ import annotations

import anyio
import pytest
from nats.aio.msg import Msg

from swarmbus import Bus

HEADS = {
    "status not utf-8": b"NATS/1.0 \xff\xfe\r\n\r\n",
    "description not utf-8": b"NATS/1.0 503 \xff\xfe\r\n\r\n",
}


@pytest.mark.parametrize("kind", sorted(HEADS))
async def test_headers_nats_py_cannot_parse_do_not_stop_the_reader(
    bus: Bus, nats_url: str, unique: str, kind: str
) -> None:
    received: list[Msg] = []
    good = anyio.Event()

    async def on_message(msg: Msg) -> None:
        received.append(msg)
        if msg.data == b"ok":
            good.set()

    subject = f"probe.{unique}"
    await bus.nc.subscribe(subject, cb=on_message)
    await bus.nc.flush()
    head = HEADS[kind]
    host, port = nats_url.removeprefix("nats://").rsplit(":", 1)
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.receive()  # INFO
        frame = b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\n'
        frame += f"HPUB {subject} {len(head)} {len(head) + 3}\r\n".encode() + head + b"bad\r\n"
        frame += f"PUB {subject} 2\r\nok\r\nPING\r\n".encode()
        await stream.send(frame)
        assert b"PONG" in await stream.receive()  # both were routed
    with anyio.fail_after(5):
        await good.wait()
        await bus.nc.flush()  # the reader still reads the server's PONGs
    assert [m.data for m in received] == [b"bad", b"ok"]
    assert not received[0].headers  # what could not be parsed is dropped
