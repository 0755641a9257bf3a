"""A standalone fake of hiapi's ``happyhorse-1.1/image-to-video`` task API, for tests and demos.

It answers like hiapi (same bodies, same validation messages via ``app.hiapi.schemas``), renders
small real H.264 MP4s, and injects faults on demand (5xx, ambiguous create timeouts, failed
tasks, dropped or duplicated callbacks, expiring URLs, slow downloads). It imports nothing
from videorelay except ``app.hiapi.schemas``.

Run it alone with ``uvicorn app.simulator:create_simulator_app --factory --port 9100``.
"""

from app.simulator.app import create_simulator_app
from app.simulator.config import SimulatorConfig
from app.simulator.render import render_mp4

__all__ = ["SimulatorConfig", "create_simulator_app", "render_mp4"]
