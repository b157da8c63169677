"""How commands reach a shell: over SSH (paramiko or asyncssh) or to a local bash.

The remote login shell may be csh or zsh, and a command line is limited in size (128 KiB per
argument on Linux; a poll cycle for hundreds of jobs is larger). So the command line is always
the same constant word, and the script travels on stdin, length-prefixed, before the command's
own input (uploads, secrets), which the script then reads as its stdin.
"""

from __future__ import annotations

import asyncio
import select
import subprocess
import time
from typing import Any

from airflow_oellm.slurm.commands import SlurmCommandError
from airflow_oellm.slurm.operations import Command, Result

# exit status of a command that ran out of time
TIMED_OUT = -2


# reads the script's length, then exactly that many bytes, and runs them with the rest of stdin
FRAMED_SCRIPT = 'IFS= read -r n && s=$(head -c "$n") && eval "$s"'
REMOTE_COMMAND = f"bash -c '{FRAMED_SCRIPT}'"


def framed_input(command: Command, prelude: str = "") -> bytes:
    script = (prelude + command.script).encode()
    return str(len(script)).encode() + b"\n" + script + (command.stdin or b"")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class LocalShell:
    """Commands run by bash on this machine (Airflow on a login node). `prelude` is put before every
    script (the local-process batch system's stand-ins for SLURM's commands)."""

    def __init__(self, prelude: str = "") -> None:
        self.prelude = prelude

    def run(self, command: Command) -> Result:
        try:
            done = subprocess.run(  # the script on stdin too: an argument is limited to 128 KiB
                ["bash", "-c", FRAMED_SCRIPT],
                input=framed_input(command, self.prelude),
                capture_output=True,
                timeout=command.timeout,
            )
        except subprocess.TimeoutExpired:
            return Result(TIMED_OUT, "", f"timed out after {command.timeout:.0f} s")
        return Result(done.returncode if done.returncode >= 0 else -1, _decode(done.stdout), _decode(done.stderr))

    def close(self) -> None:
        """Nothing to close."""


class ParamikoShell:
    """Commands over one paramiko SSHClient (from the SSH provider's SSHHook)."""

    def __init__(self, client: Any):
        self.client = client

    def run(self, command: Command) -> Result:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise SlurmCommandError("SSH connection is closed", transient=True)
        try:
            channel = transport.open_session(timeout=30)
            channel.exec_command(REMOTE_COMMAND)
            channel.sendall(framed_input(command))
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + command.timeout
            while True:
                if channel.recv_ready():
                    out += channel.recv(65536)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                elif channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                elif time.monotonic() > deadline:
                    channel.close()
                    return Result(TIMED_OUT, _decode(bytes(out)), f"timed out after {command.timeout:.0f} s")
                else:
                    select.select([channel], [], [], 0.2)
            status = channel.recv_exit_status()
            channel.close()
        except (OSError, EOFError) as exc:
            raise SlurmCommandError(f"SSH failure: {exc}", transient=True) from exc
        return Result(status if status >= 0 else -1, _decode(bytes(out)), _decode(bytes(err)))

    def close(self) -> None:
        self.client.close()


class AsyncLocalShell:
    def __init__(self, prelude: str = "") -> None:
        self.prelude = prelude

    async def run(self, command: Command) -> Result:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            FRAMED_SCRIPT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(framed_input(command, self.prelude)), command.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Result(TIMED_OUT, "", f"timed out after {command.timeout:.0f} s")
        rc = proc.returncode if proc.returncode is not None and proc.returncode >= 0 else -1
        return Result(rc, _decode(out), _decode(err))

    async def close(self) -> None:
        """Nothing to close."""


class AsyncSSHShell:
    """Commands over one asyncssh connection (from the SSH provider's SSHHookAsync.get_conn())."""

    def __init__(self, connection: Any):
        self.connection = connection

    async def run(self, command: Command) -> Result:
        import asyncssh

        try:
            result = await self.connection.run(
                REMOTE_COMMAND,
                input=framed_input(command),
                encoding=None,
                check=False,
                timeout=command.timeout,
            )
        except asyncssh.TimeoutError as exc:
            return Result(TIMED_OUT, _decode(exc.stdout or b""), f"timed out after {command.timeout:.0f} s")
        except (asyncssh.Error, OSError) as exc:
            raise SlurmCommandError(f"SSH failure: {exc}", transient=True) from exc
        # a None exit status means the remote process died from a signal: never report it as 0
        rc = result.exit_status if result.exit_status is not None and result.exit_status >= 0 else -1
        return Result(rc, _decode(result.stdout or b""), _decode(result.stderr or b""))

    async def close(self) -> None:
        self.connection.close()
        await self.connection.wait_closed()
