"""Files and limits of input: names kept inside their folder, regular files only, outputs that
are not inputs, temporaries removed on SIGTERM and after a kill, bounded decompression."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard

from memvisor.errors import UserError
from memvisor.files import image_pages, open_regular, path_inside, remove_stale, safe_name, same_file, temp_file
from memvisor.limits import BoundedZstdReader, decompress_frame


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "", ".hidden", "..", "x" * 65, "a\x00b", "a b",
                                  "web\n"])
def test_names_that_would_leave_their_folder_are_refused(name, tmp_path):
    """Separators, '..', absolute paths, hidden and odd characters: a name that becomes a file
    name is refused before it is joined to anything."""
    with pytest.raises(ValueError, match="may hold only letters"):
        safe_name(name, "the name")
    with pytest.raises(ValueError):
        path_inside(tmp_path, name, ".ckpt")


def test_a_good_name_stays_inside_and_a_link_out_is_refused(tmp_path):
    """A safe name joins its folder; a link of that name pointing elsewhere is refused."""
    assert path_inside(tmp_path, "web-1.final", ".ckpt") == tmp_path / "web-1.final.ckpt"
    (tmp_path / "out.ckpt").symlink_to(tmp_path.parent / "elsewhere.ckpt")
    with pytest.raises(ValueError, match="leads outside"):
        path_inside(tmp_path, "out", ".ckpt")


def test_a_fifo_is_refused_at_once(tmp_path):
    """Opening a FIFO for reading would block forever: it is refused without blocking."""
    os.mkfifo(tmp_path / "fifo")
    started = time.monotonic()
    with pytest.raises(UserError, match="a FIFO, not a regular file"):
        open_regular(tmp_path / "fifo", "checkpoint")
    assert time.monotonic() - started < 1.0
    with pytest.raises(UserError, match="a directory"):
        open_regular(tmp_path, "checkpoint")


def test_a_socket_parameter_takes_only_a_socket_it_can_reach(tmp_path):
    """UnixSocket (a QMP socket): a socket is taken; a missing path, a regular file, a folder, a
    FIFO, or a socket reached by a path too long to connect to is one line naming it."""
    import socket

    import click

    from memvisor.cli import UnixSocket

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "qmp"))
    (tmp_path / "file").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / ("d" * 100)).mkdir()
    param = click.Option(["--qmp"], type=UnixSocket("QMP socket"))
    assert param.type.convert(str(tmp_path / "qmp"), param, None) == str(tmp_path / "qmp")
    for path, problem in [("absent", "no such QMP socket"), ("file", "a regular file, not a socket"),
                          ("d" * 100, "a directory, not a socket"), ("fifo", "a FIFO, not a socket"),
                          ("d" * 100 + "/../qmp", "too long to connect")]:
        with pytest.raises(UserError, match=problem) as error:
            param.type.convert(str(tmp_path / path), param, None)
        assert str(error.value).startswith(f"--qmp: {tmp_path / path}: ")
    server.close()


def test_same_file_through_links(tmp_path):
    """A symbolic or a hard link to a file is that file."""
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "sym").symlink_to(tmp_path / "a")
    os.link(tmp_path / "a", tmp_path / "hard")
    assert same_file(tmp_path / "a", tmp_path / "sym") and same_file(tmp_path / "hard", tmp_path / "a")
    assert not same_file(tmp_path / "a", tmp_path / "absent")


@pytest.mark.parametrize("size, problem", [(0, "an empty file"), (3, "3 bytes is not a whole number"),
                                           (4097, "4097 bytes is not a whole number")])
def test_memory_images_are_whole_pages(tmp_path, size, problem):
    """An image is never silently cut: empty or partial pages are refused."""
    (tmp_path / "m.raw").write_bytes(bytes(size))
    with pytest.raises(UserError, match=problem):
        image_pages(tmp_path / "m.raw")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """A temporary named after a process that is gone is removed by the next writer; one of a
    live process is kept."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = ".x.ckpt.memvisor-tmp."
    (tmp_path / f"{prefix}{dead.pid}.abc.tmp").write_bytes(b"left by a killed save")
    (tmp_path / f"{prefix}1.abc.tmp").write_bytes(b"pid 1 is alive")
    fd, tmp = temp_file(tmp_path / "x.ckpt")
    os.close(fd)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert f"{prefix}{dead.pid}.abc.tmp" not in names and f"{prefix}1.abc.tmp" in names
    assert os.path.basename(tmp).startswith(f"{prefix}{os.getpid()}.")
    assert remove_stale(tmp_path, prefix) == 0  # ours and pid 1's stay


def _wait_for(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def slow_image(tmp_path_factory):
    """16 MiB of random pages: zstd level 19 takes seconds on them."""
    path = tmp_path_factory.mktemp("image") / "random.raw"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("sig, left", [(signal.SIGTERM, False), (signal.SIGKILL, True)])
def test_a_save_stopped_midway_leaves_nothing_for_long(tmp_path, slow_image, sig, left):
    """`memvisor checkpoint save` stopped while writing: SIGTERM leaves no temporary; SIGKILL
    can leave one, which the next save beside it removes."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "memvisor", "checkpoint", "save", str(slow_image),
                             str(out / "x.ckpt"), "--level", "19"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(p.name.endswith(".tmp") for p in out.iterdir()))
        time.sleep(0.3)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -sig if sig == signal.SIGKILL else proc.returncode == 128 + sig
    assert bool(list(out.iterdir())) == left
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(8192))
    done = subprocess.run([sys.executable, "-m", "memvisor", "checkpoint", "save", str(small), str(out / "x.ckpt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in out.iterdir()] == ["x.ckpt"]


def test_a_killed_run_leaves_its_work_folder_until_the_next_run(tmp_path):
    """`memvisor run` killed after a checkpoint (its work folder holds it): the next run
    removes the folder of the dead process."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    scenario = tmp_path / "s.toml"
    scenario.write_text('[host]\nmemory = "64MiB"\n[[vm]]\nname = "a"\nmemory = "16MiB"\ncontents = "random"\n'
                        'workload = { kind = "uniform" }\n[[timeline]]\ndo = "checkpoint"\nvm = "a"\n'
                        '[[timeline]]\ndo = "run"\nfor = "600s"\n')
    env = dict(os.environ, TMPDIR=str(temp))
    proc = subprocess.Popen([sys.executable, "-m", "memvisor", "run", str(scenario), "--out", str(tmp_path / "o"),
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: list(temp.glob("memvisor-run.*/*.ckpt")))
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name.split(".")[1] for p in temp.iterdir()] == [str(proc.pid)]
    scenario.write_text('[host]\nmemory = "16MiB"\n[[vm]]\nmemory = "4MiB"\n')
    done = subprocess.run([sys.executable, "-m", "memvisor", "run", str(scenario), "--out", str(tmp_path / "o"),
                           "--quiet"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(temp.iterdir()) == []


def test_a_zstd_frame_is_checked_before_it_is_decompressed():
    """A frame declaring more (or nothing) is refused before decompression; the right size
    decompresses."""
    data = bytes(range(256)) * 64
    frame = zstandard.ZstdCompressor().compress(data)
    assert decompress_frame(frame, len(data), ValueError) == data
    with pytest.raises(ValueError, match="declares 16384 bytes, expected 4096"):
        decompress_frame(frame, 4096, ValueError)
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    with pytest.raises(ValueError, match="declares no size"):
        decompress_frame(undeclared, len(data), ValueError)


def test_a_stream_is_cut_when_it_decompresses_past_its_limit():
    """A stream of 64 MiB of zeros read with a 1 MiB limit stops at about the limit."""
    import io
    import tracemalloc

    writer = zstandard.ZstdCompressor().compressobj()
    bomb = b"".join([writer.compress(bytes(1 << 20)) for _ in range(64)] + [writer.flush()])
    tracemalloc.start()
    with pytest.raises(ValueError, match="decompresses to more than 1.0 MiB"):
        BoundedZstdReader(io.BytesIO(bomb), 1 << 20, ValueError).read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20
