"""The metadata Datasette serves: a domain's file merged with the engine's (``opsync.read_model.metadata``)."""

from pathlib import Path

import yaml

from opsync.read_model import metadata as served_metadata
from opsync.read_model.store import DRAIN_RATE, FINDINGS, METRICS, POISON, STATE, SYNC_COLUMNS

REPO = Path(__file__).resolve().parents[2]
ENGINE = yaml.safe_load(served_metadata.ENGINE.read_text())
ENGINE_PLUGINS = ("opsync-access", "opsync-sql-limits", "datasette-auth-github", "datasette-auth-tokens")


def served(tmp_path: Path, domain: dict) -> dict:
    path = tmp_path / "domain.yml"
    path.write_text(yaml.safe_dump(domain))
    return served_metadata.merged(path)


def test_a_domain_without_plugins_or_allow_blocks_gets_the_engines(tmp_path):
    merged = served(tmp_path, {"title": "Mine", "databases": {"opsync": {"tables": {"thing": {"title": "Things"}}}}})
    database = merged["databases"]["opsync"]
    assert merged["title"] == "Mine" and database["tables"]["thing"] == {"title": "Things", "columns": served_metadata.SYNC_COLUMNS}
    assert database["allow"] == {"role": ["member", "script", "local"]} and database["allow_sql"] == {"role": ["member", "local"]}
    assert {name: merged["plugins"][name] for name in ENGINE_PLUGINS} == {name: ENGINE["plugins"][name] for name in ENGINE_PLUGINS}
    assert merged["plugins"]["datasette-dashboards"]["sync"] == ENGINE["plugins"]["datasette-dashboards"]["sync"]
    assert {METRICS, DRAIN_RATE, FINDINGS, POISON, STATE} <= set(database["tables"])


def test_the_engine_wins_on_its_keys_and_the_domain_adds_its_own(tmp_path, caplog):
    merged = served(
        tmp_path,
        {
            "databases": {"opsync": {"allow": {"id": "*"}, "tables": {METRICS: {"title": "mine"}}, "queries": {"q": "select 1"}}},
            "plugins": {
                "opsync-access": {"public": True},
                "opsync-sql-limits": {"sql_slots": 50},
                "datasette-cluster-map": {"latitude_column": "lat"},
                "datasette-dashboards": {"mine": {"title": "Mine"}, "sync": {"title": "not the engine's"}},
            },
        },
    )
    database = merged["databases"]["opsync"]
    assert database["allow"] == ENGINE["databases"]["opsync"]["allow"]  # whole: a domain's allow merged in would widen it
    assert database["tables"][METRICS] == ENGINE["databases"]["opsync"]["tables"][METRICS] and database["queries"] == {"q": "select 1"}
    plugins = merged["plugins"]
    assert plugins["opsync-access"] == ENGINE["plugins"]["opsync-access"] and plugins["opsync-sql-limits"] == {
        "sql_slots": 2,
        "sql_wait_s": 5,
    }
    assert plugins["datasette-cluster-map"] == {"latitude_column": "lat"}
    assert plugins["datasette-dashboards"]["mine"] == {"title": "Mine"}
    assert plugins["datasette-dashboards"]["sync"] == ENGINE["plugins"]["datasette-dashboards"]["sync"]
    warned = " ".join(record.getMessage() for record in caplog.records)
    for key in (
        "databases.opsync.allow",
        f"databases.opsync.tables.{METRICS}",
        "plugins.opsync-access",
        "plugins.datasette-dashboards.sync",
    ):
        assert key in warned, key


def test_the_domains_files_leave_the_engines_part_to_the_engine():
    for path in (REPO / "opsync_observatory/datasette.yml", REPO / "tests/domains/transfer/datasette.yml"):
        domain = yaml.safe_load(path.read_text())
        assert not set(domain.get("plugins") or {}) & set(ENGINE_PLUGINS), path
        assert "sync" not in (domain.get("plugins") or {}).get("datasette-dashboards", {}), path
        database = domain["databases"]["opsync"]
        assert not {"allow", "allow_sql"} & set(database) and not set(database["tables"]) & {
            METRICS,
            DRAIN_RATE,
            FINDINGS,
            POISON,
            STATE,
        }, path


def test_the_read_models_columns_are_described_for_every_domain_table_in_the_domains_words_if_it_has_them(tmp_path):
    assert tuple(served_metadata.SYNC_COLUMNS) == SYNC_COLUMNS
    own = {"_txn_id": "Our words", "label": "A label"}
    tables = served(tmp_path, {"databases": {"opsync": {"tables": {"thing": {"columns": own}}}}})["databases"]["opsync"]["tables"]
    assert tables["thing"]["columns"] == served_metadata.SYNC_COLUMNS | own
    assert "_sync_state" not in tables[METRICS]["columns"]  # the engine's own tables have no such columns


def test_merging_a_merged_file_again_changes_nothing_and_warns_nothing(tmp_path, caplog):
    """``datasette_command`` merges whatever file it gets, a file the compose command already merged too."""
    once = served_metadata.write(tmp_path / "once.json", REPO / "tests/domains/transfer/datasette.yml")
    assert served_metadata.merged(once) == yaml.safe_load(once.read_text()) and not caplog.records
