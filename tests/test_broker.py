"""NATS as the fan-out engine (GATEWAY_BROKER, gateway/broker.py), against a real nats-server.

The same guarantees as with LISTEN: every event once, in order, resume across processes,
presence; plus what is new: subjects no topic can escape, interest per process, identical
GATEWAY_TABLES, and the chaos of the broker itself (kill -9 of nats-server during writes),
of a replica and of the relay's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.broker import Broker, subject, tables_digest
from gateway.errors import ConfigError

from . import natsserver
from .gwtest import REPO, GatewayProcess, bare_env, running_gateway, settings_env
from .natsserver import NatsServer
from .pgconn import pg_connect
from .polling import eventually
from .presencetest import Watcher
from .test_no_loss import (
    TABLES,
    TOPIC,
    Reader,
    assert_all_got_the_log,
    continuous_writer,
    log_seq,
    seq,
    subscribed_readers,
    wait_head,
)
from .test_presence import FAST, WATCH, Cluster

needs_nats = pytest.mark.skipif(
    natsserver.binary() is None,
    reason="nats-server not found (Debian package nats-server; .ci/run installs it)",
)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    if natsserver.binary() is None:
        pytest.skip("nats-server not found (Debian package nats-server; .ci/run installs it)")
    server = NatsServer(tmp_path / "nats.log").start()
    try:
        yield server
    finally:
        server.stop()


# --- without a server ---------------------------------------------------------------------


def test_no_topic_can_address_another_subject() -> None:
    topics = ["user:1", "a.b:c", "x:>", "x:*", "room:a.b.>", "k:" + "z" * 198]
    subjects = [subject("gateway", t) for t in topics]
    assert len(set(subjects)) == len(topics)
    for s in subjects:
        prefix, t, token = s.split(".")
        assert (prefix, t) == ("gateway", "t")
        assert token and set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"), s


def test_broker_settings_are_checked_with_a_clear_error(tmp_path: Path) -> None:
    def load(**env: str) -> config.Settings:
        return config.load({config.env_name(k): v for k, v in env.items()})

    with pytest.raises(ConfigError, match="without credentials"):
        load(broker="nats://nats.internal:4222")
    with pytest.raises(ConfigError, match=r"GATEWAY_BROKER=\*\*\* is not valid: expected NATS URLs"):
        load(broker="http://nats.internal:4222")
    with pytest.raises(ConfigError, match=r"GATEWAY_BROKER_CREDS=.* no such file"):
        load(broker="nats://nats.internal:4222", broker_creds=str(tmp_path / "none.creds"))
    with pytest.raises(ConfigError, match="GATEWAY_BROKER_TLS_KEY is set without"):
        load(broker="nats://127.0.0.1:4222", broker_tls_key=str(tmp_path))
    with pytest.raises(ConfigError, match="GATEWAY_BROKER_SUBJECT_PREFIX"):
        load(broker_subject_prefix="gw.>")
    # Loopback needs no credentials; a password or a token is never printed.
    assert load(broker="nats://127.0.0.1:4222").broker == ("nats://127.0.0.1:4222",)
    s = load(broker="nats://gw:s3cret@a:4222,nats://t0ken@b:4222")
    assert s.masked()["GATEWAY_BROKER"] == "nats://***@a:4222,nats://***@b:4222"
    # Two spellings of one allow-list are the same list.
    assert tables_digest("Items; public.other(b,a)") == tables_digest("public.items;other(b,a)")


def test_postgres_only_mode_runs_without_nats_py_and_the_broker_mode_says_what_to_install(dsn: str) -> None:
    # nats-py made unimportable, as on a machine where it was never installed.
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "import gateway.server, gateway.cli\n"
        "from gateway import config\n"
        "from gateway.server import build_app\n"
        "build_app(config.load())\n"
        "print('postgres-only ok')\n"
        "import os; os.environ['GATEWAY_BROKER'] = 'nats://127.0.0.1:4222'\n"
        "build_app(config.load())\n"
    )
    env = dict(bare_env(), **settings_env(dsn))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert "postgres-only ok" in out.stdout, out.stderr
    assert "nats-py) is not installed: pip install 'pg-ws-gateway[nats]'" in out.stderr


async def test_a_creds_file_without_nkeys_installed_is_refused_with_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("nats")
    monkeypatch.setitem(sys.modules, "nkeys", None)  # `import nkeys` fails, as where it is not installed
    creds = tmp_path / "gateway.creds"
    creds.write_text("not read: the check comes first")
    broker = Broker(("nats://127.0.0.1:1",), creds=str(creds))
    with pytest.raises(ConfigError, match="nkeys package is not installed: pip install nkeys"):
        await broker.start()


# --- one process ----------------------------------------------------------------------------


@needs_nats
async def test_delivery_through_the_broker_with_interest_per_topic_and_no_listen(
    items: str, nats: NatsServer
) -> None:
    # Heads checked once a minute only: what arrives in time came through NATS.
    async with running_gateway(items, tables=TABLES, broker=nats.url, broker_check_interval="60") as gw:
        broker = gw.state.listener
        assert isinstance(broker, Broker) and broker.connected
        # No LISTEN connection: the gateway's sessions listen on nothing but the relay's poll channel.
        c = await gw.connect("1")
        ack = await c.subscribe(TOPIC)
        assert set(broker._subs) == {TOPIC}
        assert 'gateway_db_sessions{use="listener"} 0.0' in await gw.metrics()
        conn = await pg_connect(items)
        try:
            for i in range(5):
                await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, $1)", f"t{i}")
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (2, 'not wanted here')")
            got = await c.events(5, timeout=5)
            assert [e["pos"] for e in got] == list(range(ack["pos"] + 1, ack["pos"] + 6))
            assert seq(got) == (await log_seq(items))[ack["pos"] :]
            # user:2 has no subscriber here: its doorbell never reached this process.
            received = gw.state.pipeline.received
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (2, 'again')")
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'last')")
            (last,) = await c.events(1, timeout=5)
            assert last["row"]["title"] == "last"
            assert gw.state.pipeline.received == received + 1
            # The last subscriber leaves: the subscription goes with it.
            await c.send({"type": "unsubscribe", "topic": TOPIC, "id": 9})
            await c.expect("unsubscribed")
            assert broker._subs == {}
        finally:
            await conn.close()
            await c.close()


@needs_nats
async def test_a_lost_last_doorbell_is_found_by_the_head_check(items: str, nats: NatsServer) -> None:
    async with running_gateway(items, tables=TABLES, broker=nats.url, broker_check_interval="0.5") as gw:
        c = await gw.connect("1")
        ack = await c.subscribe(TOPIC)
        # The relay's doorbells vanish (as if NATS dropped them): only the log can tell.
        gw.state.relay._outlet = None
        conn = await pg_connect(items)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_notify('gateway', 'ignored: nobody listens in broker mode')")
            # NOTIFY on channel gateway reaches nobody in broker mode; the head check delivers.
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'lost bell')")
            (e,) = await c.events(1, timeout=5)
            assert e["pos"] == ack["pos"] + 1 and e["row"]["title"] == "lost bell"
        finally:
            await conn.close()
            await c.close()


@needs_nats
async def test_a_slow_consumer_notice_catches_every_topic_up_once(items: str, nats: NatsServer) -> None:
    """NATS drops messages for a subscriber that falls behind and says so (SlowConsumerError
    through the error callback): the dropped doorbells are made good from the log, once for a
    burst of notices. The notices are handed to the callback as nats-py hands them; filling a
    real subscriber's pending limit (half a million messages by default) would take minutes."""
    from nats.errors import SlowConsumerError

    async with running_gateway(items, tables=TABLES, broker=nats.url, broker_check_interval="60") as gw:
        broker = gw.state.listener
        c = await gw.connect("1")
        ack = await c.subscribe(TOPIC)
        gw.state.relay._outlet = None  # the doorbells of what follows are lost, as NATS drops them
        conn = await pg_connect(items)
        try:
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'dropped bell')")
        finally:
            await conn.close()
        with pytest.raises((TimeoutError, AssertionError)):
            await c.recv(0.5)  # nothing: its doorbell was dropped, and no head check is due
        reads_before = gw.state.pipeline._log.head_reads
        for _ in range(50):
            await broker._on_error(SlowConsumerError("s", "", 1, None))  # type: ignore[arg-type]
        (e,) = await c.events(1, timeout=5)
        assert e["pos"] == ack["pos"] + 1 and e["row"]["title"] == "dropped bell"
        assert broker.slow_consumer == 50
        await asyncio.sleep(0.3)
        assert gw.state.pipeline._log.head_reads - reads_before == 1  # one catch-up for the burst
        await c.close()


@needs_nats
async def test_a_broker_outage_keeps_the_process_ready_and_delivering_from_the_log(
    items: str, nats: NatsServer
) -> None:
    async with running_gateway(items, tables=TABLES, broker=nats.url, broker_check_interval="60") as gw:
        broker = gw.state.listener
        c = await gw.connect("1")
        ack = await c.subscribe(TOPIC)
        nats.kill()
        await eventually(lambda: not broker.connected, 10, "the broker connection to be seen lost")
        assert (await gw.ready())[0] == 200
        assert "gateway_listener_connected 0.0" in await gw.metrics()
        conn = await pg_connect(items)
        try:
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'during the outage')")
            (e,) = await c.events(1, timeout=5)  # within the outage's one-second catch-ups
            assert e["pos"] == ack["pos"] + 1
            nats.start()
            await eventually(lambda: broker.connected, 15, "the broker to reconnect")
            assert broker.reconnects == 1
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'after')")
            (e,) = await c.events(1, timeout=5)
            assert e["pos"] == ack["pos"] + 2
            assert "gateway_broker_published" in await gw.metrics()
        finally:
            await conn.close()
            await c.close()


@needs_nats
async def test_a_broker_with_a_password_admits_the_right_one_only(items: str, tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats-auth.log", user="gw", password="right-password").start()
    try:
        wrong = GatewayProcess(
            items,
            tmp_path / "wrong.log",
            tables=TABLES,
            broker=server.url.replace("right-password", "Wr0ngPassw0rd"),
        )
        with pytest.raises(AssertionError, match="did not start"):
            await wrong.start()
        text = wrong.log_path.read_text()
        (refusal,) = [line for line in text.splitlines() if "cannot connect to the broker" in line]
        # The cause is named: the server's "Authorization Violation" when the client read it,
        # else the reset it raced into (the server closes right after its -ERR, and the client's
        # PING arriving after that close makes the kernel discard the unread -ERR): a race no
        # client setting avoids. The server's own log says it was the password, either way.
        assert "nats://***@127.0.0.1" in refusal, refusal
        assert "Authorization Violation" in refusal or "ConnectionResetError" in refusal, refusal
        assert "authentication error" in server.log_path.read_text()
        assert "Wr0ngPassw0rd" not in text  # the password is never printed
        async with running_gateway(items, tables=TABLES, broker=server.url) as gw:
            c = await gw.connect("1")
            ack = await c.subscribe(TOPIC)
            conn = await pg_connect(items)
            try:
                await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'authenticated')")
            finally:
                await conn.close()
            (e,) = await c.events(1, timeout=5)
            assert e["pos"] == ack["pos"] + 1
            await c.close()
    finally:
        server.stop()


# --- several processes ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker_process(
    dsn: str, tmp_path: Path, name: str, nats: NatsServer, **settings: Any
) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(dsn, tmp_path / f"{name}.log", **{"tables": TABLES, "broker": nats.url, **settings})
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@needs_nats
async def test_a_process_with_other_tables_refuses_to_start(
    items: str, nats: NatsServer, tmp_path: Path
) -> None:
    async with running_gateway(items, tables=TABLES, broker=nats.url):
        other = GatewayProcess(items, tmp_path / "other.log", tables="", broker=nats.url)
        with pytest.raises(AssertionError, match="did not start"):
            await other.start()
        assert other.proc is not None and other.proc.returncode is not None
        assert "GATEWAY_TABLES differs from the gateway processes already on this broker" in (
            other.log_path.read_text()
        )
        # The same list spelled another way is the same list.
        async with broker_process(items, tmp_path, "same", nats, tables="Items"):
            pass


@needs_nats
async def test_serve_with_two_workers_on_one_broker(items: str, nats: NatsServer, tmp_path: Path) -> None:
    # Each worker has its own broker connection; the second asks the first for its tables.
    gw = GatewayProcess(
        items, tmp_path / "two.log", tables=TABLES, broker=nats.url, broker_check_interval="60"
    )
    gw.env["GATEWAY_WORKERS"] = "2"
    await gw.start()
    try:
        # start() returns once one worker answers; the other may still be connecting.
        await eventually(
            lambda: gw.log_path.read_text().count("gateway ready") == 2, 30, "both workers to be ready"
        )
        clients = [await gw.connect("1") for _ in range(6)]  # SO_REUSEPORT spreads them
        acks = [await c.subscribe(TOPIC) for c in clients]
        conn = await pg_connect(items)
        try:
            await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'to both workers')")
        finally:
            await conn.close()
        for c, ack in zip(clients, acks, strict=True):
            (e,) = await c.events(1, timeout=5)
            assert e["pos"] == ack["pos"] + 1
            await c.close()
    finally:
        await gw.stop()
    assert "GATEWAY_TABLES differs" not in gw.log_path.read_text()
    assert gw.log_path.read_text().count("broker connected") == 2


@needs_nats
async def test_resume_on_another_process_through_the_broker(
    items: str, nats: NatsServer, tmp_path: Path
) -> None:
    async with (
        running_gateway(items, tables=TABLES, broker=nats.url, broker_check_interval="60") as gw_a,
        broker_process(items, tmp_path, "gw_b", nats, broker_check_interval="60") as gw_b,
    ):
        client = await gw_a.connect("1")
        ack = await client.subscribe(TOPIC)
        reader = Reader(client, "a")
        stop = asyncio.Event()
        writer = asyncio.create_task(continuous_writer(items, stop))
        try:
            await wait_head(items, ack["pos"] + 20)
            await reader.wait_pos(ack["pos"] + 20)
            await reader.stop()  # the client goes away
            last = reader.events[-1]
            await wait_head(items, last["pos"] + 20)  # missed while away
            again = await gw_b.connect("1")
            resumed = await again.subscribe(TOPIC, since=(last["epoch"], last["pos"]))
            assert resumed["recovered"] is True and resumed["events"], resumed
            reader_b = Reader(again, "b", gw_b.log_path)
            await asyncio.sleep(0.3)  # live events through gw_b's own subscription too
        finally:
            stop.set()
            await writer
        events = reader.events + resumed["events"]
        await reader_b.wait_pos((await log_seq(items))[-1][0])
        events += reader_b.events
        expected = (await log_seq(items))[ack["pos"] :]
        assert seq(events) == expected
        await reader_b.stop()


@needs_nats
async def test_presence_converges_across_processes_through_the_broker(
    dsn: str, nats: NatsServer, tmp_path: Path
) -> None:
    cluster = Cluster(dsn, tmp_path)
    try:
        gw1, gw2 = await cluster.start(2, broker=nats.url, broker_check_interval="60")
        early = await cluster.watch(gw1, "watch1")
        await cluster.connect(gw1, "alice")
        await cluster.connect(gw2, "bob")
        everyone = {"alice": "online", "bob": "online", "watch1": "online"}
        await early.until(everyone, timeout=10)
        late = Watcher(await cluster.connect(gw2, "watch2", WATCH))
        await late.subscribe()
        everyone["watch2"] = "online"
        await late.until(everyone, timeout=10)
        await early.until(everyone, timeout=10)
    finally:
        await cluster.close()
    assert FAST  # the presence tests' fast timings, used by cluster.start


# --- chaos ------------------------------------------------------------------------------------


async def relay_holder_pid(dsn: str) -> int | None:
    conn = await pg_connect(dsn)
    try:
        holder = await conn.fetchval("SELECT holder FROM gateway.relay WHERE lease_until > now()")
    finally:
        await conn.close()
    return int(holder.split(":")[1]) if holder else None


@needs_nats
async def test_kill_9_of_nats_the_relay_s_process_and_a_replica_restart_lose_nothing(
    items: str, nats: NatsServer, tmp_path: Path
) -> None:
    """Every client gets every event exactly once, in order, through: nats-server killed with
    -9 during writes and started again, the relay's process killed with -9, and a replica
    restarted (its client resuming on the new process)."""
    async with broker_process(items, tmp_path, "gw_relay", nats) as gw_relay:
        assert gw_relay.proc is not None
        relay_pid = gw_relay.proc.pid
        await eventually(
            lambda: relay_pid_is(items, relay_pid), 15, "the first process to hold the relay's lease"
        )
        async with (
            running_gateway(items, tables=TABLES, broker=nats.url) as gw_a,
            broker_process(items, tmp_path, "gw_c", nats) as gw_c,
        ):
            (reader_a, reader_c), epoch = await subscribed_readers([("a", gw_a), ("c", gw_c)])
            stop = asyncio.Event()
            writer = asyncio.create_task(continuous_writer(items, stop))
            try:
                h = await wait_head(items, 30)
                await reader_a.wait_pos(h)

                # 1. The broker dies mid-writes; the processes catch up from the log meanwhile.
                nats.kill()
                h = await wait_head(items, h + 40)
                await reader_a.wait_pos(h)  # delivered during the outage
                await reader_c.wait_pos(h)
                nats.start()
                h = await wait_head(items, h + 40)
                await reader_a.wait_pos(h)
                await reader_c.wait_pos(h)

                # 2. The relay's process dies: another takes the lease over.
                gw_relay.kill()
                await eventually(
                    lambda: relay_pid_is_not(items, relay_pid), 20, "another process to take the relay over"
                )
                h = await wait_head(items, h + 40)
                await reader_a.wait_pos(h)
                await reader_c.wait_pos(h)

                # 3. A replica restarts; its client resumes on the new process.
                await reader_c.wait_pos(h)
                await gw_c.stop()
                await eventually(lambda: reader_c.closed is not None, 10, "c's client to be closed")
                last = reader_c.events[-1]
                h = await wait_head(items, h + 30)  # committed while c is away
                await gw_c.start()
                client = await gw_c.connect("1")
                resumed = await client.subscribe(TOPIC, since=(last["epoch"], last["pos"]))
                assert resumed["recovered"] is True, resumed
                reader_c2 = Reader(client, "c after restart", gw_c.log_path)
                h = await wait_head(items, h + 30)
            finally:
                stop.set()
                await writer
            expected = await assert_all_got_the_log(items, [reader_a], epoch)
            marker = expected[-1][0]
            await reader_c2.wait_pos(marker)
            got_c = seq(reader_c.events) + seq(resumed["events"]) + seq(reader_c2.events)
            assert got_c == expected, "the restarted replica's client got another sequence than the log"
            for r in (reader_a, reader_c, reader_c2):
                await r.stop()


async def relay_pid_is(dsn: str, pid: int) -> bool:
    return await relay_holder_pid(dsn) == pid


async def relay_pid_is_not(dsn: str, pid: int) -> bool:
    holder = await relay_holder_pid(dsn)
    return holder is not None and holder != pid


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by it (openssl)."""
    files = {
        name: directory / name
        for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
    }

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
            "-keyout", str(files["ca.key"]), "-out", str(files["ca.pem"]))  # fmt: skip
    for who, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        csr = directory / f"{who}.csr"
        ext = directory / f"{who}.ext"
        ext.write_text(extra + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
                "-keyout", str(files[f"{who}.key"]), "-out", str(csr))  # fmt: skip
        openssl("x509", "-req", "-in", str(csr), "-CA", str(files["ca.pem"]), "-CAkey", str(files["ca.key"]),
                "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(files[f"{who}.pem"]))  # fmt: skip
    return files


@needs_nats
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found (Debian package openssl)")
async def test_a_broker_over_mutual_tls_admits_a_trusted_client_only(items: str, tmp_path: Path) -> None:
    certs = _certificates(tmp_path)
    server = NatsServer(
        tmp_path / "nats-tls.log",
        args=(
            "--tlsverify",
            "--tlscert",
            str(certs["server.pem"]),
            "--tlskey",
            str(certs["server.key"]),
            "--tlscacert",
            str(certs["ca.pem"]),
        ),
    ).start()
    url = f"tls://127.0.0.1:{server.port}"
    try:
        # Without the client certificate the server refuses the handshake: the start says so.
        anonymous = GatewayProcess(
            items, tmp_path / "anonymous.log", tables=TABLES, broker=url, broker_tls_ca=str(certs["ca.pem"])
        )
        with pytest.raises(AssertionError, match="did not start"):
            await anonymous.start()
        assert "cannot connect to the broker" in anonymous.log_path.read_text()
        async with running_gateway(
            items,
            tables=TABLES,
            broker=url,
            broker_tls_ca=str(certs["ca.pem"]),
            broker_tls_cert=str(certs["client.pem"]),
            broker_tls_key=str(certs["client.key"]),
        ) as gw:
            c = await gw.connect("1")
            ack = await c.subscribe(TOPIC)
            conn = await pg_connect(items)
            try:
                await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'over tls')")
            finally:
                await conn.close()
            (e,) = await c.events(1, timeout=5)
            assert e["pos"] == ack["pos"] + 1 and e["row"]["title"] == "over tls"
            await c.close()
    finally:
        server.stop()
