"""The replica sensor: waits in the triggerer, not in a worker slot, until a run's commits are readable at the site."""

from datetime import timedelta

from airflow.sdk import BaseSensorOperator

from opsync.lsn import Lsn, ReplicaError
from opsync_airflow.hooks import PRIMARY_CONN_ID, REPLICA_CONN_ID
from opsync_airflow.operators import readable_position
from opsync_airflow.triggers import ReplicaLsnTrigger


class ReplicaLsnSensor(BaseSensorOperator):
    """Succeeds once the replica has replayed ``target_lsn`` (the drain's XCom); at once when there is none.

    Checks once, then defers to :class:`~opsync_airflow.triggers.ReplicaLsnTrigger` until
    ``timeout``. On the main site what is committed is readable there at once.
    """

    template_fields = ("target_lsn",)
    ui_color = "#fff3d6"

    def __init__(
        self,
        *,
        target_lsn: str | None,
        replica_conn_id: str = REPLICA_CONN_ID,
        primary_conn_id: str = PRIMARY_CONN_ID,
        poke_interval: float = 2,
        timeout: float = 300,
        **kwargs,
    ) -> None:
        super().__init__(poke_interval=poke_interval, timeout=timeout, **kwargs)
        self.target_lsn = target_lsn
        self.replica_conn_id = replica_conn_id
        self.primary_conn_id = primary_conn_id

    def execute(self, context) -> None:
        if not self.target_lsn:
            self.log.info("nothing committed by this run: no replica position to wait for")
            return
        if self.poke(context):
            self.log.info("%s is readable at this site already", self.target_lsn)
            return
        self.defer(
            trigger=ReplicaLsnTrigger(self.target_lsn, self.replica_conn_id, self.poke_interval),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def poke(self, context) -> bool:
        try:
            position = readable_position(self.primary_conn_id, self.replica_conn_id)
        except ReplicaError as exc:
            self.log.warning("%s; waiting for the replica to replay %s", exc, self.target_lsn)
            return False
        return position >= Lsn.parse(self.target_lsn)

    def execute_complete(self, context, event: dict) -> None:
        self.log.info("replica replayed %s (at %s)", event["target_lsn"], event["replay_lsn"])
