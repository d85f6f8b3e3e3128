"""Run commands on a remote host with the system OpenSSH client, and turn its failures into one line.

Host keys are checked (``StrictHostKeyChecking=yes``) and no prompt can block (``BatchMode=yes``);
``~/.ssh/config`` applies as usual. User ``-o`` options come first, so they win over the defaults
(ssh keeps the first value it sees). Every remote argument is quoted with :func:`shlex.quote`.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import IO

from qtool.errors import BackendError

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = ("BatchMode=yes", "StrictHostKeyChecking=yes", "ConnectTimeout=15", "ServerAliveInterval=15")
_UNREACHABLE = ("Connection refused", "No route to host", "Connection timed out", "Could not resolve hostname",
                "Network is unreachable", "Operation timed out", "Name or service not known",
                "Connection closed by remote host", "Connection reset")
_HOST_KEY = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED", "No matching host key")


@dataclass
class Completed:
    """A finished remote command: exit status and decoded output."""

    returncode: int
    stdout: str
    stderr: str


class RemoteTimeout(BackendError):
    """A remote command ran past its time limit (the local ssh was killed)."""


def quote_command(args: list[str]) -> str:
    """One remote command line from an argument list, every argument shell-quoted."""
    return " ".join(shlex.quote(str(a)) for a in args)


def classify_ssh_failure(host: str, stderr: str) -> BackendError:
    """The one-line error for an ssh exit status 255 (ssh's own failure, not the remote command's)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    last = lines[-1] if lines else "no message"
    if "Permission denied" in stderr:
        return BackendError(f"ssh authentication to {host} failed ({last}); check the key "
                            "(--ssh-option IdentityFile=...) or ssh-agent")
    if any(s in stderr for s in _HOST_KEY):
        return BackendError(f"ssh to {host}: host key not known or changed ({last}); host keys are checked: "
                            "connect once with ssh to record it, or pass --ssh-option UserKnownHostsFile=...")
    if any(s in stderr for s in _UNREACHABLE):
        return BackendError(f"host {host} unreachable: {last}")
    return BackendError(f"ssh to {host} failed: {last}")


class SshClient:
    """Runs argument lists or shell scripts on ``host`` (``user@addr`` or an ssh_config alias).

    Args:
        host: destination as ssh understands it.
        options: extra ``Key=Value`` ssh options (``Port=2222``, ``IdentityFile=~/.ssh/jetson``).
        config: an ssh_config file to use instead of ``~/.ssh/config`` (``-F``), or None.
    """

    def __init__(self, host: str, options: list[str] | None = None, config: str | None = None) -> None:
        if not host or host.startswith("-"):
            raise BackendError(f"bad ssh host {host!r}; expected user@address")
        for opt in options or []:
            if not re.match(r"^[A-Za-z][A-Za-z0-9]*[ =]\S", opt):
                raise BackendError(f"bad --ssh-option {opt!r}; expected Key=Value, e.g. Port=2222")
        self.host = host
        self.options = list(options or [])
        self.config = config
        self.ssh = shutil.which("ssh")
        if self.ssh is None:
            raise BackendError("the OpenSSH client (ssh) is not installed on this machine")

    def argv(self, remote_command: str) -> list[str]:
        """The local ssh command line for ``remote_command`` (already quoted for the remote shell)."""
        cmd = [self.ssh or "ssh"]
        if self.config:
            cmd += ["-F", self.config]
        for opt in [*self.options, *DEFAULT_OPTIONS]:
            cmd += ["-o", opt]
        return [*cmd, "--", self.host, remote_command]

    def run(self, args: list[str], timeout: float, stdin: IO[bytes] | None = None, check: bool = True) -> Completed:
        """Run an argument list remotely (each argument quoted); see :meth:`run_script`."""
        return self._run(quote_command(args), timeout, stdin, check)

    def run_script(self, script: str, timeout: float, stdin: IO[bytes] | None = None,
                   check: bool = True) -> Completed:
        """Run a POSIX shell script remotely as ``sh -c <script>``.

        Raises:
            BackendError: ssh itself failed (unreachable, authentication, host key), or ``check`` and
                the remote command exited non-zero. RemoteTimeout: past ``timeout`` seconds.
        """
        return self._run(quote_command(["sh", "-c", script]), timeout, stdin, check)

    def _run(self, command: str, timeout: float, stdin: IO[bytes] | None, check: bool) -> Completed:
        argv = self.argv(command)
        log.debug("ssh: %s", argv)
        try:
            proc = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped the local ssh
            raise RemoteTimeout(f"command on {self.host} timed out after {timeout:g} s") from None
        done = Completed(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
        if done.returncode == 255:
            raise classify_ssh_failure(self.host, done.stderr)
        if check and done.returncode != 0:
            last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
            raise BackendError(f"remote command on {self.host} failed (exit {done.returncode}): {last}")
        return done
