"""Registers the "Sync status" page with Airflow: its FastAPI app on the API server, its entry in the navigation.

Registered through the package's ``airflow.plugins`` entry point, so every Airflow that has opsync installed
loads it, with no plugins folder configured.
"""

from airflow.plugins_manager import AirflowPlugin

from opsync_airflow.ui.app import app

URL_PREFIX = "/opsync"


class OpsyncSyncStatusPlugin(AirflowPlugin):
    name = "opsync_sync_status"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Sync status"}]
    external_views = [
        {
            "name": "Sync status",
            "href": f"{URL_PREFIX}/",
            "icon": f"{URL_PREFIX}/static/icon.svg",
            "destination": "nav",
            "url_route": "sync-status",  # shown inside Airflow's UI at /plugin/sync-status
            "nav_top_level": True,
        }
    ]
