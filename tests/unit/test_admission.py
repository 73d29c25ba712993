"""Admission's Python judges (``opsync.admission``), value by value, and which judge each SQL type gets. They must
refuse exactly what PostgreSQL 15's input functions refuse; that they do, against PostgreSQL itself:
tests/test_admission_oracle.py. Through the API and the drainer: tests/test_admission.py."""

import math
from datetime import UTC, datetime

import pytest
from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Float, Integer, Numeric, SmallInteger, String, Text, Uuid
from sqlalchemy.dialects.postgresql import JSONB

from opsync import admission
from opsync.admission import UNDECIDED, Refused, Unrepresentable


@pytest.mark.parametrize(
    "value, judged",
    [
        (12, 12),
        ("12", 12),
        (" +12\n", 12),
        (1e16, 10**16),
        ("-0", 0),
    ],
)
def test_bigint_judge(value, judged):
    assert admission.judge_integer(64)(value) == judged


@pytest.mark.parametrize("value", [1.0, -0.0, 1e-7, "1.0", "١٢", "1 2", "", True, [1], {"a": 1}, 2**63, 1.5e300])
def test_bigint_judge_refuses(value):
    with pytest.raises(admission.Refused):
        admission.judge_integer(64)(value)


@pytest.mark.parametrize(
    "value, judged",
    [
        ("t", True),
        ("TRU", True),
        (" yes\t", True),
        ("on", True),
        (1, True),
        ("of", False),
        ("0", False),
        ("n", False),
    ],
)
def test_boolean_judge(value, judged):
    assert admission.judge_bool(value) is judged


@pytest.mark.parametrize("value", ["o", "truex", "01", 2, 1.0, "", None])
def test_boolean_judge_refuses(value):
    with pytest.raises(admission.Refused):
        admission.judge_bool(value)


def test_uuid_judge_takes_postgresqls_spellings_only():
    key = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    for spelling in (key.upper(), "{" + key + "}", key.replace("-", ""), "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"):
        assert admission.judge_uuid(spelling) == key
    for spelling in ("urn:uuid:" + key, " " + key, "{" + key, key[:-1], "-" + key):
        with pytest.raises(admission.Refused):
            admission.judge_uuid(spelling)


@pytest.mark.parametrize(("bits", "kind", "low", "high"), [(16, "smallint", -(2**15), 2**15 - 1), (32, "integer", -(2**31), 2**31 - 1)])
def test_each_integer_width_takes_its_range_and_names_it(bits, kind, low, high):
    judge = admission.judge_integer(bits)
    assert (judge(low), judge(str(high))) == (low, high)
    for outside in (low - 1, high + 1):
        with pytest.raises(Refused, match=rf"out of range for {kind} \({low} to {high}\)"):
            judge(outside)
    with pytest.raises(Refused, match=f"{kind} refuses 1.5"):
        judge(1.5)


@pytest.mark.parametrize(
    ("value", "judged"),
    [
        (1.5, 1.5),
        (7, 7.0),
        ("1.5", 1.5),
        (" -2.5e3\n", -2500.0),
        (".5", 0.5),
        ("5.", 5.0),
        ("0e99", 0.0),
        ("2.2250738585072014e-308", 2.2250738585072014e-308),
    ]
    + [("NaN", math.nan), ("-Infinity", -math.inf), (" inf ", math.inf)],
)
def test_float_judge_takes_strtods_decimals_and_words(value, judged):
    found = admission.judge_float(value)
    assert found == judged or (math.isnan(judged) and math.isnan(found))


def test_float_judge_drops_the_sign_of_zero_refuses_what_overflows_or_underflows_and_leaves_hex_to_postgresql():
    assert math.copysign(1, admission.judge_float(-0.0)) == 1.0
    for value in ("1e400", "-1e309", "1e-400", 10**400):
        with pytest.raises(Refused, match="out of range for double precision"):
            admission.judge_float(value)
    for value in ("abc", "1.5x", "", [1.5], None):
        with pytest.raises(Refused, match="not a valid double precision number"):
            admission.judge_float(value)
    assert admission.judge_float("0x1p3") is UNDECIDED and admission.judge_float("nan(123)") is UNDECIDED


def test_json_numbers_a_double_cannot_hold_are_kept_apart_from_infinity_and_zero():
    assert admission.json_float("1.5") == 1.5 and admission.json_float("0.000e5") == 0.0
    for text in ("1e400", "-1e400", "1e-400", "2.4e-324"):
        found = admission.json_float(text)
        assert isinstance(found, Unrepresentable) and found == text


def test_string_judge_counts_characters_clips_trailing_spaces_and_takes_scalars_as_postgresql_prints_them():
    judge = admission.judge_string(5)
    assert judge("ééééé") == "ééééé"  # characters, not bytes
    assert judge("abc   ") == "abc  "  # spaces past the limit are clipped, as varchar_input does
    with pytest.raises(Refused, match="at most 5 characters, got 6"):
        judge("abcdef")
    assert (judge(12), judge(True), judge(0.5)) == ("12", "true", "0.5")
    assert judge({"a": 1}) is UNDECIDED and judge(["a"]) is UNDECIDED  # jsonb text: PostgreSQL's to print
    assert admission.judge_string(None)("x" * 10_000) == "x" * 10_000


def test_time_judge_reads_rfc_3339_with_an_offset_into_utc():
    assert admission.judge_time("2026-12-07T03:00:00Z") == datetime(2026, 12, 7, 3, tzinfo=UTC)
    assert admission.judge_time("2026-12-07 05:30:00.25+02:30") == datetime(2026, 12, 7, 3, 0, 0, 250_000, tzinfo=UTC)
    assert admission.judge_time("2026-12-07T03:00:00-15:59") == datetime(2026, 12, 7, 18, 59, tzinfo=UTC)
    with pytest.raises(Refused, match=r"UTC offset \+16:00 beyond ±15:59"):
        admission.judge_time("2026-12-07T03:00:00+16:00")
    with pytest.raises(Refused, match="date/time field value out of range"):
        admission.judge_time("2026-02-30T00:00:00Z")
    with pytest.raises(Refused, match="in UTC it must fall within the years 1 to 9999"):
        admission.judge_time("0001-01-01T00:30:00+01:00")


@pytest.mark.parametrize(
    "value", ["2026-12-07T24:00:00Z", "2026-12-07T23:59:60Z", "0000-01-01T00:00:00Z", "Dec 7 2026 03:00 PST", 1_700_000_000]
)
def test_time_spellings_python_does_not_judge_are_left_to_postgresql(value):
    assert admission.judge_time(value) is UNDECIDED


@pytest.mark.parametrize("value", ["now", "Today", "tomorrow 03:00", "yesterday"])
def test_relative_time_words_are_refused_naming_the_word(value):
    with pytest.raises(Refused, match=f"relative time '{value.split()[0].lower()}' is refused"):
        admission.judge_time(value)


def test_json_numbers_come_back_as_jsonbs_numeric_keeps_them():
    assert admission.judge_json({"a": [1e16, -0.0, 0.5], "b": "x", "c": 3}) == {"a": [10**16, 0.0, 0.5], "b": "x", "c": 3}
    assert type(admission.judge_json(1e16)) is int and math.copysign(1, admission.judge_json(-0.0)) == 1.0


def test_each_sql_type_gets_its_judge_and_one_with_no_rule_leaves_the_value_to_postgresql():
    def judge(sql_type):
        return admission.judge_for(Column("c", sql_type))

    assert judge(Uuid()) is admission.judge_uuid and judge(Boolean()) is admission.judge_bool
    assert judge(JSONB()) is admission.judge_json and judge(JSON()) is admission.judge_json
    assert judge(Float()) is admission.judge_float and judge(DateTime(timezone=True)) is admission.judge_time
    assert judge(DateTime()) is admission.judge_by_postgres and judge(Numeric(10, 2)) is admission.judge_by_postgres
    for sql_type, high in ((SmallInteger(), 2**15 - 1), (Integer(), 2**31 - 1), (BigInteger(), 2**63 - 1)):
        assert judge(sql_type)(high) == high
        with pytest.raises(Refused, match="out of range"):
            judge(sql_type)(high + 1)
    with pytest.raises(Refused, match="at most 3 characters"):
        judge(String(3))("abcd")
    assert judge(Text())("x" * 1000) == "x" * 1000


@pytest.mark.parametrize("key", ["CCAT", "a,b", "B 1", "x" * 16, "ü" * 16])
def test_a_natural_key_is_kept_exactly_as_sent(key):
    assert admission.judge_natural_key(16)(key) == key


@pytest.mark.parametrize(
    "key, why",
    [
        ("", "a key cannot be empty"),
        ("x" * 17, "at most 16 characters, got 17"),
        ("CCAT" + " " * 13, "at most 16 characters, got 17"),  # varchar would clip the spaces: the key would change
        (17, "send it as a JSON string"),
        (None, "send it as a JSON string"),
        ("a\x00b", "cannot hold a NUL"),
    ],
)
def test_a_bad_natural_key_is_refused_with_the_reason(key, why):
    with pytest.raises(Refused, match=why):
        admission.judge_natural_key(16)(key)
