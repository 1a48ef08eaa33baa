"""A real S3-compatible HTTP server on loopback (moto_server) and a proxy that can drop it.

The proxy stands between the client and moto so a test can cut the connection for a few
seconds and restore it (moto itself keeps its buckets in memory: restarting it would lose
them, which is not what an outage of a real store looks like).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

from pargo_dist.runtime.rank_env import free_port  # noqa: F401  (re-exported for the tests)


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")
            time.sleep(0.1)


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def start_moto(auth_after: int | None = None) -> S3Server:
    """moto_server on a free loopback port. `auth_after`: after that many requests, moto checks
    credentials like AWS does (IAM users and keys created in those first requests)."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: install the test extras (pip install -e '.[test]')")
    port = free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": str(auth_after)} if auth_after is not None else {})}
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/")
    except RuntimeError:
        proc.kill()
        raise
    return S3Server(endpoint, proc)


class OutageProxy:
    """TCP forwarder on loopback; during `outage(seconds)` it drops every open and new connection.

    `dropped` counts the connections refused during outages: a client that got through an
    outage with dropped > 0 provably retried.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.dropped = 0
        self._dropping = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage(self, seconds: float) -> None:
        """Drop everything now and for `seconds`, then forward again."""
        with self._lock:
            self._dropping = True
            conns, self._conns = self._conns, []
        for c in conns:
            self._close(c)
        timer = threading.Timer(seconds, self._restore)
        timer.daemon = True
        timer.start()

    def _restore(self) -> None:
        with self._lock:
            self._dropping = False

    @staticmethod
    def _close(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                dropping = self._dropping
                if dropping:
                    self.dropped += 1
            if dropping:
                self._close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                self._close(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
