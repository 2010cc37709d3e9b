"""The command line of memvisor-qemu as the CLI matrix sees it (memvisor.testing.cli_matrix):
its file and socket parameters are typed, and the valid invocations the matrix starts from run
against real QEMUs (tests/integration/test_integration_cli_matrix.py makes one argument bad at a
time; its sandbox has no QEMU behind the sockets)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner

from memvisor.testing import cli_matrix
from memvisor_qemu.guest import GuestLayout
from memvisor_qemu.testing import QemuVM, needs, unavailable_reason, write_disk

LAYOUT = GuestLayout(loop_start=1 << 20, loop_end=4 << 20)


def test_every_qemu_command_has_a_baseline_and_typed_parameters():
    """Each qemu command is in the matrix with a valid invocation, and none of their parameters is a
    bare path (a QMP socket is a UnixSocket, files are InputFile or OutputFile)."""
    commands = [c for c in cli_matrix.commands() if c.startswith("qemu ")]
    assert sorted(commands) == ["qemu migrate", "qemu restore", "qemu save"]
    assert set(commands) <= set(cli_matrix.baselines())
    assert not [p for p in cli_matrix.untyped_files() if p.startswith("memvisor qemu")]


def _run(sandbox: cli_matrix.Sandbox, command: str):
    from memvisor.cli import cli

    sandbox.clear_out()
    args = cli_matrix._argv(cli_matrix.commands()[command], cli_matrix.baselines()[command], sandbox)
    return CliRunner().invoke(cli, [*command.split(), *args])


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _inspect(checkpoint) -> dict:
    """The checkpoint as ``memvisor checkpoint inspect`` reads it back from the file."""
    from memvisor.cli import cli

    done = CliRunner().invoke(cli, ["checkpoint", "inspect", str(checkpoint), "--json", "-"])
    assert done.exit_code == 0, done.stderr
    return json.loads(done.stdout)


def _check_save_summary(line: str, figures: dict, checkpoint) -> None:
    """qemu save's summary: its counts are the checkpoint's as the file holds them, its sizes
    the file's and the stream's, in human units; --json FILE holds the same figures."""
    from memvisor.units import shown

    m = re.fullmatch(r".+: ([\d,]+) pages \(([\d,]+) zero, ([\d,]+) disk references\) from QEMU \S+ \S+; "
                     r"stream (.+) -> checkpoint (.+) in (.+)", line)
    assert m, line
    read = _inspect(checkpoint)
    assert [_number(m[i]) for i in (1, 2, 3)] == [read["vm_pages"], read["zero_pages"], read["record_pages"]]
    assert (m[4], m[5], m[6]) == (shown(figures["stream_bytes"], "bytes"), shown(os.path.getsize(checkpoint), "bytes"),
                                  shown(figures["seconds"], "s"))
    assert figures["pages"] == read["vm_pages"] and figures["checkpoint"]["bytes_out"] == os.path.getsize(checkpoint)


def _check_restore_summary(line: str, figures: dict, checkpoint) -> None:
    """qemu restore's summary: the pages and zero pages it sent are the checkpoint's."""
    m = re.fullmatch(r".+: (eager|lazy) restore of ([\d,]+) pages \(([\d,]+) zero\) in .+, VM running after .+",
                     line)
    assert m, line
    read = _inspect(checkpoint)
    assert (_number(m[2]), _number(m[3])) == (read["vm_pages"], read["zero_pages"]) == \
        (figures["pages"], figures["zero_pages_sent"])


def _check_migrate_summary(line: str, figures: dict) -> None:
    """qemu migrate's summary: the pages sent are the zero, disk-reference and data pages
    together, every one was verified on arrival (a page QEMU sent again, again), at least
    the VM's pages, and no figure is missing."""
    m = re.fullmatch(r".+ -> .+: ([\d,]+) pages in \d+ rounds, ([\d,]+) sent \(([\d,]+) zero, ([\d,]+) disk "
                     r"references, ([\d,]+) data\), ([\d,]+) verified on arrival; .+, downtime .+", line)
    assert m, line
    pages, sent, zero, records, data, verified = (_number(m[i]) for i in range(1, 7))
    assert sent == zero + records + data == verified >= pages == figures["pages"] > 0
    assert "None" not in line


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@needs("diskmap")
def test_the_matrix_baselines_run_against_real_qemu(tmp_path):
    """With real QEMUs behind the sandbox's QMP sockets, the matrix's valid invocations of qemu save,
    restore and migrate end with exit status 0: a bad case fails for its one bad argument. Each
    prints one line whose figures are checked against the checkpoint as the file holds it and
    against each other (and --json FILE has them)."""
    (tmp_path / "sandbox").mkdir()
    sandbox = cli_matrix.Sandbox(tmp_path / "sandbox")
    disk = write_disk(tmp_path / "disk.img", LAYOUT)
    sandbox.files["disk"] = disk
    with QemuVM(tmp_path, "src", disk) as src, QemuVM(tmp_path, "in", disk, incoming=True) as dst:
        sandbox.files["qmp"], sandbox.files["qmp_incoming"] = src.qmp_path, dst.qmp_path
        src.wait_markers(1)
        result = _run(sandbox, "qemu save")
        assert result.exit_code == 0, result.stderr
        out = sandbox.files["out"]
        _check_save_summary(result.stdout.strip(), json.loads((out / "save.json").read_text()), out / "vm.ckpt")
        shutil.copy(sandbox.files["out"] / "vm.ckpt", tmp_path / "qemu.ckpt")
        sandbox.files["ckpt"] = tmp_path / "qemu.ckpt"
        result = _run(sandbox, "qemu restore")
        assert result.exit_code == 0, result.stderr
        _check_restore_summary(result.stdout.strip(), json.loads((sandbox.files["out"] / "restore.json").read_text()),
                               tmp_path / "qemu.ckpt")
        dst.wait_markers(dst.markers() + 1)
    with QemuVM(tmp_path, "src2", disk) as src, QemuVM(tmp_path, "in2", disk, incoming=True) as dst:
        sandbox.files["qmp"], sandbox.files["qmp_incoming"] = src.qmp_path, dst.qmp_path
        src.wait_markers(1)
        result = _run(sandbox, "qemu migrate")
        assert result.exit_code == 0, result.stderr
        _check_migrate_summary(result.stdout.strip(), json.loads((sandbox.files["out"] / "migrate.json").read_text()))
        dst.wait_markers(dst.markers() + 1)


class _FakeMonitor:
    """A QMP server that greets as QEMU does and answers every command with ``answer`` (QMP's
    requests are JSON objects one after the other, without separators)."""

    def __init__(self, path, answer):
        import json
        import socket
        import threading

        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)

        def serve():
            conn, _ = self.server.accept()
            conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""}, '
                         b'"capabilities": []}}\r\n')
            buffer, decoder = "", json.JSONDecoder()
            while chunk := conn.recv(1 << 16):
                buffer += chunk.decode()
                while buffer.strip():
                    try:
                        request, end = decoder.raw_decode(buffer.lstrip())
                    except ValueError:
                        break
                    buffer = buffer.lstrip()[end:]
                    reply = {"return": {}} if request["execute"] == "qmp_capabilities" else answer
                    conn.sendall(json.dumps({**reply, **({"id": request["id"]} if "id" in request else {})}).encode()
                                 + b"\r\n")

        threading.Thread(target=serve, daemon=True).start()


@pytest.mark.parametrize("answer", [{"return": "not a version"}, {"return": {"qemu": {"major": "seven"}}},
                                    {"return": None}])
def test_a_monitor_answering_nonsense_is_one_line(tmp_path, answer):
    """A socket whose server speaks QMP but answers what QEMU 7.2 never would: one line naming the
    socket and the command, exit status 2, no traceback, no file written."""
    from memvisor.cli import cli

    cli_matrix.commands()  # every installed command registered on memvisor's group
    _FakeMonitor(tmp_path / "fake.qmp", answer)
    result = CliRunner().invoke(cli, ["qemu", "save", str(tmp_path / "vm.ckpt"), "--qmp", str(tmp_path / "fake.qmp")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fake.qmp: query-version: an answer memvisor does not understand" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.qmp"]
