"""The simulator as a child process on loopback, started and controlled by tests and benchmarks."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import urllib.request
import weakref
from typing import Any

from qa_pipeline.simulator.config import HOST, FaultConfig, SimulatorConfig, to_argv
from qa_pipeline.simulator.server import LISTENING_PREFIX


class SimulatorProcess:
    """A simulator running as a child process on 127.0.0.1; `with` stops it on the way out."""

    def __init__(self, config: SimulatorConfig, startup_timeout_s: float = 30.0):
        self.config = config
        self.port = config.port
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[str] | None = None
        self._start()

    @property
    def base_url(self) -> str:
        """Root URL, without /v1 (e.g. http://127.0.0.1:PORT)."""
        return f"http://{HOST}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The base URL an OpenAI client expects: the root plus /v1."""
        return f"{self.base_url}/v1"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _start(self) -> None:
        config = self.config.model_copy(update={"port": self.port})
        process = subprocess.Popen(
            [sys.executable, "-m", "qa_pipeline.simulator", *to_argv(config)],
            stdout=subprocess.PIPE,
            text=True,
        )
        # A test run that dies without stopping us must not leave a server behind.
        weakref.finalize(self, _kill_quietly, process)
        self._process = process
        line = _read_line(process, self._startup_timeout_s)
        if not line.startswith(LISTENING_PREFIX):
            _kill_quietly(process)
            raise RuntimeError(
                f"the simulator did not start (exit code {process.poll()}, first line {line!r}); "
                "its error is on stderr above"
            )
        self.port = int(line.strip().rsplit(":", 1)[1])

    def stats(self) -> dict[str, Any]:
        """GET /simulator/stats."""
        return self._call("GET", "/simulator/stats")

    def set_faults(self, **fault_options: Any) -> FaultConfig:
        """Replace the whole fault config (options not given take their defaults, api_key included)."""
        faults = FaultConfig(**fault_options)
        self._call("POST", "/simulator/faults", faults.model_dump(mode="json"))
        return faults

    def reset_stats(self) -> None:
        self._call("POST", "/simulator/reset-stats", {})

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed vLLM would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._close_pipe()

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit within 10 s."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._close_pipe()

    def restart(self) -> None:
        """Stop it if it still runs, then start it again on the same port with its launch options
        (faults set at runtime are gone, as after a real restart)."""
        self.stop()
        self._start()

    def _close_pipe(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_simulator_process(*, startup_timeout_s: float = 30.0, **options: Any) -> SimulatorProcess:
    """Launch `python -m qa_pipeline.simulator` with SimulatorConfig options and wait until it listens."""
    return SimulatorProcess(SimulatorConfig(**options), startup_timeout_s)


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        _kill_quietly(process)
        raise TimeoutError(f"the simulator printed nothing within {timeout_s:.0f} s")
    return process.stdout.readline()


def _kill_quietly(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()

