"""Settings parsing (``opsync.config``): the environment over a ``.env`` file over the defaults, bounds refused
naming the setting, secrets never shown."""

import os

import pytest
from pydantic import ValidationError

from opsync.config import Settings, SiteType, get_settings


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No ``OPSYNC_*`` variable and no ``.env`` (the working directory is empty): only what the test sets."""
    for variable in [v for v in os.environ if v.startswith("OPSYNC_")]:
        monkeypatch.delenv(variable)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_environment_wins_over_the_env_file_which_wins_over_the_defaults(clean, monkeypatch):
    assert Settings().site_type is SiteType.secondary and Settings().high_water_entries == 3_628_800
    (clean / ".env").write_text("OPSYNC_SITE=cologne\nOPSYNC_SITE_TYPE=main\nOPSYNC_RETRY_AFTER_S=12\n")
    from_file = Settings()
    assert (from_file.site, from_file.site_type, from_file.retry_after_s) == ("cologne", SiteType.main, 12)
    monkeypatch.setenv("OPSYNC_RETRY_AFTER_S", "45")
    monkeypatch.setenv("OPSYNC_READ_MODEL_PATH", "/srv/read/opsync.db")
    from_env = Settings()
    assert (from_env.site, from_env.retry_after_s, str(from_env.read_model_path)) == ("cologne", 45, "/srv/read/opsync.db")


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("OPSYNC_SITE_TYPE", "tertiary", "site_type"),
        ("OPSYNC_HIGH_WATER_MEMORY_FRACTION", "0", "high_water_memory_fraction"),
        ("OPSYNC_HIGH_WATER_MEMORY_FRACTION", "1.5", "high_water_memory_fraction"),
        ("OPSYNC_CAPACITY_WINDOW_S", "-1", "capacity_window_s"),
        ("OPSYNC_MAX_BODY_BYTES", "lots", "max_body_bytes"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(clean, monkeypatch, variable, value, field):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_urls_are_secrets_that_no_repr_shows(clean, monkeypatch):
    monkeypatch.setenv("OPSYNC_PRIMARY_URL", "postgresql+psycopg://opsync:hunter2@cologne/opsync")
    settings = Settings()
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.primary_url.get_secret_value() == "postgresql+psycopg://opsync:hunter2@cologne/opsync"


def test_settings_are_read_once_per_process_until_the_cache_is_cleared(clean, monkeypatch):
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("OPSYNC_SITE", "first")
        assert get_settings().site == "first"
        monkeypatch.setenv("OPSYNC_SITE", "second")
        assert get_settings().site == "first"
        get_settings.cache_clear()
        assert get_settings().site == "second"
    finally:
        get_settings.cache_clear()
