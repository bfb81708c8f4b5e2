"""Secure generation over the party nodes: ``Party.Generate`` on three ``python -m party``
processes (TLS) serving a random 2-layer LLaMA dealt as ``lm`` (prompt buckets 8 and 16,
cache capacities 16 and 24, a 10 s peer deadline, a 3 s receive deadline):

* the SDK and the command line stream tokens that follow the plaintext model's logits,
  both reveal modes;
* bad input, each with its status, the nodes serving on: an unknown model, an encoder
  name, a bucket not dealt, a budget beyond the positions or the cache, a token id outside
  the vocabulary, a one-hot of the wrong width, a step for no session or for another
  client's, a step beyond the budget, a decode step sending positions;
* cache hygiene: after 50 sessions that finish, are cancelled or time out, no party holds
  a session (``Describe.sessions``), and a party killed mid-session fails the client within
  the deadline while the other two free the session.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from client.generate import GenerationFailed, generate, stream_generation
from client.sdk import SecureClient, local_client
from party.config import TOKEN_METADATA_KEY
from party.launch import LocalNodes
from protos import load as load_protos
from secure.graph.causal import GenerationLimitError, prefill_inputs
from secure.runtime.inputs import InputSpec, client_parts
from secure.transport.wire import tensor_chunks
from tests.test_catalogue import WORDS, _save_tokenizer

pb2, pb2_grpc = load_protos()

MODEL = "lm"
BUCKETS, CAPACITIES = (8, 16), (16, 24)
DEADLINE_S, RECEIVE_S = 10.0, 3.0
PROMPT = "the secret question of the private party"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from secure.models import tiny_llama

    path = tmp_path_factory.mktemp("lm")
    vocab = _save_tokenizer(path)
    tiny_llama(vocab_size=vocab, seed=11).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Iterator[LocalNodes]:
    cluster = LocalNodes(tmp_path_factory.mktemp("generation"), deadline_s=DEADLINE_S, progress=False,
                         models=(f"{MODEL}={folder}",), prompt_buckets=BUCKETS, capacities=CAPACITIES,
                         receive_timeout_s=RECEIVE_S)
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def plain(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    from secure.models import load_tokenizer

    return load_tokenizer(folder)


def _sessions(client: SecureClient) -> list[int]:
    """Each party's live generation sessions (Describe, asked afresh)."""
    return [int(stub.Describe(pb2.DescribeRequest(), metadata=client.metadata(i), timeout=10).sessions)
            for i, stub in enumerate(client.stubs)]


def _wait_no_sessions(client: SecureClient, within_s: float) -> list[int]:
    end = time.monotonic() + within_s
    while True:
        counts = _sessions(client)
        if counts == [0, 0, 0] or time.monotonic() > end:
            return counts
        time.sleep(0.2)


def _reference(plain: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        return plain(input_ids=ids).logits[0, len(prompt) - 1:].double()


# ---- generation ------------------------------------------------------------------------------
def test_generation_follows_the_plaintext_model(nodes: LocalNodes, plain: torch.nn.Module, tokenizer) -> None:
    steps = []
    with local_client(nodes) as client:
        result = generate(client, MODEL, PROMPT, max_new_tokens=12, tokenizer=tokenizer, keep_logits=True,
                          stop_at_eos=False, on_token=steps.append)
    assert len(result.token_ids) == 12 == len(steps)
    assert [e.kind for e in result.events] == ["prefill"] + ["decode"] * 11
    # bucket 8: the 8 + k - 1 filled slots of step k fit capacity 16 up to step 9, then 24
    assert [e.capacity for e in result.events[1:]] == [16] * 9 + [24] * 2
    reference = _reference(plain, result.prompt_ids, result.token_ids)
    secure = torch.stack([e.logits for e in result.events])
    assert float((secure - reference).abs().max()) < 0.05
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert bool((secure.argmax(-1) == reference.argmax(-1))[clear].all())
    # the protocols rotate roles between the parties, so each step's largest sender is compared
    decode_bytes = {max(e.bytes_sent) for e in result.events[1:] if e.capacity == 16}
    assert len(decode_bytes) == 1 and max(result.events[0].bytes_sent) > 3 * decode_bytes.pop()


def test_argmax_reveal_opens_only_token_ids(nodes: LocalNodes, plain: torch.nn.Module, tokenizer) -> None:
    with local_client(nodes) as client:
        result = generate(client, MODEL, PROMPT, max_new_tokens=4, tokenizer=tokenizer, reveal="argmax",
                          stop_at_eos=False)
        with pytest.raises(ValueError, match="sampling needs reveal='logits'"):
            from client.sampling import Sampler

            generate(client, MODEL, PROMPT, 2, Sampler(temperature=1.0), reveal="argmax", tokenizer=tokenizer)
    assert all(e.logits is None for e in result.events)
    reference = _reference(plain, result.prompt_ids, result.token_ids)
    top2 = reference.topk(2, dim=-1).values
    for token, logits, gap in zip(result.token_ids, reference, top2[:, 0] - top2[:, 1]):
        if gap > 0.1:
            assert token == int(logits.argmax())


def test_the_command_line_streams_tokens(nodes: LocalNodes, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from client.__main__ import main as client_main

    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
    argv = ["generate", "--config", str(nodes.config_path), "--token-file", str(nodes.token_path), "--model",
            MODEL, "--max-new-tokens", "3", "--no-stop", "--temperature", "0.8", "--top-k", "5", "--seed", "3"]
    assert client_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(PROMPT)
    lines = [line for line in captured.err.splitlines() if line.startswith("token ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "prefill" in lines[0] and "decode (cache 16)" in lines[1] and "rounds" in lines[2]


# ---- bad input -----------------------------------------------------------------------------------
class RawSession:
    """A hand-made Generate stream to one party, to send what the SDK never would."""

    def __init__(self, nodes: LocalNodes, party: int = 0) -> None:
        cfg = nodes.config
        assert cfg.ca is not None
        self.channel = grpc.secure_channel(cfg.party(party).client_address,
                                           grpc.ssl_channel_credentials(cfg.ca.read_bytes()),
                                           options=[("grpc.ssl_target_name_override", f"party{party}")])
        self.metadata = ((TOKEN_METADATA_KEY, nodes.tokens[party]),)
        self.party = party

    def status(self, messages: Iterable, timeout: float = 20.0) -> tuple[grpc.StatusCode, str]:
        """Send ``messages`` (then half-close); the status the stream ends with."""
        try:
            for _ in pb2_grpc.PartyStub(self.channel).Generate(iter(messages), metadata=self.metadata,
                                                               timeout=timeout):
                pass
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        finally:
            self.channel.close()
        return grpc.StatusCode.OK, ""


def _start(session: str, model: str = MODEL, bucket: int = 8, budget: int = 4, reveal: str = "logits"):
    return pb2.GenerateRequest(start=pb2.GenerateStart(session_id=session, model=model, prompt_bucket=bucket,
                                                       max_new_tokens=budget, reveal=reveal))


def _prompt_parts(party: int, vocab: int, bucket: int = 8, n: int = 4, session: str = "", step: int = 0,
                  width: int | None = None) -> list:
    inputs = prefill_inputs(torch.arange(1, n + 1), bucket)
    specs = [InputSpec("input_ids", "client", width or vocab), InputSpec("attention_mask", "public"),
             InputSpec("position_ids", "public")]
    parts = client_parts(specs, inputs, nodes_fp())[party]
    messages = [pb2.GenerateRequest(input=pb2.InputChunk(name=p.name, kind=p.kind, part=p.part, chunk=c))
                for p in parts for c in tensor_chunks(p.tensor, pb2.TensorChunk)]
    return [*messages, pb2.GenerateRequest(end=pb2.StepEnd(session_id=session, step=step))]


def nodes_fp():
    from secure.mpc.ring import FixedPoint

    return FixedPoint(18)


VOCAB = len(WORDS) + 3


@pytest.mark.parametrize(("case", "code", "fragment"), [
    ("unknown model", grpc.StatusCode.NOT_FOUND, "unknown model 'gpt-9000'"),
    ("bucket not dealt", grpc.StatusCode.INVALID_ARGUMENT, "prompt bucket 32 was not dealt"),
    ("budget beyond positions", grpc.StatusCode.OUT_OF_RANGE, "exceed the model's 128 positions"),
    ("budget beyond the cache", grpc.StatusCode.OUT_OF_RANGE, "largest captured capacity is 24"),
    ("one-hot of the wrong width", grpc.StatusCode.INVALID_ARGUMENT, "must be int64 of shape"),
    ("step for no session", grpc.StatusCode.NOT_FOUND, "no such session"),
    ("no start", grpc.StatusCode.INVALID_ARGUMENT, "must begin with start"),
    ("bad reveal", grpc.StatusCode.INVALID_ARGUMENT, "reveal must be one of"),
])
def test_bad_requests_get_a_status(nodes: LocalNodes, case: str, code: grpc.StatusCode, fragment: str) -> None:
    session = uuid.uuid4().hex
    party = 1  # the onehot's dense share: a party that gets a dense component checks its width
    messages = {
        "unknown model": [_start(session, model="gpt-9000")],
        "bucket not dealt": [_start(session, bucket=32)],
        "budget beyond positions": [_start(session, budget=200), *_prompt_parts(party, VOCAB, session=session)],
        "budget beyond the cache": [_start(session, bucket=16, budget=11),
                                    *_prompt_parts(party, VOCAB, bucket=16, session=session)],
        "one-hot of the wrong width": [_start(session), *_prompt_parts(party, VOCAB, session=session,
                                                                       width=VOCAB + 5)],
        "step for no session": [_start(session), *_prompt_parts(party, VOCAB, session="nobody")],
        "no start": _prompt_parts(party, VOCAB, session=session),
        "bad reveal": [_start(session, reveal="everything")],
    }[case]
    got, details = RawSession(nodes, party).status(messages)
    assert got == code, f"{case}: {got.name}: {details}"
    assert fragment in details, details
    with local_client(nodes) as client:  # serving on, and nothing held
        assert _wait_no_sessions(client, DEADLINE_S + 5) == [0, 0, 0]


def test_client_side_limits_are_named(nodes: LocalNodes, tokenizer) -> None:
    with local_client(nodes) as client:
        with pytest.raises(GenerationLimitError, match="outside the model's vocabulary"):
            generate(client, MODEL, [1, 2, VOCAB + 3], 2)
        with pytest.raises(GenerationLimitError, match="largest prompt bucket"):
            generate(client, MODEL, list(range(1, 18)), 2)
        with pytest.raises(GenerationLimitError, match="positions"):
            generate(client, MODEL, [1, 2, 3], 500)
        with pytest.raises(GenerationFailed, match="no model 'gpt-9000'"):
            generate(client, "gpt-9000", [1, 2], 2)


def test_steps_out_of_turn_are_refused(nodes: LocalNodes) -> None:
    """A step naming another client's live session, a step beyond the budget and a decode
    step sending positions, each on all three parties at once (a lone party would wait for
    its peers)."""
    live_id = uuid.uuid4().hex
    with local_client(nodes) as client:
        live = stream_generation(client, MODEL, [1, 2, 3], max_new_tokens=8, stop_at_eos=False, session_id=live_id)
        next(live)  # a live session on every party, waiting for its next token
        try:
            other = uuid.uuid4().hex
            statuses = _all_parties(nodes, lambda p: [
                _start(other), *_prompt_parts(p, VOCAB, session=other),
                pb2.GenerateRequest(end=pb2.StepEnd(session_id=live_id, step=1))])
            _refused(statuses, grpc.StatusCode.PERMISSION_DENIED, "another client's session")
            assert len(next(live).text) >= 0  # the live session is untouched
        finally:
            live.close()
    budget = uuid.uuid4().hex
    statuses = _all_parties(nodes, lambda p: [_start(budget, budget=1), *_prompt_parts(p, VOCAB, session=budget),
                                              *_token_parts(p, budget, 1)])
    _refused(statuses, grpc.StatusCode.OUT_OF_RANGE, "token budget of 1 is spent")
    sneaky = uuid.uuid4().hex
    statuses = _all_parties(nodes, lambda p: [_start(sneaky), *_prompt_parts(p, VOCAB, session=sneaky),
                                              *_prompt_parts(p, VOCAB, session=sneaky, step=1)])
    _refused(statuses, grpc.StatusCode.INVALID_ARGUMENT, "positions and masks are the parties' own")
    with local_client(nodes) as client:
        assert _wait_no_sessions(client, DEADLINE_S + 5) == [0, 0, 0]


def _refused(statuses: list[tuple[grpc.StatusCode, str]], code: grpc.StatusCode, fragment: str) -> None:
    """The parties refused with ``code`` naming the cause; a party whose last peer message of
    the prefill was overtaken by the first refuser's abort reports ABORTED instead."""
    assert any(c == code and fragment in d for c, d in statuses), statuses
    assert {c for c, _ in statuses} <= {code, grpc.StatusCode.ABORTED}, statuses


def _token_parts(party: int, session: str, step: int, token: int = 5) -> list:
    parts = client_parts([InputSpec("input_ids", "client", VOCAB)], {"input_ids": torch.tensor([[token]])},
                         nodes_fp())[party]
    return [*(pb2.GenerateRequest(input=pb2.InputChunk(name=p.name, kind=p.kind, part=p.part, chunk=c))
              for p in parts for c in tensor_chunks(p.tensor, pb2.TensorChunk)),
            pb2.GenerateRequest(end=pb2.StepEnd(session_id=session, step=step))]


def _all_parties(nodes: LocalNodes, messages_for) -> list[tuple[grpc.StatusCode, str]]:
    """The same hand-made session on the three parties at once (each with its own parts)."""
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda p: RawSession(nodes, p).status(messages_for(p)), range(3)))


# ---- cache hygiene -------------------------------------------------------------------------------
def test_fifty_sessions_leave_nothing_behind(nodes: LocalNodes) -> None:
    """20 finish, 20 are cancelled after their first token, 10 go silent and time out."""
    def finish(i: int) -> str:
        with local_client(nodes) as client:
            generate(client, MODEL, [1 + i % 7, 2, 3], max_new_tokens=2, stop_at_eos=False)
        return "finished"

    def cancel(i: int) -> str:
        with local_client(nodes) as client:
            live = stream_generation(client, MODEL, [2, 3 + i % 5], max_new_tokens=5, stop_at_eos=False)
            next(live)
            live.close()  # cancels the three calls
        return "cancelled"

    def silent(i: int) -> str:
        """Sends its prompt to all three parties, then nothing, keeping its streams open:
        every party cuts it off at the receive deadline."""
        session = uuid.uuid4().hex

        def messages(p: int) -> Iterator:
            yield _start(session)
            yield from _prompt_parts(p, VOCAB, session=session)
            time.sleep(3 * RECEIVE_S)

        t0 = time.monotonic()
        statuses = _all_parties(nodes, messages)
        waited = time.monotonic() - t0
        if all(c != grpc.StatusCode.OK for c, _ in statuses) and waited < 2 * RECEIVE_S + 5:
            return "timed out"
        return f"{statuses} after {waited:.1f} s"

    jobs = [(finish, i) for i in range(20)] + [(cancel, i) for i in range(20)] + [(silent, i) for i in range(10)]
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda job: job[0](job[1]), jobs))
    assert outcomes.count("finished") == 20 and outcomes.count("cancelled") == 20, outcomes
    assert outcomes.count("timed out") == 10, outcomes
    with local_client(nodes) as client:
        assert _wait_no_sessions(client, DEADLINE_S + 5) == [0, 0, 0]
        assert [int(i.running_queries) for i in client.verify_parties()] == [0, 0, 0]


def test_a_party_killed_mid_session_fails_the_client_within_the_deadline(nodes: LocalNodes) -> None:
    with local_client(nodes) as client:
        live = stream_generation(client, MODEL, [1, 2, 3], max_new_tokens=6, stop_at_eos=False)
        next(live)
        nodes.kill(2)
        t0 = time.monotonic()
        try:
            with pytest.raises(GenerationFailed):
                next(live)
            assert time.monotonic() - t0 < DEADLINE_S + 5
            counts = []
            end = time.monotonic() + DEADLINE_S + 5
            while time.monotonic() < end:
                counts = [int(stub.Describe(pb2.DescribeRequest(), metadata=client.metadata(i), timeout=5).sessions)
                          for i, stub in enumerate(client.stubs[:2])]
                if counts == [0, 0]:
                    break
                time.sleep(0.2)
            assert counts == [0, 0]
        finally:
            live.close()
            nodes.start(2)
            nodes.wait_ready()
    with local_client(nodes) as client:
        assert len(generate(client, MODEL, [4, 5], 2, stop_at_eos=False).token_ids) == 2
