"""The sort-based array helpers agree with numpy's own."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.arrays import first_occurrences, has_duplicates, unique, unique_counts

arrays = st.lists(st.integers(-5, 50), max_size=200).map(lambda v: np.array(v, dtype=np.int64))


@settings(max_examples=60, deadline=None)
@given(arrays)
def test_helpers_match_numpy(values):
    """unique, unique_counts, first_occurrences and has_duplicates give numpy's answers."""
    expected, index, counts = np.unique(values, return_index=True, return_counts=True)
    assert np.array_equal(unique(values), expected)
    got, got_counts = unique_counts(values)
    assert np.array_equal(got, expected) and np.array_equal(got_counts, counts)
    order = np.argsort(index, kind="stable")
    firsts, where = first_occurrences(values)
    assert np.array_equal(firsts, expected[order]) and np.array_equal(where, index[order])
    assert has_duplicates(values) == (len(expected) != len(values))
