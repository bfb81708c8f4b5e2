"""The peer benchmark's own side: our measurement of one encoder layer, and that a missing
peer environment is reported (with the command that creates it) instead of failing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "peers" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module
    spec.loader.exec_module(module)
    return module


def test_missing_peer_venvs_are_reported_and_ours_still_measured(bench, tmp_path, monkeypatch):
    tiny = bench.Shape("tiny", 32, 2, 64, 8)
    monkeypatch.setattr(bench, "SHAPES", [tiny])
    out = tmp_path / "peers.json"
    assert bench.main(["--peers-dir", str(tmp_path / "none"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["summary"]
    assert row["ours_s"] > 0 and row["ours_MB_sent_p0"] > 0 and row["ours_rounds"] > 0
    assert row["max_abs_error"]["ours"] < 0.05
    assert row["spu_s"] is None and row["crypten_s"] is None
    assert sum("setup_peers.sh" in n for n in result["notes"]) == 2


def test_peer_runner_without_result_is_a_failure_not_a_crash(bench, tmp_path):
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").symlink_to(sys.executable)
    runner = tmp_path / "runner.py"
    runner.write_text("import sys; print('boom', file=sys.stderr); sys.exit(3)\n")
    peer = bench.Peer("fake", tmp_path / "venv", runner)
    assert peer.available() is None
    r = peer.run(tmp_path / "x.npz", bench.SHAPES[0], repeats=1, timeout_s=60)
    assert not r["ok"] and "exited 3" in r["error"] and "boom" in r["stderr_tail"]
    runner.write_text("import time; time.sleep(30)\n")
    r = peer.run(tmp_path / "x.npz", bench.SHAPES[0], repeats=1, timeout_s=1)
    assert not r["ok"] and "timed out" in r["error"]
