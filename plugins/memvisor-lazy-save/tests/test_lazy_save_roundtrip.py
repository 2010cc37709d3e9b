"""Round trips against the reference model (hypothesis over sizes, contents, block and buffer
sizes and guest writes during the save), and the write-call bound of the save-1gib benchmark."""

import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor.builtins.checkpoint import save_image
from memvisor.contents import ContentSpec
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.testing import ReferenceMemory, small_host
from memvisor_lazy_save import LazySavePlugin
from memvisor_lazy_save.bench import make_image

mixes = st.sampled_from([{"zero": 1.0}, {"random": 1.0}, {"zero": 0.5, "text": 0.3, "random": 0.2},
                         {"zero": 0.2, "text": 0.8, "run_pages": 16}])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.integers(1, 3000), mix=mixes, block_pages=st.sampled_from([1, 16, 64]),
       buffer_bytes=st.sampled_from([1, 64 << 10, 4 << 20]), writes=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_lazy_save_then_eager_restore_gives_back_every_page(pages, mix, block_pages, buffer_bytes, writes, seed):
    """Whatever the guest writes during a lazy save, an eager restore gives back the memory of
    the save's start byte for byte; before that, the guest reads its own writes."""
    host = small_host(memory_pages=2 * pages + 1024, extra_plugins=[LazySavePlugin()], tick_interval=0.001)
    vm = host.create_vm("a", pages, contents=ContentSpec.parse(mix, "test"), seed=seed)
    model = ReferenceMemory()
    model.follow(host, vm)
    at_start = model.expected["a"].copy()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "a.ckpt")
        job = host.save_checkpoint(vm, SaveRequest(path, block_pages=block_pages, buffer_bytes=buffer_bytes))
        for _ in range(writes):  # writes land between ticks, before and after the saver's steps
            model.access(host, vm, rng.integers(0, pages, 64), rng.random(64) < 0.7)
            host.advance(0.0004)
        while not job.done:
            host.advance(host.tick_interval)
        model.check(host)
        host.restore_checkpoint(vm, RestoreRequest(path, lazy=False))
    model.expected["a"] = at_start
    model.check(host)
    assert host.backend.check_invariants() == 0


def test_save_image_write_calls_are_bounded(tmp_path):
    """The core's save of a raw image (the save-1gib case, on 32 MiB): at most
    ceil(output / buffer) + 10 write calls, with the default and with a small buffer."""
    image = make_image(tmp_path / "image.raw", pages=8192)
    for buffer in (4 << 20, 512 << 10):
        stats = save_image(image, tmp_path / "image.ckpt", buffer_bytes=buffer)
        assert stats.write_calls <= math.ceil(stats.bytes_out / buffer) + 10
        assert stats.pages == 8192 and 0 < stats.bytes_out < stats.bytes_in
