"""One envelope codec (:mod:`opsync.buffer.codec`): what the API's enqueue writes, every reader reads back the
same, through the codec: the drain, the dead letters, the publisher and the CONFIRM script's Lua half. Its format
is compact, and envelopes of the format before it (buffered before an upgrade) are still read and drained."""

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsync import dlq, drain
from opsync.apply import Pending
from opsync.buffer import Buffer, codec, write
from opsync.buffer.codec import UnreadableEnvelope, decode, encode
from opsync.buffer.scripts import lua
from opsync.buffer.stream import Entry
from opsync.envelope import Op, Step, Transaction
from tests import test_drain

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("opsync", "ingest_api", "plugins", "dags", "datasette")
CODEC = (REPO / "opsync/buffer/codec.py", REPO / "opsync/buffer/lua/envelope.lua")
# Ways to write or read an envelope other than the codec's: pydantic's JSON of a Transaction, a decoder of its own, Lua's
ELSEWHERE = re.compile(r"Transaction\.model_validate_json|txn\.model_dump_json\(|msgspec\.json\.Decoder\(|cjson\.decode")


def transaction(**changes) -> Transaction:
    key = uuid.uuid4()
    steps = [
        Step(op=Op.insert, table="housekeeping_sample", key=key, values={"value": 1.25, "note": 'ünïcode \u2028 "q"', "big": 2**62}),
        Step(op=Op.update, table="housekeeping_sample", key=key, values={"payload": {"nested": [1, None, {"a": "b"}]}}),
        Step(op=Op.upsert, table="raw_data_file", key=uuid.uuid4(), values={}),
        Step(op=Op.delete, table="raw_data_file", key=uuid.uuid4()),
    ]
    fields = dict(txn_id=uuid.uuid4(), site="observatory", accepted_at=datetime.now(UTC), idempotency_key="k-1", steps=steps)
    return Transaction(**(fields | changes))


def previous(txn: Transaction) -> bytes:
    """The envelope as the version before the compact format wrote it."""
    return txn.model_dump_json().encode()


@pytest.mark.parametrize("written_by", [encode, previous])
@pytest.mark.parametrize("changes", [{}, {"idempotency_key": None}, {"steps": []}])
def test_what_encode_writes_decode_reads_back_exactly(changes, written_by):
    txn = transaction(**changes)
    envelope = decode(written_by(txn))
    assert (envelope.txn_id, envelope.site, envelope.accepted_at, envelope.idempotency_key) == (
        txn.txn_id,
        txn.site,
        txn.accepted_at,
        txn.idempotency_key,
    )
    assert [(s.op, s.table, s.key, s.values) for s in envelope.steps] == [(s.op, s.table, str(s.key), s.values) for s in txn.steps]


def test_the_format_is_compact():
    """No field names: a one-record envelope is ~70 bytes shorter than the named format (issue 17's memory)."""
    txn = transaction(steps=transaction().steps[:1])
    assert encode(txn).startswith(b'[1,"') and len(encode(txn)) <= len(previous(txn)) - 70


@pytest.mark.parametrize("raw", [None, b"", b"not json", b'{"txn_id": "x"}', b"[1, 2]", b'[2, "x"]'])
def test_what_is_no_envelope_is_refused_as_unreadable(raw):
    with pytest.raises(UnreadableEnvelope):
        decode(raw)


@pytest.mark.parametrize("written_by", [encode, previous])
def test_the_lua_half_reads_the_rows_decode_reads(redis_server, written_by):
    """CONFIRM releases the rows of an entry's envelope as ``envelope.lua`` reads them: the same as :func:`decode`."""
    client = redis_server.client()
    script = client.register_script(
        lua("envelope") + "local flat = {}\nfor _, row in ipairs(envelope_rows(ARGV[1])) do\n"
        "  flat[#flat + 1] = row[1]\n  flat[#flat + 1] = row[2]\nend\nreturn flat\n"
    )
    raw = written_by(transaction())
    flat = [v.decode() for v in script(args=[raw])]
    assert list(zip(flat[::2], flat[1::2], strict=True)) == decode(raw).row_keys()


@pytest.fixture
def counted(monkeypatch):
    """How many envelopes the codec's decoder read (every reader must go through it)."""
    calls = []
    real = codec.DECODER

    class Spy:
        def decode(self, raw):
            calls.append(raw)
            return real.decode(raw)

    monkeypatch.setattr(codec, "DECODER", Spy())
    return calls


def test_the_drain_and_the_dead_letters_read_through_the_codec(counted):
    txn = transaction()
    raw = encode(txn)
    txns, settlements = drain.read_entries([Entry("1-0", raw), Entry("2-0", b"garbage")])
    assert [t.txn_id for _, t in txns] == [str(txn.txn_id)] and settlements[0].stream_id == "2-0"
    letter = dlq.parse("3-0", {"txn": raw.decode(), "txn_id": "t", "reason": "r", "failed_at": "now"})
    assert letter.txn is not None and letter.tables == ["housekeeping_sample", "raw_data_file"]
    assert isinstance(Pending.read(raw), Pending)
    assert counted == [raw, b"garbage", raw.decode(), raw]


def test_no_production_code_but_the_codec_writes_or_reads_an_envelope():
    """The publisher, the ingest path and every other reader use :func:`encode` / :func:`decode`, not their own."""
    files = [p for top in PRODUCTION for p in (REPO / top).rglob("*") if p.suffix in (".py", ".lua") and p not in CODEC]
    found = {str(p.relative_to(REPO)): ELSEWHERE.findall(p.read_text(encoding="utf-8")) for p in files}
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_a_buffer_filled_before_the_upgrade_drains_and_confirms(redis_server, migrated, planning, monkeypatch):
    """Entries of the named format, then compact ones: all applied once, replicated, their overlay released."""
    buffer = Buffer(redis_server.client(), prefix=f"codec-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(write, "encode_envelope", previous)
    old = [test_drain.buffered(buffer, test_drain.observation(planning, ref="o"), test_drain.raw_file({"$ref": "o"})) for _ in range(3)]
    monkeypatch.undo()
    new = test_drain.buffered(buffer, test_drain.observation(planning))
    assert [fields[b"txn"][:1] for _, fields in buffer.client.xrange(buffer.stream)] == [b"{"] * 3 + [b"["]
    primary, replica = test_drain.engine(migrated.primary.url()), test_drain.engine(migrated.replica.url())
    try:
        assert drain.drain(buffer, primary).applied == 4
        test_drain.confirm_all(buffer, replica)
        assert test_drain.ledger_has(primary, [*old, new]) == 4
    finally:
        primary.dispose()
        replica.dispose()
    assert test_drain.states(buffer, [*old, new]) == ["replicated"] * 4
    assert test_drain.overlay_keys(buffer) == [] and buffer.client.xlen(buffer.stream) == 0
