"""The status page, JSON API, /metrics and health endpoints (DESIGN.md section 10)."""

from baragg.web.server import Liveness, StatusServer, readiness, start_for_worker, worker_probe

__all__ = ["Liveness", "StatusServer", "readiness", "start_for_worker", "worker_probe"]
