"""A real ``tritonserver`` (2.51, from the ``nvidia-pytriton`` wheel) on loopback ports, for tests and benchmarks.

Install it beside the project's environment, without touching the project's numpy::

    .venv/bin/pip install --no-deps --target .venv/triton nvidia-pytriton==0.7.0 'numpy<2'

(or point ``I2P_TRITON_HOME`` at such a folder). Why a separate folder with numpy < 2: the Python backend
in this build hands BYTES tensors to Python through a pybind11 that predates numpy 2, and under numpy 2
it reads every byte as the first one (seen here: a 4-byte length of 0x03030303). The backend's stub runs
the Python of the first ``python3`` on PATH with an isolated ``sys.path`` (PYTHONPATH is ignored), so the
server gets a small venv of its own whose ``.pth`` puts that folder's numpy first, then this
environment's site-packages (i2p, Pillow, ONNX Runtime). The binary also needs the wheel's bundled
libraries on LD_LIBRARY_PATH and a backend directory holding ``python/`` = the wheel's backend files plus
the stub for this Python version.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from pathlib import Path

HOME_ENV = "I2P_TRITON_HOME"
INSTALL = ".venv/bin/pip install --no-deps --target .venv/triton nvidia-pytriton==0.7.0 'numpy<2'"


def triton_home() -> Path:
    """Where the wheel was installed: $I2P_TRITON_HOME, else <this environment>/triton."""
    return Path(os.environ.get(HOME_ENV) or Path(sys.prefix) / "triton")


def missing_reason() -> str | None:
    """Why the real server cannot run here (a pytest skip reason), or None when it can."""
    home = triton_home()
    if not (home / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        return f"no tritonserver under {home} (install the nvidia-pytriton wheel: {INSTALL})"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (home / "pytriton" / "tritonserver" / "python_backend_stubs" / version).is_dir():
        return f"the nvidia-pytriton wheel has no Python backend stub for Python {version}"
    if not (home / "numpy").is_dir():
        return f"no numpy < 2 in {home} for the server's Python backend (install with: {INSTALL})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """``tritonserver`` serving ``repo``; ``start()`` returns once every model is loaded and ready."""

    def __init__(self, repo: Path, workdir: Path) -> None:
        self.repo, self.workdir = Path(repo), Path(workdir)
        self.home = triton_home()
        self.process: subprocess.Popen[bytes] | None = None
        self.http_port = self.grpc_port = 0
        self.log = self.workdir / "tritonserver.log"
        self._prepare()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def _prepare(self) -> None:
        """The backend directory and the server's Python environment (both symlinks and one .pth)."""
        server = self.home / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for f in [
            *(server / "backends" / "python").iterdir(),
            server / "python_backend_stubs" / version / "triton_python_backend_stub",
        ]:
            if f.is_file() and not (backend / f.name).exists():
                (backend / f.name).symlink_to(f)
        env = self.workdir / "python-env"
        if not (env / "bin" / "python3").exists():
            venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
        site = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
        ours = sysconfig.get_paths()["purelib"]
        (site / "i2p_triton_server.pth").write_text(f"{self.home}\nimport site; site.addsitedir({ours!r})\n")
        self.python_env = env

    def start(self, timeout: float = 120.0) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("already started")
        self.http_port, self.grpc_port = free_port(), free_port()
        server = self.home / "pytriton" / "tritonserver"
        env = dict(os.environ)
        env["PATH"] = f"{self.python_env / 'bin'}:{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = ":".join(
            filter(None, [str(self.home / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")])
        )
        command = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={self.workdir / 'backends'}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false", "--exit-timeout-secs=30", "--log-verbose=0",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """Server up and every model in the repository loaded (Triton's strict readiness)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (Triton drains and unloads), SIGKILL if it hangs; returns the exit status.

        Triton gives the models ``--exit-timeout-secs`` (30) to unload and then exits forcibly, which can
        abort (signal 6) in its own teardown. CI once saw that abort with a 10 s allowance on a loaded 2-core
        machine; a longer one is the likely cure, and the test prints the server log if it recurs.
        """
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
