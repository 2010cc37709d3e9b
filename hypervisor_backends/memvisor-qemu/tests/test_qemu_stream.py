"""The QEMU stream format and the checkpoint's qemu section, without QEMU."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor_qemu import stream as S
from memvisor_qemu.guest import GuestLayout, boot_sector
from memvisor_qemu.state import QemuState

BLOCKS = S.block_layout([("pc.ram", 64 * 4096), ("pc.bios", 8 * 4096), ("/rom@etc/acpi/tables", 4 * 4096)])


def test_plugin_is_listed():
    """The qemu plugin and its backend are installed and visible."""
    from memvisor.plugins import installed_plugins

    assert "qemu" in {p.name for p in installed_plugins() if p.error is None}


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(76)), zero=st.lists(st.booleans(), min_size=76, max_size=76),
       cut=st.integers(0, 76))
def test_page_records_round_trip(order, zero, cut):
    """Pages written as RAM records in any order, split over two sections, read back byte for byte."""
    index = S.BlockIndex(BLOCKS)
    rng = np.random.default_rng(len(order))
    memory = rng.integers(0, 256, (76, 4096), dtype=np.uint8)
    memory[np.array(zero)] = 0
    order = np.array(order)
    stream = b""
    for part in (order[:cut], order[cut:]):
        records, zeros = S.ram_records(index, part, memory)
        assert zeros == int(np.count_nonzero(np.array(zero)[part]))
        stream += S.ram_section(S.PART, S.SectionId(2, "ram", 0, 4), records)
    got, counts = np.zeros_like(memory), np.zeros(76, np.int32)
    receiver = S.RamReceiver(index, got, counts)
    r = S.StreamReader(io.BytesIO(stream), "test")
    for _ in range(2):
        assert r.u8() == S.PART
        S.read_section_id(r, S.PART)
        receiver.read_section(r)
        S.read_footer(r, 2)
    assert (got == memory).all() and (counts == 1).all()


def test_ram_setup_round_trip():
    """The RAM START section carries every block's name and length."""
    raw = S.ram_setup_section(S.SectionId(2, "ram", 0, 4), BLOCKS)
    r = S.StreamReader(io.BytesIO(raw), "test")
    assert r.u8() == S.START and S.read_section_id(r, S.START) == S.SectionId(2, "ram", 0, 4)
    assert S.read_ram_setup(r) == [(b.name, b.length) for b in BLOCKS]


@pytest.mark.parametrize("flags, problem", [(0x100, "COMPRESS_PAGE"), (0x40, "XBZRLE"), (0x200, "QEMU 8"),
                                            (0x0, "flags 0x0")])
def test_unsupported_records_are_named(flags, problem):
    """A record of a capability memvisor does not read is one line naming it."""
    r = S.StreamReader(io.BytesIO(struct.pack(">Q", flags) + bytes(16)), "from-qemu")
    receiver = S.RamReceiver(S.BlockIndex(BLOCKS), np.zeros((76, 4096), np.uint8), np.zeros(76, np.int32))
    with pytest.raises(S.QemuError, match=problem) as e:
        receiver.read_section(r)
    assert str(e.value).startswith("from-qemu: offset 8: ")


def test_header_of_another_stream_version_is_refused():
    """Only stream version 3 (QEMU 7.2) is read."""
    with pytest.raises(S.QemuError, match="version 2"):
        S.read_header(S.StreamReader(io.BytesIO(struct.pack(">II", S.FILE_MAGIC, 2)), "s"))


def test_tail_splits_into_devices_and_description():
    """Device sections end at the EOF mark before the JSON description, whatever their bytes."""
    devices = b"\x04\x00\x00\x00\x05" + bytes([0, 6, 0, 0, 0, 2]) + b"{}junk"
    desc = b'{"devices": []}'
    tail = devices + bytes([S.EOF, S.VMDESCRIPTION]) + struct.pack(">I", len(desc)) + desc
    assert S.split_tail(tail, "s") == (devices, desc)
    with pytest.raises(S.QemuError, match="JSON description"):
        S.split_tail(devices, "s")


def _state(**change) -> QemuState:
    header = struct.pack(">II", S.FILE_MAGIC, 3) + bytes([7]) + struct.pack(">I", 13) + b"pc-i440fx-7.2"
    values = dict(qemu="7.2.22", machine="pc-i440fx-7.2", ram=S.SectionId(2, "ram", 0, 4), blocks=BLOCKS,
                  header=header, devices=b"\x04devices", description=b"{}", running=True)
    values.update(change)
    return QemuState(**values)


def test_state_round_trip():
    """The qemu section keeps the stream's header, device state and description verbatim."""
    state = _state()
    assert QemuState.decode(state.encode(), "c.ckpt") == state


@pytest.mark.parametrize("mangle, problem", [
    (lambda b: b[:10], "truncated"),
    (lambda b: b"X" + b[1:], "bad magic"),
    (lambda b: b[:8] + struct.pack("<I", 1 << 30) + b[12:], "manifest of"),
    (lambda b: b + b"x", "blob lengths"),
    (lambda b: b.replace(b'"qemu":"7.2.22"', b'"qemu":7.2220'), "bad manifest"),
    (lambda b: b.replace(b"16384", b"16385"), "multiple of 4096"),
    (lambda b: None, "not a checkpoint of a QEMU VM"),
])
def test_hostile_state_is_refused(mangle, problem):
    """A damaged or forged qemu section is one line naming the checkpoint."""
    with pytest.raises(S.QemuError, match=problem) as e:
        QemuState.decode(mangle(_state().encode()), "c.ckpt")
    assert str(e.value).startswith("c.ckpt: ")


def test_boot_sector_is_assembled():
    """The guest fits a boot sector, ends with the boot signature and refuses unaligned layouts."""
    sector = boot_sector(GuestLayout(disk_lba=8, disk_sectors=256, disk_dest=16 << 20, fill_start=20 << 20,
                                     fill_end=21 << 20))
    assert len(sector) == 512 and sector[-2:] == b"\x55\xaa"
    with pytest.raises(ValueError):
        boot_sector(GuestLayout(loop_start=(1 << 20) + 1))
