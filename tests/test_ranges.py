from hypothesis import given, strategies as st

from imagefs.content.ranges import RangeSet

N = 200
ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, N), st.integers(0, N)), max_size=40)


@given(ops, st.integers(0, N), st.integers(0, N))
def test_rangeset_matches_a_plain_set(operations, a, b):
    rs, model = RangeSet(), set()
    for op, s, e in operations:
        s, e = min(s, e), max(s, e)
        getattr(rs, op)(s, e)
        if op == "add":
            model |= set(range(s, e))
        else:
            model -= set(range(s, e))
    a, b = min(a, b), max(a, b)
    assert rs.total() == len(model)
    assert rs.covers(a, b) == (set(range(a, b)) <= model)
    missing = {i for s, e in rs.missing(a, b) for i in range(s, e)}
    assert missing == set(range(a, b)) - model
    prefix = 0
    while prefix in model:
        prefix += 1
    assert rs.prefix() == prefix
    ranges = rs.ranges()
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(ranges, ranges[1:])), "disjoint and not adjacent"
    assert all(s < e for s, e in ranges)
    for p in (a, b):
        end = rs.end_of(p)
        assert end == p if p not in model else (end > p and set(range(p, end)) <= model and end not in model)
