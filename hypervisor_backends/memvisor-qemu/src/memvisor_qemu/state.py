"""What a memvisor checkpoint of a QEMU VM holds besides its pages: the ``qemu`` section.

The pages of every RAM block are the checkpoint's pages (blocks one after the other). The
optional metadata section ``qemu`` (docs/checkpoint-format.md) holds the rest, verbatim:

| offset | size | field |
|---:|---:|---|
| 0 | 8 | magic ``"MVQEMU1\\n"`` |
| 8 | 4 | manifest length *m* (≤ 1 MiB) |
| 12 | 4 | reserved, 0 |
| 16 | *m* | manifest: UTF-8 JSON (below) |
| 16 + *m* | … | the blobs, back to back: ``header``, ``devices``, ``description`` |

The manifest: ``{"qemu": "7.2.22", "machine": "pc-i440fx-7.2", "running": true, "ram": {"section_id": 2,
"instance_id": 0, "version_id": 4}, "blocks": [["pc.ram", 33554432], …], "blobs":
{"header": n, "devices": n, "description": n}}`` where each blob's length is given in order.
``header`` is the stream's magic, version and configuration section; ``devices`` every
device section (between the last RAM section and the EOF mark); ``description`` QEMU's JSON
description of them. The section is covered by the metadata checksum and, with a key, the MAC:
a changed byte refuses the checkpoint before QEMU sees any of it.
"""

from __future__ import annotations

import json
import struct

import attrs

from memvisor_qemu.stream import (
    FILE_MAGIC,
    MAX_BLOCKS,
    MAX_DEVICE_STATE,
    PAGE_SIZE,
    QemuError,
    RamBlock,
    SectionId,
    block_layout,
)

TAG = "qemu"
MAGIC = b"MVQEMU1\n"
HEAD = struct.Struct("<8sII")
MAX_MANIFEST = 1 << 20
BLOBS = ("header", "devices", "description")


@attrs.frozen
class QemuState:
    """A QEMU VM's state other than its pages, as saved from its migration stream.

    :ivar qemu: the QEMU version that saved it (``7.2.22``).
    :ivar machine: the machine type (``pc-i440fx-7.2``).
    :ivar ram: how the stream named the RAM section.
    :ivar blocks: the RAM blocks, in stream order, with their place in the page numbering.
    :ivar header: the stream's first bytes (magic, version, configuration), verbatim.
    :ivar devices: every device section, verbatim.
    :ivar description: QEMU's JSON description of the device sections, verbatim.
    :ivar running: whether the VM was running when it was saved (a restore resumes it then).
    """

    qemu: str
    machine: str
    ram: SectionId
    blocks: list[RamBlock]
    header: bytes
    devices: bytes
    description: bytes
    running: bool = True

    @property
    def pages(self) -> int:
        """Pages of all RAM blocks."""
        return sum(b.pages for b in self.blocks)

    def encode(self) -> bytes:
        """The ``qemu`` section's payload."""
        manifest = json.dumps({
            "qemu": self.qemu, "machine": self.machine, "running": self.running,
            "ram": {"section_id": self.ram.section_id, "instance_id": self.ram.instance_id,
                    "version_id": self.ram.version_id},
            "blocks": [[b.name, b.length] for b in self.blocks],
            "blobs": {name: len(getattr(self, name)) for name in BLOBS},
        }, separators=(",", ":")).encode()
        return HEAD.pack(MAGIC, len(manifest), 0) + manifest + self.header + self.devices + self.description

    @classmethod
    def decode(cls, payload: bytes | None, path) -> QemuState:
        """Read and check a ``qemu`` section (hostile input: every field is bounded)."""
        def bad(problem: str) -> QemuError:
            return QemuError(f"{path}: qemu section: {problem}")

        if payload is None:
            raise QemuError(f"{path}: not a checkpoint of a QEMU VM (it has no qemu section)")
        if len(payload) < HEAD.size:
            raise bad("truncated")
        magic, length, reserved = HEAD.unpack_from(payload)
        if magic != MAGIC or reserved:
            raise bad("bad magic or version")
        if length > min(MAX_MANIFEST, len(payload) - HEAD.size):
            raise bad(f"manifest of {length} bytes")
        try:
            m = json.loads(payload[HEAD.size : HEAD.size + length])
            qemu, machine, running = _text(m["qemu"]), _text(m["machine"]), m["running"]
            if not isinstance(running, bool):
                raise TypeError("running")
            ram = SectionId(_u32(m["ram"]["section_id"]), "ram", _u32(m["ram"]["instance_id"]),
                            _u32(m["ram"]["version_id"]))
            blocks = [(_text(name), int(size)) for name, size in m["blocks"]]
            sizes = [int(m["blobs"][name]) for name in BLOBS]
        except (ValueError, KeyError, TypeError) as exc:
            raise bad(f"bad manifest ({type(exc).__name__})") from None
        if not 0 < len(blocks) <= MAX_BLOCKS or len({n for n, _ in blocks}) != len(blocks):
            raise bad("bad RAM block list")
        if any(size <= 0 or size % PAGE_SIZE or size > 1 << 40 for _, size in blocks):
            raise bad("a RAM block's length is not a positive multiple of 4096")
        if any(s < 0 or s > MAX_DEVICE_STATE for s in sizes) or HEAD.size + length + sum(sizes) != len(payload):
            raise bad("blob lengths do not add up to the section")
        pos, blobs = HEAD.size + length, []
        for size in sizes:
            blobs.append(bytes(payload[pos : pos + size]))
            pos += size
        header, devices, description = blobs
        if len(header) < 13 or struct.unpack(">I", header[:4])[0] != FILE_MAGIC:
            raise bad("the stream header is not QEMU's")
        return cls(qemu, machine, ram, block_layout(blocks), header, devices, description, running)


def _text(value) -> str:
    if not isinstance(value, str) or not 0 < len(value) < 256 or not value.isprintable():
        raise ValueError("bad text")
    return value


def _u32(value) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise ValueError("bad number")
    return value
