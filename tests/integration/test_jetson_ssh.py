"""The jetson backend for real over SSH, against an sshd on 127.0.0.1 started by the test.

Host keys are checked (a known_hosts file holds the test host key). trtexec, tegrastats, nvpmodel
and jetson_clocks are STAND-INS from tests/fixtures/backends/standins (put first on the remote
PATH with sshd's SetEnv); they label themselves, so every result here must be ``simulated``.
Skipped when /usr/sbin/sshd is absent (CI installs openssh-server).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.tiny_models import export_tiny

from qtool.backends import BenchOptions
from qtool.backends.runner import run_bench
from qtool.errors import BackendError

SSHD = Path("/usr/sbin/sshd")
STANDINS = Path(__file__).resolve().parents[1] / "fixtures" / "backends" / "standins"

pytestmark = pytest.mark.skipif(
    not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="needs /usr/sbin/sshd, ssh and ssh-keygen (apt-get install openssh-server openssh-client)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _install_standins(bin_dir: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(f"#!{sys.executable}\n" + (STANDINS / "standin_trtexec.py").read_text())
    for name in ("tegrastats", "nvpmodel", "jetson_clocks"):
        shutil.copy(STANDINS / f"standin_{name}.sh", bin_dir / name)
    for f in bin_dir.iterdir():
        f.chmod(0o755)


class Sshd:
    """A throwaway sshd on 127.0.0.1 plus the client-side files to reach it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        host_key = _keygen(root / "host_key")
        self.client_key = _keygen(root / "client_key")
        self.wrong_key = _keygen(root / "wrong_key")
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        self.ctl = root / "ctl" / "mode"
        self.ctl.parent.mkdir()
        self.remote_tmp = root / "remote_tmp"
        self.remote_tmp.mkdir()
        self.cache = root / "remote_cache"
        _install_standins(root / "bin")
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "LogLevel ERROR",
            f"SetEnv PATH={root / 'bin'}:/usr/local/bin:/usr/bin:/bin TMPDIR={self.remote_tmp} "
            f"QTOOL_STANDIN_CTL={self.ctl}",
        ]) + "\n")
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {(root / 'host_key.pub').read_text()}")
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
            # sshd run as root refuses to start without its privilege-separation dir (systemd makes it).
            Path("/run/sshd").mkdir(mode=0o755)
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=open(root / "sshd.log", "wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        pytest.skip(f"sshd did not start: {(root / 'sshd.log').read_text()[-300:]}")

    def options(self, key: Path | None = None, port: int | None = None, **kw) -> BenchOptions:
        ssh = [f"Port={port or self.port}", f"IdentityFile={key or self.client_key}", "IdentitiesOnly=yes",
               f"UserKnownHostsFile={self.known_hosts}", "GlobalKnownHostsFile=/dev/null", "ConnectTimeout=5"]
        return BenchOptions(host=f"{_user()}@127.0.0.1", ssh_options=ssh, ssh_config=os.devnull,
                            remote_cache_dir=str(self.cache), iterations=20, min_time_s=0, warmup_ms=10, **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _processes_running(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (read from /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(d.name))
    return pids


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"fixed": export_tiny(d / "tiny.onnx"), "dynamic": export_tiny(d / "tiny_dyn.onnx", dynamic=True)}


def _mode(sshd: Sshd, mode: str) -> None:
    sshd.ctl.write_text(mode)
    (sshd.ctl.parent / "args.log").unlink(missing_ok=True)


def test_full_bench_over_ssh(sshd, models, tmp_path):
    _mode(sshd, "ok")
    out = tmp_path / "jetson.json"
    results = run_bench("jetson", models["dynamic"], [1, 4], sshd.options(precision="fp16"), out)
    assert [r.batch for r in results] == [1, 4]
    r = results[0]
    assert r.simulated and any("stand-ins" in n for n in r.notes)
    assert r.latency_ms.p50 == pytest.approx(25.0) and r.latency_ms.p99 == pytest.approx(27.5)
    assert results[1].throughput_ips == pytest.approx(4 * 1000 / (25.0 * 2.2), rel=1e-3)
    assert r.environment["tensorrt"] == "8.5.2" and r.environment["nvpmodel"]["mode"] == "STANDIN_15W"
    assert any("clocks not locked" in n for n in r.notes)
    assert r.extra["tegrastats"]["samples"] >= 1 and r.extra["tegrastats"]["power_rail"] == "VDD_IN"
    args = (sshd.ctl.parent / "args.log").read_text().splitlines()
    assert "--fp16" in args[0] and "--int8" not in args[0] and "--shapes=input:4x3x16x16" in args[1]
    assert out.is_file() and list(sshd.remote_tmp.iterdir()) == []


def test_unreachable_host_is_one_line(sshd, models, tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(BackendError, match=r"^host .* unreachable: .*Connection refused") as e:
        run_bench("jetson", models["fixed"], [None], sshd.options(port=_free_port()), out)
    assert "\n" not in str(e.value) and not out.exists()


def test_wrong_key_is_an_auth_failure(sshd, models, tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(BackendError, match="authentication to .* failed .*Permission denied"):
        run_bench("jetson", models["fixed"], [None], sshd.options(key=sshd.wrong_key), out)
    assert not out.exists()


def test_unknown_host_key_is_refused(sshd, models, tmp_path):
    opts = sshd.options()
    opts.ssh_options = [o if not o.startswith("UserKnownHostsFile") else f"UserKnownHostsFile={tmp_path / 'kh'}"
                        for o in opts.ssh_options]
    with pytest.raises(BackendError, match="host key not known"):
        run_bench("jetson", models["fixed"], [None], opts)


def test_trtexec_failure_names_the_error_and_cleans_up(sshd, models, tmp_path):
    _mode(sshd, "fail")
    out = tmp_path / "r.json"
    with pytest.raises(BackendError, match=r"trtexec failed on .* \(exit 1\): .*stand-in failure requested"):
        run_bench("jetson", models["fixed"], [None], sshd.options(), out)
    assert not out.exists() and list(sshd.remote_tmp.iterdir()) == []


def test_timeout_kills_the_run_and_cleans_up(sshd, models, tmp_path):
    _mode(sshd, "sleep")
    out = tmp_path / "r.json"
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"jetson bench on .* timed out after 1.5 s"):
        run_bench("jetson", models["fixed"], [None], sshd.options(timeout_s=1.5), out)
    assert time.monotonic() - t0 < 10
    assert not out.exists() and list(sshd.remote_tmp.iterdir()) == []
    for tool in ("trtexec", "tegrastats"):
        assert _processes_running(str(sshd.root / "bin" / tool)) == [], f"the stand-in {tool} survived the cleanup"


def test_int8_on_a_float_model_is_refused_before_connecting(sshd, models):
    with pytest.raises(BackendError, match="int8 needs a QDQ model"):
        run_bench("jetson", models["fixed"], [None], sshd.options(precision="int8"))
