"""agent.proxy.budget: the node-wide budget of buffered bytes — its invariants under any sequence of takes
and releases (Hypothesis), the stall/resume signals, and the default size read from the cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from agent.proxy import budget as B
from agent.proxy.budget import CHUNK, MAX_WINDOW, MIN_WINDOW, MiB, BufferBudget

IDENTITIES = [f"spiffe://t/ns/a/sa/w{i}" for i in range(12)]

# One step: an identity takes a chunk of data (only if the budget lets it: the data path stops reading
# a stalled identity's tunnels), or releases part of what it holds (its workload read).
steps = st.lists(st.tuples(st.booleans(), st.sampled_from(IDENTITIES), st.integers(1, CHUNK)), max_size=400)


@given(total_mib=st.integers(8, 512), shares=st.integers(1, 16), ops=steps)
def test_never_over_budget_by_more_than_one_chunk_and_releasing_returns_everything(total_mib, shares, ops):
    stalls, resumes = [], []
    budget = BufferBudget(total_mib * MiB, shares, on_stall=stalls.append, on_resume=resumes.append)
    held: dict[str, int] = {}
    for take, identity, size in ops:
        if take:
            if budget.may_take(identity):
                budget.adjust(identity, size)
                held[identity] = held.get(identity, 0) + size
        elif held.get(identity):
            size = min(size, held[identity])
            budget.adjust(identity, -size)
            held[identity] -= size
        assert budget.held == sum(held.values())
        assert budget.held <= budget.total + CHUNK
        for other in held:
            assert budget.held_by(other) == held[other]
        for other in budget.stalled:  # a stalled identity stays stalled only while it may not take more
            assert not budget.may_take(other)
        assert set(stalls) >= budget.stalled and budget.stalls == len(stalls)
    assert all(i in IDENTITIES for i in stalls + resumes)
    for identity, amount in held.items():
        if amount:
            budget.adjust(identity, -amount)
    assert budget.held == 0 and not budget.stalled
    assert all(budget.may_take(i) for i in IDENTITIES)
    assert budget.window(IDENTITIES[0]) == MAX_WINDOW


@given(total_mib=st.integers(16, 512), shares=st.integers(2, 16), ops=steps, me=st.sampled_from(IDENTITIES))
def test_every_identity_gets_its_share_whatever_the_others_hold(total_mib, shares, ops, me):
    budget = BufferBudget(total_mib * MiB, shares)
    others = [i for i in IDENTITIES if i != me][:shares - 1]  # at most `shares` identities hold bytes
    for take, identity, size in ops:
        identity = others[hash(identity) % len(others)]
        if take and budget.may_take(identity):
            budget.adjust(identity, size)
        elif not take and budget.held_by(identity):
            budget.adjust(identity, -min(size, budget.held_by(identity)))
    # the others did their worst; `me` now fills its share, one chunk at a time, never refused
    while budget.held_by(me) + CHUNK <= budget.share:
        assert budget.may_take(me), (budget.held, budget.held_by(me), budget.share)
        assert me not in budget.stalled
        budget.adjust(me, CHUNK)


def test_a_reader_that_never_reads_is_stalled_alone_and_resumed_when_it_reads():
    stalls, resumes = [], []
    budget = BufferBudget(64 * MiB, 8, on_stall=stalls.append, on_resume=resumes.append)
    slow, other = "spiffe://t/ns/a/sa/slow", "spiffe://t/ns/a/sa/other"
    taken = 0
    while budget.may_take(slow):
        budget.adjust(slow, 256 * 1024)
        taken += 256 * 1024
    assert stalls == [slow] and budget.stalls == 1
    assert taken <= budget.share + budget.pool + 256 * 1024  # its share and the pool, no more
    assert budget.may_take(other) and other not in budget.stalled
    assert budget.window(slow) == MIN_WINDOW
    assert MIN_WINDOW <= budget.window(other) < MAX_WINDOW  # the budget is half full: windows shrink
    budget.adjust(slow, -taken)
    assert resumes == [slow] and budget.held == 0


def test_filling_the_whole_budget_stalls_everyone_holding_bytes():
    budget = BufferBudget(16 * MiB, 2)  # shares of 4 MiB, a pool of 8 MiB
    budget.adjust("a", 3 * MiB)
    budget.adjust("b", 3 * MiB)
    assert not budget.stalled
    budget.adjust("b", 10 * MiB)  # 16 MiB: the whole budget
    assert budget.stalled == {"a", "b"}
    budget.adjust("b", -4 * MiB)
    assert budget.stalled == set()


def test_releasing_more_than_held_is_a_bug_not_a_negative_balance():
    budget = BufferBudget(16 * MiB)
    budget.adjust("a", 10)
    with pytest.raises(ValueError):
        budget.adjust("a", -11)


def test_a_budget_too_small_to_hold_a_window_is_refused():
    with pytest.raises(ValueError):
        BufferBudget(1 * MiB)


@pytest.mark.parametrize("files, expected", [
    ({"proc": "0::/kubepods/agent\n", "cgroup.controllers": "memory",
      "kubepods/agent/memory.max": "268435456\n", "kubepods/memory.max": "max\n"}, 256 * MiB),
    ({"proc": "0::/kubepods/agent\n", "cgroup.controllers": "memory", "unified/cgroup.controllers": "",
      "unified/kubepods/agent/memory.max": "268435456\n", "kubepods/agent/memory.max": "max\n"},
     256 * MiB),  # cgroup v2 where agent.mounts found it (/sys/fs/cgroup/unified on a hybrid host)
    ({"proc": "0::/a/b\n", "cgroup.controllers": "memory", "a/b/memory.max": "max\n", "a/memory.max": "1073741824\n"},
     1024 * MiB),  # the parent's limit binds the child
    ({"proc": "0::/x\n", "cgroup.controllers": "memory", "x/memory.max": "max\n"}, None),
    ({"proc": "4:memory:/pa/agent\n0::/\n", "memory/pa/agent/memory.limit_in_bytes": "268435456\n",
      "memory/pa/memory.limit_in_bytes": "9223372036854771712\n"}, 256 * MiB),  # cgroup v1 (hybrid host)
    ({"proc": "4:memory:/pa\n", "memory/pa/memory.limit_in_bytes": "9223372036854771712\n"}, None),
])
def test_the_memory_limit_comes_from_the_agents_own_cgroup(tmp_path, files, expected):
    for name, text in files.items():
        if name == "proc" or text is None:
            continue
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "proc").write_text(files["proc"])
    cgroup2 = tmp_path / "unified" if "unified/cgroup.controllers" in files else tmp_path
    assert B.memory_limit(str(tmp_path / "proc"), str(tmp_path), str(cgroup2)) == expected


def test_the_default_budget_is_a_quarter_of_the_limit_with_a_fallback():
    assert B.default_budget(256 * MiB) == 64 * MiB
    assert B.default_budget(None) == B.FALLBACK_BUDGET
    assert B.default_budget(4 * MiB) == B.MIN_BUDGET
    assert B.default_budget(1 << 40) == B.MAX_DEFAULT_BUDGET


def test_a_configured_budget_wins_over_the_cgroup(tmp_path):
    budget, origin = B.budget_from_config(32 * MiB, 4)
    assert budget.total == 32 * MiB and budget.share == 4 * MiB and origin == "proxy.buffer_budget_bytes"
