"""Accessed bits shared by their readers (Host.take_accessed): each plugin that reads them sees
every touch once, whatever the others read."""

import numpy as np

from memvisor.testing import small_host


def touch(host, vm, pages):
    host.access(vm, np.asarray(pages), np.zeros(len(pages), bool))


def test_each_reader_sees_every_touch_once_whatever_the_others_read():
    host = small_host(memory_pages=4096)
    vm = host.create_vm("a", 1024)
    host.take_accessed(vm, "balloon")
    host.take_accessed(vm, "numa")  # both start with nothing unseen
    touch(host, vm, [1, 2, 3])
    assert np.flatnonzero(host.take_accessed(vm, "balloon")).tolist() == [1, 2, 3]
    touch(host, vm, [4])
    # the balloon took the backend's bits before: numa still sees 1, 2, 3 and the later 4
    assert np.flatnonzero(host.take_accessed(vm, "numa")).tolist() == [1, 2, 3, 4]
    assert np.flatnonzero(host.take_accessed(vm, "balloon")).tolist() == [4]
    assert not host.take_accessed(vm, "numa").any() and not host.take_accessed(vm, "balloon").any()


def test_a_reader_taking_some_pages_keeps_the_rest_for_later():
    host = small_host(memory_pages=4096)
    vm = host.create_vm("a", 1024)
    host.take_accessed(vm, "numa")
    touch(host, vm, [10, 20, 30])
    assert host.take_accessed(vm, "numa", np.array([10, 11])).tolist() == [True, False]
    assert np.flatnonzero(host.take_accessed(vm, "numa")).tolist() == [20, 30]


def test_a_first_reader_sees_the_touches_since_any_reader_asked():
    host = small_host(memory_pages=4096)
    vm = host.create_vm("a", 1024)
    host.take_accessed(vm, "balloon")
    touch(host, vm, [7])
    assert np.flatnonzero(host.take_accessed(vm, "lazy-save")).tolist() == [7]
