"""build.py's kernel ELF for the PVH boot: the bzImage's payload, and the note QEMU needs.

Synthetic images (a bzImage header around a compressed ELF), so that every branch runs
here without the Debian kernel; the real one is what every real-guest test boots.
"""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import struct
import sys
from pathlib import Path

import pytest

BUILD_SCRIPT = Path(__file__).parent.parent / "fixtures" / "qemu-images" / "build.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("qsd_build_for_tests", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and the like look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def elf_with_note(name: bytes, note_type: int) -> bytes:
    """A 64-bit little-endian ELF header, one PT_NOTE program header, and that one note."""
    desc = struct.pack("<I", 0x1000000)
    namesz = len(name) + 1
    note = struct.pack("<III", namesz, len(desc), note_type)
    note += name + b"\x00" * ((namesz + 3) // 4 * 4 - len(name)) + desc
    phoff, phentsize = 64, 56
    ident = b"\x7fELF\x02\x01\x01" + b"\x00" * 9
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, phentsize, 1, 0, 0, 0
    )
    note_at = phoff + phentsize
    program = struct.pack("<IIQQQQQQ", 4, 4, note_at, 0, 0, len(note), len(note), 4)
    return header + program + note


def bzimage(payload: bytes) -> bytes:
    """A bzImage's setup (one sector beyond the boot sector) with *payload* after it."""
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1  # setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)  # boot protocol 2.15
    struct.pack_into("<II", setup, 0x248, 0, len(payload))  # payload_offset, payload_length
    return bytes(setup) + payload


def test_the_pvh_note_is_found_and_only_that_one(build):
    assert build.has_pvh_entry(elf_with_note(b"Xen", build.PVH_NOTE))
    assert not build.has_pvh_entry(elf_with_note(b"Xen", build.PVH_NOTE - 1))
    assert not build.has_pvh_entry(elf_with_note(b"GNU", build.PVH_NOTE))


def test_a_gzip_payload_gives_the_elf_back(build):
    elf = elf_with_note(b"Xen", build.PVH_NOTE)
    assert build.extract_vmlinux(bzimage(gzip.compress(elf))) == elf


def test_an_xz_payload_with_its_size_after_it_gives_the_elf_back(build):
    elf = elf_with_note(b"Xen", build.PVH_NOTE)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ) + struct.pack("<I", len(elf))
    assert build.extract_vmlinux(bzimage(payload)) == elf


def test_a_wrong_size_an_elf_without_pvh_and_an_unknown_payload_are_refused(build):
    elf = elf_with_note(b"Xen", build.PVH_NOTE)
    short = lzma.compress(elf, format=lzma.FORMAT_XZ) + struct.pack("<I", len(elf) + 1)
    with pytest.raises(build.BuildError, match="decompressed to"):
        build.extract_vmlinux(bzimage(short))
    with pytest.raises(build.BuildError, match="no PVH entry"):
        build.extract_vmlinux(bzimage(gzip.compress(elf_with_note(b"Xen", 5))))
    with pytest.raises(build.BuildError, match="not known"):
        build.extract_vmlinux(bzimage(b"BZh91AY&SY" + elf))
    with pytest.raises(build.BuildError, match="bzImage"):
        build.extract_vmlinux(b"\x00" * 2048)
