"""Real ``redis-server`` processes for tests: standalone, Sentinel and Cluster. No mocks.

A standalone server can be killed, paused (SIGSTOP: a hung server) and
restarted on the *same* port, so outage tests see exactly what a replica
sees when Redis restarts. Persistence is off (``--save "" --appendonly no``):
a restart loses every key, like a cache-only Redis in production.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"
HOST = "127.0.0.1"


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A free TCP port; with ``cluster_bus`` also port+10000 (Redis Cluster's bus) is free."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if not cluster_bus or (port + 10000 < 65536 and _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port")


def wait_until_ready(port: int, timeout: float = 10.0) -> None:
    """Poll with a raw PING until the server answers (a cluster node answers before it is ok)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.02)
    raise RuntimeError(f"redis on port {port} did not come up")


class RedisServer:
    """One ``redis-server`` process on a fixed port (chosen once, kept across restarts)."""

    def __init__(
        self, workdir: Path, port: int | None = None, args: Sequence[str] = (), tls: TlsFiles | None = None
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir / f"redis-{self.port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    def command_line(self) -> list[str]:
        ports = ("--port", str(self.port))
        if self.tls:
            ports = ("--port", "0", "--tls-port", str(self.port), *self.tls.server_args())
        return [
            REDIS_SERVER,
            *ports,
            *("--bind", HOST, "--save", "", "--appendonly", "no"),
            *("--dir", str(self.workdir), "--logfile", "server.log"),
            *self.args,
        ]

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(self.command_line(), stdout=subprocess.DEVNULL)
        if self.tls:
            self.tls.wait_until_ready(self.port)
        else:
            wait_until_ready(self.port)
        return self

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: connections drop at once, nothing is flushed (a crashed or evicted pod)."""
        if self.process is not None:
            self._signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        """Kill if running, then start again on the same port, empty."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers (a hung or partitioned server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain synchronous client for inspecting what the proxy stored."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5)


class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = (directory / name for name in ("ca.pem", "server.pem", "server.key"))
        _write_certificates(self.ca, self.cert, self.key)

    def server_args(self) -> tuple[str, ...]:
        return (
            *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"),
        )

    def wait_until_ready(self, port: int, timeout: float = 10.0) -> None:
        context = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5) as raw:
                with context.wrap_socket(raw, server_hostname=HOST) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            time.sleep(0.02)
        raise RuntimeError(f"TLS redis on port {port} did not come up")


def _write_certificates(ca_path: Path, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.UTC)
    hour, day = datetime.timedelta(hours=1), datetime.timedelta(days=1)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(
            name("ccp test CA"), name("ccp test CA"), ca_key.public_key(), 1, now - hour, now + day
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(*[False] * 5, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))])
    server = (
        x509.CertificateBuilder(
            ca.subject, name("localhost"), server_key.public_key(), 2, now - hour, now + day
        )
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


class SentinelSet:
    """One master and one sentinel monitoring it as ``service``."""

    def __init__(self, workdir: Path, service: str = "ccp-test") -> None:
        self.service = service
        self.master = RedisServer(workdir)
        self.port = free_port()
        self.conf = workdir / f"sentinel-{self.port}.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://{HOST}:{self.port}/{self.service}/0"

    def start(self) -> SentinelSet:
        self.master.start()
        self.conf.write_text(
            f"port {self.port}\nbind {HOST}\ndir {self.conf.parent}\nlogfile sentinel-{self.port}.log\n"
            f"sentinel monitor {self.service} {HOST} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 2000\n"
        )
        command = [REDIS_SERVER, str(self.conf), "--sentinel"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until_ready(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.master.kill()


_CLUSTER_ARGS = (
    *("--cluster-enabled", "yes"),
    *("--cluster-config-file", "nodes.conf"),
    *("--cluster-node-timeout", "2000"),
)


class ClusterSet:
    """Three masters (no replicas) joined with ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(
                workdir,
                free_port(cluster_bus=True),
                _CLUSTER_ARGS,
            )
            for _ in range(size)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0].port},{HOST}:{self.nodes[1].port}"

    def start(self) -> ClusterSet:
        for node in self.nodes:
            node.start()
        addresses = [f"{HOST}:{node.port}" for node in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self._wait_ok()
        return self

    def _wait_ok(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._state(node) == "ok" for node in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("cluster did not reach cluster_state:ok")

    @staticmethod
    def _state(node: RedisServer) -> str:
        with node.client() as client:
            return str(client.cluster("info")["cluster_state"])

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


MakeRedis = Callable[..., RedisServer]


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[MakeRedis]:
    """Factory: ``make_redis()`` -> a started standalone server, killed at teardown."""
    servers: list[RedisServer] = []

    def factory(port: int | None = None, args: Sequence[str] = (), tls: bool = False) -> RedisServer:
        files = TlsFiles(tmp_path / "tls") if tls else None
        server = RedisServer(tmp_path, port, args, files).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.kill()


@pytest.fixture
def redis_server(make_redis: MakeRedis) -> RedisServer:
    return make_redis()


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    sentinel = SentinelSet(tmp_path)
    try:
        yield sentinel.start()
    finally:
        sentinel.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    cluster = ClusterSet(tmp_path)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
