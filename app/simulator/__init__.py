"""A standalone fake of hiapi's ``happyhorse-1.1/image-to-video`` task API, for tests and demos.

It answers like hiapi (same bodies, same validation messages via ``app.hiapi.schemas``), renders
real H.264 MP4s of hiapi's size (720p: 720 px high, 1080p: 1080 px, width from the image's
aspect ratio, ``duration`` seconds; the ``render_scale`` knob shrinks them for tests), and
injects faults on demand (5xx, ambiguous create timeouts, failed tasks, dropped or duplicated
callbacks, expiring URLs, slow downloads, broken clips). It imports nothing from videorelay
except ``app.hiapi.schemas``.

Broken clips, to test a service's checks of the file: ``PATCH /_sim/config`` with
``{"broken_clip": "truncated"}`` (or ``no_moov``, ``moov_at_end``, ``wrong_duration``,
``no_video_stream``; in-process ``config.broken_clip = ...``, e.g. the tests' ``sim.set``)
makes every task created from then on succeed with that kind of MP4; ``null`` turns it off.
``app.simulator.broken`` says what each kind is.

Run it alone with ``uvicorn app.simulator:create_simulator_app --factory --port 9100``.
"""

from app.simulator.app import create_simulator_app
from app.simulator.config import SimulatorConfig
from app.simulator.render import render_mp4

__all__ = ["SimulatorConfig", "create_simulator_app", "render_mp4"]
