"""Records the tests send in the observatory's tables: a raw data file's values, and an observation with a
file of it in one transaction (the file names the observation by ``$ref``, as a script does)."""

import uuid

CHECKSUM = "ab" * 32


def raw_file(observation_id, **overrides) -> dict:
    """A valid raw_data_file of ``observation_id`` (an id, or a ``$ref``): a new path each call."""
    return {
        "executed_obs_unit_id": observation_id,
        "path": f"/data/{uuid.uuid4()}.fits",
        "size_bytes": 10,
        "checksum_sha256": CHECKSUM,
        "file_type": "fits",
    } | overrides


def observation_with_file(observation: dict) -> list[dict]:
    """The steps of one transaction: a new executed observation (``observation``, its values) and a raw data file of it."""
    return [
        {"table": "executed_obs_unit", "ref": "obs", "values": observation},
        {"table": "raw_data_file", "values": raw_file({"$ref": "obs"})},
    ]
