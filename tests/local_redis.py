"""A throw-away redis-server on loopback, for the serve tests and bench/bench_realtime.py."""
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(exe: str, port: int, workdir=None, timeout: float = 5.0) -> subprocess.Popen:
    """Starts redis-server (no persistence) on 127.0.0.1:port and waits until it answers PING.

    Raises:
        RuntimeError: it did not answer within timeout seconds (the process is killed).
    """
    import redis

    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if workdir is not None:
        args += ["--dir", str(workdir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not answer on port {port} within {timeout} s") from None
            time.sleep(0.05)
