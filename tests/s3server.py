"""A real S3-compatible HTTP server for the tests: moto's standalone server in its own process on 127.0.0.1.

The client is not patched: s3fs (through aiobotocore) speaks HTTP to this endpoint, given as
`--storage-options '{"client_kwargs": {"endpoint_url": ...}}'`. Its credentials are moto's fixed test values,
passed through the environment only, as real ones would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from tests.conftest import free_port

# moto accepts any credentials; these only keep botocore from looking for real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """`python -m moto.server` on a free loopback port; `stop()` ends it."""

    def __init__(self, timeout: float = 60.0):
        for _ in range(3):  # the port found free may be taken before the server binds it
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait(timeout):
                return
            self.stop()
        raise RuntimeError("moto's S3 server did not start on 127.0.0.1")

    def _wait(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and self.process.poll() is None:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return True
            except OSError:
                time.sleep(0.1)
        return False

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def storage_options_json(self) -> str:
        return json.dumps(self.storage_options)

    def env(self) -> dict:
        """The environment for a process that talks to this server."""
        return {**os.environ, **CREDENTIALS}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": self.endpoint})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
