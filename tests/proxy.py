"""A TCP proxy to the test server that does to replication connections what a network does, run
as its own process (`ProxyProcess`): a test whose code under test holds the GIL still sees the
proxy move bytes, so a blocking wait fails the test rather than deadlocking it.

- `cut`: close the client's side of every replication connection, as a blip or an idle cut by a
  proxy does; the server keeps its end, and its walsender the slot, until wal_sender_timeout.
- `--hold-answer-to TEXT --release-after S`: hold the server's answers on the connection that
  sent TEXT back for S seconds.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class _Proxy:
    def __init__(self, upstream: tuple[str, int], hold_answer_to: bytes | None, release_after: float, port: int = 0) -> None:
        self.upstream = upstream
        self.hold_answer_to = hold_answer_to
        self.release_after = release_after
        self.listener = socket.create_server(("127.0.0.1", port))
        self.replication: list[tuple[socket.socket, socket.socket]] = []
        self.cut: set[socket.socket] = set()

    def serve(self) -> None:
        while True:
            client, _ = self.listener.accept()
            try:
                server = socket.create_connection(self.upstream)
            except OSError:  # the server is down (restarting): refused to the client, as without a proxy
                client.close()
                continue
            hold_until: list[float] = []  # the instant this connection's answers flow again, once held
            threading.Thread(target=self._pump, args=(client, server, True, hold_until), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, hold_until), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool, hold_until: list[float]) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    raise OSError("closed")
                if from_client and b"replication\x00database" in data:
                    self.replication.append((source, target))
                if from_client and self.hold_answer_to and self.hold_answer_to in data:
                    hold_until.append(time.monotonic() + self.release_after)
                if not from_client and hold_until:
                    time.sleep(max(0.0, hold_until[0] - time.monotonic()))
                target.sendall(data)
            except OSError:
                if source not in self.cut and target not in self.cut:  # an ordinary close: passed on
                    for sock in (source, target):
                        try:  # shutdown first: close() alone sends nothing while the other pump reads the socket
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        sock.close()
                return

    def cut_replication(self) -> None:
        for client, server in self.replication:
            self.cut.update((client, server))
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already, by either side (an engine restarted, a server restart)
                pass
            client.close()
        self.replication.clear()


class ProxyProcess:
    """The proxy in a process of its own; `dsn` reaches the server through it."""

    def __init__(self, dsn: str, *, hold_answer_to: str | None = None, release_after: float = 0.0, port: int = 0) -> None:
        params = conninfo_to_dict(dsn)
        args = [sys.executable, "-m", "tests.proxy", params["host"], str(params["port"]), "--listen-port", str(port)]
        if hold_answer_to:
            args += ["--hold-answer-to", hold_answer_to, "--release-after", str(release_after)]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=Path(__file__).resolve().parents[1])
        self.dsn = make_conninfo(dsn, port=int(self.process.stdout.readline()))

    def cut_replication(self) -> None:
        self.process.stdin.write("cut\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "cut"

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--hold-answer-to")
    parser.add_argument("--release-after", type=float, default=0.0)
    parser.add_argument("--listen-port", type=int, default=0, help="the port to listen on (default: any free one)")
    args = parser.parse_args()
    proxy = _Proxy((args.host, args.port), args.hold_answer_to and args.hold_answer_to.encode(), args.release_after, args.listen_port)
    threading.Thread(target=proxy.serve, daemon=True).start()
    print(proxy.listener.getsockname()[1], flush=True)
    for command in sys.stdin:  # until the test closes it
        if command.strip() == "cut":
            proxy.cut_replication()
            print("cut", flush=True)


if __name__ == "__main__":
    main()
