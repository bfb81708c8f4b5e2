"""Shared fixtures: one in-process three-party cluster for the whole test session."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from secure.mpc import shares as sh
from secure.mpc.engine import LocalCluster

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("ci")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cluster() -> LocalCluster:
    return LocalCluster(deadline_s=30.0)


class Runner:
    """Deal plaintext inputs, run a program on the three parties, open the result."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.fp = cluster.fp

    def share(self, x: torch.Tensor, integral: bool = False) -> list[sh.AShare]:
        if integral:
            return sh.deal_shares(x.to(torch.int64), 0)
        return sh.deal_shares(self.fp.encode(x), self.fp.frac_bits)

    def run(self, program, *inputs: list[sh.AShare]):
        """program(party, *shares) -> AShare or list of AShares; returns opened floats."""
        from secure.mpc.arithmetic import open_many

        def body(party, *xs):
            out = program(party, *xs)
            many = isinstance(out, (list, tuple))
            outs = list(out) if many else [out]
            opened = open_many(party, outs)
            vals = [party.fp.decode(v, s.frac_bits) for v, s in zip(opened, outs)]
            return vals if many else vals[0]

        results = self.cluster.run(body, [tuple(x[i] for x in inputs) for i in range(3)])
        return results[0]

    def rounds_of(self, program, *inputs: list[sh.AShare]) -> int:
        before = self.cluster.rounds
        self.cluster.run(program, [tuple(x[i] for x in inputs) for i in range(3)])
        return self.cluster.rounds - before


@pytest.fixture()
def runner(cluster: LocalCluster) -> Runner:
    return Runner(cluster)
