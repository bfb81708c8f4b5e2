"""Independent protocol branches in merged rounds (secure.mpc.concurrent): the same values
as one after the other, the rounds of the longest branch, failures that neither hang nor
poison the party."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure.mpc import arithmetic as ar
from secure.mpc import compare as cmp
from secure.mpc.engine import PartyFailure

F64 = torch.float64


def _program(kind: str):
    """A protocol step on (party, x, y) and its plaintext value."""
    if kind == "mul":
        return (lambda p, x, y: ar.mul(p, x, y)), (lambda a, b: a * b)
    if kind == "lt":
        return (lambda p, x, y: cmp.less_than(p, x, y)), (lambda a, b: (a < b).to(F64))
    if kind == "square-twice":
        return (lambda p, x, y: ar.mul(p, ar.mul(p, x, x), x)), (lambda a, b: a * a * a)
    if kind == "max":
        return (lambda p, x, y: cmp.max_along(p, x)), (lambda a, b: a.amax(-1, keepdim=True))
    raise AssertionError(kind)


KINDS = ["mul", "lt", "square-twice", "max"]


@settings(max_examples=12, deadline=None)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=4),
       n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_branches_give_the_sequential_values_in_the_longest_rounds(runner, kinds: list[str], n: int,
                                                                    seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dtype=F64, generator=gen) * 3
    y = torch.randn(n, dtype=F64, generator=gen) * 3
    programs = [_program(k) for k in kinds]
    sx, sy = runner.share(x), runner.share(y)

    def alone(i: int) -> int:
        return runner.rounds_of(lambda p, a, b: programs[i][0](p, a, b), sx, sy)

    def together(p, a, b):
        return p.concurrently([lambda prog=prog: prog(p, a, b) for prog, _ in programs])

    rounds = runner.rounds_of(together, sx, sy)
    assert rounds == max(alone(i) for i in range(len(programs)))
    outs = runner.run(together, sx, sy)
    for (_, plain), got in zip(programs, outs):
        assert torch.allclose(got, plain(x, y), atol=1e-3 * (1 + plain(x, y).abs().max().item()))


def test_a_failing_branch_fails_the_call_and_the_party_keeps_working(runner) -> None:
    x = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    sx = runner.share(x)

    def failing(p, a):
        def bad():
            ar.mul(p, a, a)  # one round, then a bug
            raise KeyError("a bug in branch 1")
        return p.concurrently([lambda: cmp.less_than(p, a, a), bad])

    with pytest.raises(PartyFailure, match="a bug in branch 1"):
        runner.run(failing, sx)
    # the same cluster still computes, in step: no thread or merger left behind
    assert torch.allclose(runner.run(lambda p, a: ar.mul(p, a, a), sx), x * x, atol=1e-4)
    assert runner.rounds_of(lambda p, a: p.concurrently([lambda: ar.mul(p, a, a)] * 2), sx) == 2


def test_nested_branches_run_one_after_the_other(runner) -> None:
    x = torch.tensor([0.5, 1.5], dtype=F64)
    sx = runner.share(x)

    def nested(p, a):
        inner = lambda: p.concurrently([lambda: ar.mul(p, a, a), lambda: ar.mul(p, a, a)])  # noqa: E731
        return p.concurrently([inner, lambda: cmp.less_than(p, a, a)])

    assert runner.rounds_of(nested, sx) == 8  # the inner pair takes 4 rounds inside an 8-round branch
    sq, sq2, lt = runner.run(lambda p, a: [*(out := nested(p, a))[0], out[1]], sx)
    assert torch.allclose(sq, x * x, atol=1e-4) and torch.allclose(sq2, x * x, atol=1e-4)
    assert torch.equal(lt, torch.zeros(2, dtype=F64))


def test_merged_rounds_cost_the_bytes_of_the_branches_alone(cluster, runner) -> None:
    """No framing: the branches' messages travel as their own, so the bytes are the sum."""
    x = torch.randn(50, dtype=F64, generator=torch.Generator().manual_seed(5))
    sx = runner.share(x)

    def sent(program) -> int:
        before = sum(cluster.bytes_sent())
        cluster.run(program, [(s,) for s in sx])
        return sum(cluster.bytes_sent()) - before

    alone = sent(lambda p, a: cmp.less_than(p, a, a)) + sent(lambda p, a: ar.mul(p, ar.mul(p, a, a), a))
    assert sent(lambda p, a: p.concurrently([lambda: cmp.less_than(p, a, a),
                                             lambda: ar.mul(p, ar.mul(p, a, a), a)])) == alone
