"""Admission: the site refuses a value exactly when the primary would, and knows what the primary stores.

The drainer hands PostgreSQL each row as JSON through ``jsonb_populate_recordset`` (see
:func:`opsync.apply.compose_step_sql`; direct writes use the same statements). So what the primary
refuses is what that function's casts refuse: the column type's input function applied to the JSON
value's text (a string without its quotes, a number as ``numeric`` prints it, ``true``/``false``,
an object or array as jsonb text), with the column's typmod; then NOT NULL, CHECK and keys.

Design: exact Python for the canonical forms, PostgreSQL itself for the rest.

- The forms scripts send (RFC 3339 times with an offset, JSON numbers, plain strings, integers
  as text, C ``strtod`` decimals and ``NaN``/``Infinity`` words) are judged here, by rules written
  to match PostgreSQL 15's input functions exactly. The 1,000-writes-a-second hot path (a
  housekeeping record: a uuid, a short string, an RFC 3339 time, a float) never waits for a database.
- Any other spelling (``'Nov 21 2026 02:10 PST'``, an offset of seconds, hex floats, an object
  for a text column) is judged by PostgreSQL on the local replica, read-only, by the very cast the
  drainer's statement makes (:class:`ReplicaJudge`). Python imitations of PostgreSQL's date parser
  would be wrong at some edge; the replica cannot be. When the replica is down such a value is
  answered 503 with Retry-After (:class:`JudgeUnavailable`): a wrong verdict would block or lose
  an observation, a retry costs nothing. Values judged here never need it.
- CHECK constraints whose form is known (a :class:`~opsync.schema.Rule`, a comparison of two columns,
  ``jsonb_typeof(c) = 'object'``) are evaluated here with PostgreSQL's semantics (NULL passes, NaN is
  above every number); any other CHECK is evaluated by the replica over the row.

Deliberate divergences, each refused with a message that names it (PostgreSQL would accept these,
but what it stored would not be what the script meant, or readers could not load it):

- relative time words (``now``, ``today``, ``tomorrow``, ``yesterday``): evaluated at drain time, hours later;
- times without a UTC offset: PostgreSQL would read them in its session time zone;
- times outside the years 1 to 9999 in UTC (BC, ``infinity``): psycopg, used by every reader, cannot load them;
- JSON numbers a double cannot hold (beyond ±1.8e308, or non-zero but so small they round to 0):
  the API and every reader read JSON numbers as doubles, so they would arrive as infinity or 0.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from functools import cache
from typing import Any
from uuid import UUID

import msgspec
from psycopg.types.json import Jsonb
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    SmallInteger,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.sqltypes import JSON

from opsync import registry, schema

WS = "[ \t\n\v\f\r]*"  # what C's isspace() skips around a value in PostgreSQL's input functions
INT_TEXT = re.compile(f"{WS}([+-]?[0-9]+){WS}")
FLOAT_TEXT = re.compile(f"{WS}([+-]?(?:[0-9]+\\.?[0-9]*|\\.[0-9]+)(?:[eE][+-]?[0-9]+)?){WS}")
FLOAT_WORD = re.compile(f"{WS}([+-]?)(nan|inf|infinity){WS}", re.IGNORECASE)
FLOAT_OTHER = re.compile(f"{WS}[+-]?(?:0x|nan\\()", re.IGNORECASE)  # glibc strtod's hex and nan(...): PostgreSQL judges
BOOL_TEXT = re.compile(f"{WS}(.*?){WS}", re.DOTALL)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
UUID_TEXT = re.compile(r"(\{)?((?:[0-9a-fA-F]{4}-?){7}[0-9a-fA-F]{4})(?(1)\})")
RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?(?:(Z)|([+-])([0-9]{2}):([0-9]{2}))"
)
RELATIVE_WORDS = frozenset({"now", "today", "tomorrow", "yesterday"})
WORD = re.compile("[a-z]+")
MAX_OFFSET_HOURS = 15  # PostgreSQL's MAX_TZDISP_HOUR
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INT_BITS = ((BigInteger, 64), (SmallInteger, 16), (Integer, 32))


class Refused(ValueError):
    """PostgreSQL would refuse the value, or it is one of the module's documented divergences."""


class JudgeUnavailable(Exception):
    """Only PostgreSQL can judge a value and the local replica does not answer: retry later (503)."""


class Unrepresentable(str):
    """A JSON number a double cannot hold (its text is kept for the message); see :func:`json_float`."""


UNDECIDED = object()  # what a Python judge returns for a spelling only PostgreSQL can judge


def json_float(text: str) -> float | Unrepresentable:
    """``parse_float`` for reading request bodies: 1e400 and 1e-400 are kept apart from infinity and 0."""
    value = float(text)
    if value != 0.0 and value - value == 0.0:
        return value
    if value == 0.0 and not re.search("[1-9]", text.partition("e")[0].partition("E")[0]):
        return value
    return Unrepresentable(text)


def numeric_text(value: int | float) -> str:
    """A JSON number's text as PostgreSQL's ``numeric`` prints it, from the text the drainer's encoder writes."""
    if type(value) is int:
        return str(value)
    number = Decimal(msgspec.json.encode(value).decode())
    text = format(number, "f")
    return text.lstrip("-") if number == 0 else text  # numeric has no negative zero


def scalar_text(value: Any) -> str | None:
    """The text a type's input function gets for a JSON scalar; None for an object or array (PostgreSQL's jsonb text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return numeric_text(value)
    return None


def judge_integer(bits: int) -> Callable[[Any], Any]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    kind = {16: "smallint", 32: "integer", 64: "bigint"}[bits]

    def judge(value: Any) -> Any:
        if type(value) is int:
            number: int | Decimal = value
        elif type(value) is float and value - value == 0.0:
            number = Decimal(msgspec.json.encode(value).decode())
            # numeric prints its fraction digits, which int8in refuses; finite, so the exponent is an int
            if number.as_tuple().exponent < 0:  # type: ignore[operator]
                raise Refused(f"not a valid integer: {kind} refuses {numeric_text(value)}")
            number = int(number)
        elif isinstance(value, str) and (found := INT_TEXT.fullmatch(value)):
            number = int(found[1])
        else:
            raise Refused(f"not a valid integer ({kind}): a JSON integer, or its decimal digits as a string")
        if not low <= number <= high:
            raise Refused(f"out of range for {kind} ({low} to {high})")
        return number

    return judge


def judge_float(value: Any) -> Any:
    """float8in: C strtod's decimals and words, refusing what overflows or underflows to zero."""
    if type(value) is float:
        return value if value != 0.0 else 0.0  # numeric, on the way in, drops the sign of -0.0
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise Refused("out of range for double precision") from None
    if not isinstance(value, str):
        raise Refused("not a valid double precision number")
    if found := FLOAT_TEXT.fullmatch(value):
        number = float(found[1])
        if number - number != 0.0 or (number == 0.0 and re.search("[1-9]", found[1].lower().partition("e")[0])):
            raise Refused(f"{found[1]!r} is out of range for double precision")
        return number
    if found := FLOAT_WORD.fullmatch(value):
        return float(f"{found[1]}{found[2]}")
    if FLOAT_OTHER.match(value):
        return UNDECIDED
    raise Refused("not a valid double precision number")


def judge_bool(value: Any) -> Any:
    """boolin: t/true/y/yes/on/1 and f/false/n/no/off/0, any case, any unambiguous prefix."""
    if isinstance(value, bool):
        return value
    text = scalar_text(value)
    word = BOOL_TEXT.fullmatch(text)[1].lower() if text is not None else ""  # type: ignore[index]  # (.*?) matches any text
    if word and word[0] in "ty" and ("true" if word[0] == "t" else "yes").startswith(word):
        return True
    if word and word[0] in "fn" and ("false" if word[0] == "f" else "no").startswith(word):
        return False
    if len(word) >= 2 and word in ("on", "off", "of"):
        return word == "on"
    if word in ("1", "0"):
        return word == "1"
    raise Refused("not a valid boolean")


def judge_uuid(value: Any) -> Any:
    """uuid_in: 32 hex digits, a hyphen allowed after any group of four, optionally in braces."""
    if isinstance(value, str) and (found := UUID_TEXT.fullmatch(value)):
        hexits = found[2].replace("-", "").lower()
        return f"{hexits[:8]}-{hexits[8:12]}-{hexits[12:16]}-{hexits[16:20]}-{hexits[20:]}"
    raise Refused("not a valid UUID")


def judge_string(length: int | None) -> Callable[[Any], Any]:
    """varchar(n)/text: a length in characters; spaces past the limit are clipped, as varchar_input does."""

    def judge(value: Any) -> Any:
        text = scalar_text(value)
        if text is None:
            return UNDECIDED  # an object or array: its jsonb text, as PostgreSQL prints it
        if length is not None and len(text) > length:
            if text[length:].strip(" "):
                raise Refused(f"at most {length} characters, got {len(text)}")
            return text[:length]
        return text

    return judge


def judge_natural_key(length: int | None) -> Callable[[Any], str]:
    """A client-given text key: a non-empty string that fits its column, stored exactly as sent (never clipped:
    the buffer, the primary and every later step must name the row by the same text)."""

    def judge(value: Any) -> str:
        if not isinstance(value, str):
            raise Refused("a text key: send it as a JSON string")
        if not value:
            raise Refused("a key cannot be empty")
        if "\x00" in value or LONE_SURROGATE.search(value):
            raise Refused("a key cannot hold a NUL or an unpaired surrogate")
        if length is not None and len(value) > length:
            raise Refused(f"at most {length} characters, got {len(value)}")
        return value

    return judge


def row_key(rules: "TableRules", given: Any) -> Any:
    """A row's key as its table's column holds it, or :class:`Refused`: a UUID table's as the request model parsed it
    (a UUID; no work added on its path), a natural key judged as sent (the message names the key column)."""
    if rules.key_judge is None:
        if isinstance(given, UUID):
            return given
        raise Refused("Input should be a valid UUID" if isinstance(given, str) else "UUID input should be a string, bytes or UUID object")
    try:
        return rules.key_judge(str(given) if isinstance(given, UUID) else given)  # text spelt as a UUID, parsed by the request model
    except Refused as exc:
        raise Refused(f"{rules.entry.key.name}: {exc}") from None


def judge_time(value: Any) -> Any:
    """timestamptz from RFC 3339 with an offset; every other spelling is PostgreSQL's to judge."""
    if not isinstance(value, str):
        return UNDECIDED
    found = RFC3339.fullmatch(value)
    if found is None:
        relative(value)
        return UNDECIDED
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = found.groups()
    if zulu:
        offset = timedelta(0)
    else:
        if int(off_h) > MAX_OFFSET_HOURS:
            raise Refused(f"UTC offset {sign}{off_h}:{off_m} beyond ±15:59, which PostgreSQL refuses")
        if int(off_m) > 59:
            return UNDECIDED
        offset = (1 if sign == "+" else -1) * timedelta(hours=int(off_h), minutes=int(off_m))
    if year == "0000" or int(hour) > 23 or int(minute) > 59 or int(second) > 59:
        return UNDECIDED  # year 0, 24:00 and leap seconds: PostgreSQL's own rules
    micros = int((fraction or "0").ljust(6, "0"))
    try:
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros)
    except ValueError:
        raise Refused("date/time field value out of range") from None
    return in_utc(local.replace(tzinfo=timezone(offset)))


def in_utc(when: datetime) -> datetime:
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise Refused(READER_RANGE) from None


READER_RANGE = "out of range: in UTC it must fall within the years 1 to 9999 (psycopg, used by every reader, cannot load other times)"


def relative(text: str) -> None:
    """Refuse relative time words: PostgreSQL would evaluate them when the drainer applies the row, hours later."""
    if words := RELATIVE_WORDS.intersection(WORD.findall(text.lower())):
        raise Refused(f"relative time {sorted(words)[0]!r} is refused: it would be evaluated at the primary, hours later")


def judge_json(value: Any) -> Any:
    """jsonb keeps numbers as ``numeric``: readers get an integer back for 1e16, and 0.0 for -0.0."""
    if type(value) is float:
        text = numeric_text(value)
        return float(text) if "." in text else int(text)
    if isinstance(value, dict):
        return {k: judge_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [judge_json(v) for v in value]
    return value


def judge_by_postgres(value: Any) -> Any:
    return UNDECIDED


def judge_for(column: Column) -> Callable[[Any], Any]:
    """The Python judge of a column's SQL type; one that knows no rule leaves every value to PostgreSQL."""
    sql_type = column.type
    if isinstance(sql_type, JSON):
        return judge_json
    if isinstance(sql_type, Uuid):
        return judge_uuid
    if isinstance(sql_type, Boolean):
        return judge_bool
    for integer, bits in INT_BITS:
        if isinstance(sql_type, integer):
            return judge_integer(bits)
    if isinstance(sql_type, Float):
        return judge_float
    if isinstance(sql_type, DateTime):
        return judge_time if sql_type.timezone else judge_by_postgres
    if isinstance(sql_type, String):
        return judge_string(sql_type.length)
    return judge_by_postgres


# --- CHECK constraints ------------------------------------------------------------------------------

COMPARISON = re.compile(r"^(\w+) (>=|>|<=|<) (\w+)$")
JSON_OBJECT = re.compile(r"^jsonb_typeof\((\w+)\) = 'object'$")


def ordered(value: Any) -> Any:
    """A sort key with PostgreSQL's float order: NaN equals NaN and is above every other number."""
    if type(value) is float:
        return (1, 0.0) if value != value else (0, value)
    return value if isinstance(value, datetime | str) else (0, value)


COMPARE = {
    ">=": lambda a, b: ordered(a) >= ordered(b),
    ">": lambda a, b: ordered(a) > ordered(b),
    "<=": lambda a, b: ordered(a) <= ordered(b),
    "<": lambda a, b: ordered(a) < ordered(b),
}


@dataclass(frozen=True)
class Check:
    """One CHECK of a table: evaluated in Python when its form is known, otherwise by the replica."""

    name: str
    sql: str
    columns: tuple[str, ...]
    test: Callable[[dict], bool] | None  # None: PostgreSQL evaluates ``sql``

    def message(self) -> str:
        return f"breaks rule {self.name} ({self.sql})"


def rule_test(column: str, rule: schema.Rule) -> Callable[[dict], bool]:
    pattern = re.compile(rule.pattern[:-1] + r"\Z" if rule.pattern and rule.pattern.endswith("$") else rule.pattern or "")

    def test(row: dict) -> bool:
        value = row[column]
        if value is None:
            return True
        key = ordered(value)
        return (
            (rule.ge is None or key >= ordered(rule.ge))
            and (rule.le is None or key <= ordered(rule.le))
            and (rule.lt is None or key < ordered(rule.lt))
            and (rule.pattern is None or bool(pattern.match(value)))
            and (not rule.choices or value in rule.choices)
        )

    return test


def comparison_test(left: str, op: str, right: str) -> Callable[[dict], bool]:
    return lambda row: row[left] is None or row[right] is None or COMPARE[op](row[left], row[right])


def object_test(column: str) -> Callable[[dict], bool]:
    return lambda row: row[column] is None or isinstance(row[column], dict)


def checks_of(entry: registry.Ingestible) -> tuple[Check, ...]:
    table, found = entry.table, []
    rules = {str(rule.check(c.key).sqltext): (c.key, rule) for c in table.columns if (rule := c.info.get("rule"))}
    for constraint in table.constraints:
        if not isinstance(constraint, CheckConstraint):
            continue
        sql, name = str(constraint.sqltext), str(constraint.name)
        if sql in rules:
            found.append(Check(name, sql, (rules[sql][0],), rule_test(*rules[sql])))
        elif (match := COMPARISON.match(sql)) and match[1] in table.c and match[3] in table.c:
            found.append(Check(name, sql, (match[1], match[3]), comparison_test(*match.groups())))
        elif (match := JSON_OBJECT.match(sql)) and match[1] in table.c:
            found.append(Check(name, sql, (match[1],), object_test(match[1])))
        else:
            found.append(Check(name, sql, tuple(c.key for c in table.columns if re.search(rf"\b{c.name}\b", sql)), None))
    return tuple(found)


# --- a table's rules, derived once from the schema -------------------------------------------------


@dataclass(frozen=True)
class TableRules:
    """What admission needs of one ingestible table: per-column judges, constraints and references."""

    entry: registry.Ingestible
    judges: dict[str, Callable[[Any], Any]]  # input columns but the key
    key_judge: Callable[[Any], str] | None  # a natural key's; None for UUID keys (typed by the request model)
    not_null: frozenset[str]
    required: tuple[str, ...]  # NOT NULL without a default: an insert must give them
    checks: tuple[Check, ...]
    uniques: tuple[tuple[str, ...], ...]  # besides the key
    foreign: dict[str, str]  # column -> referenced table
    defaults: dict[str, Any]  # literal server defaults, as the primary stores them


@cache
def rules_of(table: str) -> TableRules:
    entry = registry.get_table(table)
    columns = [c for c in registry.input_columns(entry.table) if not c.primary_key]
    judges = {c.key: judge_for(c) for c in columns}
    defaults = {k: judges[k](v) for k, v in entry.insert_defaults.items()}
    return TableRules(
        entry=entry,
        judges=judges,
        key_judge=None if entry.uuid_key else judge_natural_key(entry.key.type.length),  # type: ignore[attr-defined]  # a String
        not_null=frozenset(c.key for c in columns if not c.nullable),
        required=tuple(c.key for c in columns if not c.nullable and not registry.has_default(c)),
        checks=checks_of(entry),
        uniques=tuple(
            tuple(c.key for c in constraint.columns) for constraint in entry.table.constraints if isinstance(constraint, UniqueConstraint)
        ),
        foreign={c.key: fk.column.table.name for c in columns for fk in c.foreign_keys},
        defaults=defaults,
    )


# --- PostgreSQL on the local replica ---------------------------------------------------------------

OTHER_ZONE = "<+14>-14"  # a second session time zone, far from UTC: a time that moves with it has no offset of its own


class ReplicaJudge:
    """The casts and CHECKs the drainer's statement makes, run read-only on the local replica."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def canonical(self, table: str, column: str, value: Any) -> Any:
        """What the primary stores for ``value`` in ``table.column``; :class:`Refused` if it would refuse it.

        PostgreSQL's output is a canonical form the Python judge reads exactly; a time is read as its
        epoch under two session time zones, which differ when the text gave no offset of its own.
        """
        sql_column = registry.get_table(table).table.c[column]
        timestamp = isinstance(sql_column.type, DateTime)
        shown = f'extract(epoch FROM r."{column}")::text' if timestamp else f'r."{column}"::text'
        query = f'SELECT {shown} FROM jsonb_populate_record(NULL::"{table}", %s::jsonb) AS r'
        texts = self.run(query, Jsonb({column: value}, dumps=encode), ("UTC", OTHER_ZONE) if timestamp else ("UTC",))
        if texts[0] is None:
            return None
        return from_epoch(texts) if timestamp else judge_for(sql_column)(texts[0])

    def holds(self, table: str, check: Check, row: dict) -> bool:
        """Whether ``check`` passes over ``row`` (JSON values as sent), NULL counting as passed."""
        query = f'SELECT ({check.sql}) IS NOT FALSE FROM jsonb_populate_record(NULL::"{table}", %s::jsonb) AS "{table}"'
        return self.run(query, Jsonb(row, dumps=encode), ("UTC",))[0] is True

    def run(self, query: str, parameter: Any, zones: tuple[str, ...]) -> list:
        try:
            with self.engine.connect() as conn:
                results = []
                for zone in zones:
                    conn.exec_driver_sql("SELECT set_config('TimeZone', %s, true)", (zone,))
                    results.append(conn.exec_driver_sql(query, (parameter,)).scalar_one())
                conn.rollback()
                return results
        except DBAPIError as exc:
            state = getattr(exc.orig, "sqlstate", None) or ""
            if state.startswith("22"):
                raise Refused(exc.orig.diag.message_primary) from None  # type: ignore[union-attr]  # psycopg's, as its sqlstate says
            raise JudgeUnavailable(f"the local replica, which judges this value, is unavailable ({state or 'no answer'})") from None


def from_epoch(texts: list[str]) -> datetime:
    if len(set(texts)) > 1:
        raise Refused("a time needs a UTC offset (Z or ±HH:MM): without one it is ambiguous")
    if texts[0] in ("Infinity", "-Infinity"):
        raise Refused(READER_RANGE)
    micros = int(Decimal(texts[0]) * 1_000_000)
    try:
        return EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise Refused(READER_RANGE) from None


def encode(value: Any) -> str:
    """JSON as the drainer sends it (its encoder, its text): the replica must judge the same bytes."""
    return msgspec.json.encode(value).decode()


def unique_key(value: Any) -> Any:
    """Equality as a unique index sees it: NaN equals NaN."""
    return "NaN" if type(value) is float and value != value else value
