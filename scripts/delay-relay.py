#!/usr/bin/env python3
"""delay-relay.py - a TCP relay on 127.0.0.1 that adds a fixed one-way delay.

Usage: delay-relay.py LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS

Every connection accepted on 127.0.0.1:LISTEN_PORT is relayed to
TARGET_HOST:TARGET_PORT. Each direction holds every piece of data it reads for
DELAY_MS before writing it on: bytes read at time t go out at t + DELAY_MS,
in order, and a later piece never waits longer than that for an earlier one.
A half-close (EOF) travels the same way, after the data before it. DELAY_MS
each way gives a round trip of 2 * DELAY_MS to the application protocol.

What it does not emulate: loss, reordering, a bandwidth limit, or the TCP
handshake's own round trip (connect() completes at loopback speed). TCP on
each leg still sees loopback round trips, so its windows and congestion
control are not slowed by the delay; only the application's round trips are.

Buffers are bounded: a direction stops reading from its source while more
than 64 MiB is held for its destination and resumes once it is under 32 MiB;
the socket's own write buffer is capped at 4 MiB. Reads are 256 KiB at most.
SIGTERM or SIGINT closes the listener and every connection, then exits 0.
Standard library only (asyncio).
"""

import asyncio
import collections
import signal
import socket
import sys

CHUNK = 256 * 1024  # bytes per read
QUEUE_HIGH = 64 << 20  # stop reading a source above this many held bytes
QUEUE_LOW = 32 << 20  # resume reading below this
WRITE_HIGH = 4 << 20  # transport write buffer before pause_writing()
EOF = None  # queue marker for a forwarded half-close


class Pipe:
    """One direction: bytes read from `src`, held `delay` s, written to `dst`."""

    def __init__(self, loop, delay, conn):
        self.loop = loop
        self.delay = delay
        self.conn = conn
        self.src = None  # Side we read from
        self.dst = None  # Side we write to
        self.queue = collections.deque()  # (due time, bytes or EOF)
        self.held = 0  # bytes in self.queue
        self.timer = None
        self.src_paused = False
        self.dst_blocked = False  # dst transport asked us to pause writing
        self.eof_done = False

    def push(self, data):
        self.queue.append((self.loop.time() + self.delay, data))
        if data is not EOF:
            self.held += len(data)
            if self.held > QUEUE_HIGH and not self.src_paused:
                self.src_paused = True
                self.src.transport.pause_reading()
        self.schedule()

    def schedule(self):
        if self.timer is None and self.queue and not self.dst_blocked:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self):
        self.timer = None
        dst = self.dst.transport
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now and not self.dst_blocked:
            _, data = self.queue.popleft()
            if data is EOF:
                self.eof_done = True
                if not dst.is_closing() and dst.can_write_eof():
                    try:
                        dst.write_eof()
                    except OSError:  # the destination is already gone
                        self.conn.close(abort=True)
                        return
                self.conn.maybe_finish()
                return
            self.held -= len(data)
            if dst.is_closing():
                continue  # the other side is gone; drop what was held for it
            dst.write(data)  # may call pause_writing() -> dst_blocked
        if self.src_paused and self.held < QUEUE_LOW:
            self.src_paused = False
            if not self.src.transport.is_closing():
                self.src.transport.resume_reading()
        self.schedule()

    def blocked(self, yes):
        self.dst_blocked = yes
        if yes:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        else:
            self.flush()  # anything already due goes now, the rest on time

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.held = 0


class Side(asyncio.BufferedProtocol):
    """One socket of a relayed connection (the client's or the target's)."""

    def __init__(self, conn):
        self.conn = conn
        self.transport = None
        self.inbound = None  # Pipe fed by what this socket reads
        self.outbound = None  # Pipe that writes to this socket
        self.buf = bytearray(CHUNK)

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Held data must leave as soon as it is due, not wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.made(self)

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.inbound.push(bytes(self.buf[:nbytes]))

    def eof_received(self):
        self.inbound.push(EOF)
        return True  # keep the transport open: the other direction may go on

    def pause_writing(self):
        self.outbound.blocked(True)

    def resume_writing(self):
        self.outbound.blocked(False)

    def connection_lost(self, exc):
        self.conn.lost(self)


class Connection:
    """A client socket, its target socket, and a Pipe each way."""

    def __init__(self, relay):
        self.relay = relay
        loop = relay.loop
        self.client = Side(self)
        self.target = Side(self)
        self.up = Pipe(loop, relay.delay, self)  # client -> target
        self.down = Pipe(loop, relay.delay, self)  # target -> client
        self.up.src, self.up.dst = self.client, self.target
        self.down.src, self.down.dst = self.target, self.client
        self.client.inbound, self.client.outbound = self.up, self.down
        self.target.inbound, self.target.outbound = self.down, self.up
        self.closing = False
        self.connect_task = None

    def made(self, side):
        if side is self.client:
            self.relay.conns.add(self)
            # Nothing is read from the client until the target is connected.
            side.transport.pause_reading()
            self.connect_task = self.relay.loop.create_task(self.connect())

    async def connect(self):
        try:
            await self.relay.loop.create_connection(
                lambda: self.target, self.relay.host, self.relay.port
            )
        except OSError as e:
            print(f"delay-relay: connect to {self.relay.host}:{self.relay.port}: {e}", file=sys.stderr)
            self.close(abort=True)
            return
        if self.closing:
            self.target.transport.abort()
            return
        self.client.transport.resume_reading()

    def maybe_finish(self):
        if self.up.eof_done and self.down.eof_done:
            self.close(abort=False)

    def lost(self, side):
        # A socket went away (reset, error, or closed by us). Anything else
        # that is held can no longer be answered: tear the connection down.
        self.close(abort=not self.closing)

    def close(self, abort):
        if self.closing and not abort:
            return
        self.closing = True
        self.up.stop()
        self.down.stop()
        for side in (self.client, self.target):
            t = side.transport
            if t is None:
                continue
            if abort:
                t.abort()  # also drops what a close() would still be sending
            elif not t.is_closing():
                t.close()  # sends what is buffered, then closes
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        self.relay.conns.discard(self)


class Relay:
    def __init__(self, loop, host, port, delay):
        self.loop = loop
        self.host = host
        self.port = port
        self.delay = delay
        self.conns = set()

    def shutdown(self):
        for conn in list(self.conns):
            conn.close(abort=True)


def parse_args(argv):
    usage = "usage: delay-relay.py LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS"
    if len(argv) != 5:
        sys.exit(usage)
    try:
        listen, tport, delay_ms = int(argv[1]), int(argv[3]), float(argv[4])
    except ValueError:
        sys.exit(usage + " (ports and DELAY_MS are numbers)")
    if not (0 < listen < 65536 and 0 < tport < 65536) or not 0 <= delay_ms <= 60000:
        sys.exit(usage + " (ports 1-65535, DELAY_MS 0-60000)")
    return listen, argv[2], tport, delay_ms / 1000.0


async def main(argv):
    listen, host, port, delay = parse_args(argv)
    loop = asyncio.get_running_loop()
    relay = Relay(loop, host, port, delay)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: Connection(relay).client, "127.0.0.1", listen, reuse_address=True, backlog=128
    )
    await stop.wait()
    server.close()
    relay.shutdown()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main(sys.argv))
