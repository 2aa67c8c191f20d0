"""``eventray bench --ingress``: which HTTP ingress a live decision path can stand on.

Both candidates run the same trivial handler on an embedded Ray: parse one JSON event,
forward it to one of two keyed actors by its customer (``data.CUSTOMER_ID``), answer with
the actor's reply. The load generator (:func:`cluster.produce.open_loop`) offers single-event
``POST /score`` requests open loop at each rate; every figure is client-side.

- **Ray Serve**: a deployment behind Serve's HTTP proxy (needs ``pip install
  "ray[serve]"``; the bench says so and skips it when Serve is not installed).
- **aiohttp in one Ray actor**: what ``eventray serve`` runs (:mod:`cluster.ingress`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from cluster.bench.servers import free_port
from cluster.produce import run_open_loop, simulated_events

#: Requests of the warm-up before each ingress's measured rates.
WARMUP_REQUESTS, WARMUP_RATE = 200, 50.0


def _keyed_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class KeyedActor:
        """One of the keyed actors behind the ingress: counts its key's events."""

        def __init__(self) -> None:
            self.seen: dict[int, int] = {}

        def handle(self, key: int, event_id: str) -> dict[str, Any]:
            self.seen[key] = self.seen.get(key, 0) + 1
            return {"event_id": event_id, "key": key, "count": self.seen[key]}

    return KeyedActor


def _aiohttp_ingress_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class AiohttpIngress:
        """aiohttp on the actor's own event loop, forwarding to the keyed actors."""

        def __init__(self, actors: list[Any]) -> None:
            self.actors = actors
            self.runner: Any = None

        async def start(self, port: int) -> None:
            from aiohttp import web

            async def score(request: web.Request) -> web.Response:
                event = json.loads(await request.read())
                key = int(event["data"]["CUSTOMER_ID"])
                reply = await self.actors[key % len(self.actors)].handle.remote(key, event["eventId"])
                return web.json_response(reply)

            app = web.Application()
            app.add_routes([web.post("/score", score)])
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", port).start()

        async def stop(self) -> None:
            await self.runner.cleanup()

    return AiohttpIngress


def _serve_app(actors: list[Any]) -> Any:
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(max_ongoing_requests=10_000)
    class ServeIngress:
        """The same handler as a Serve deployment."""

        def __init__(self, actors: list[Any]) -> None:
            self.actors = actors

        async def __call__(self, request: Request) -> dict[str, Any]:
            event = json.loads(await request.body())
            key = int(event["data"]["CUSTOMER_ID"])
            return await self.actors[key % len(self.actors)].handle.remote(key, event["eventId"])

    return ServeIngress.bind(actors)


def _offer(url: str, rates: tuple[float, ...], seconds: float,
           log: Callable[[str], None], name: str) -> list[dict[str, Any]]:
    """The warm-up, then each rate for ``seconds``: the client-side figures per rate."""
    warm = [json.dumps(e).encode() for e in simulated_events(WARMUP_REQUESTS, seed=31)]
    run_open_loop(url, warm, WARMUP_RATE, "-")
    steps, offset = [], 0
    events = simulated_events(int(sum(rates) * seconds), seed=32)
    for rate in rates:
        count = int(rate * seconds)
        bodies = [json.dumps(e).encode() for e in events[offset:offset + count]]
        offset += count
        log(f"{name}: {rate:g} requests/s for {seconds:g} s")
        load = os.getloadavg()[0]
        steps.append({**run_open_loop(url, bodies, rate, "-"),
                      "load_average": round(load, 1)})
    return steps


def bench_ingress(rates: tuple[float, ...], seconds: float,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Both ingresses at each rate, on an embedded Ray of 2 CPUs."""
    from cluster.ray_runtime import prepare_environment, ray_session

    prepare_environment(None)  # before ray is imported
    import ray

    result: dict[str, Any] = {}
    with ray_session(num_cpus=2):
        actors = [_keyed_actor_class().remote() for _ in range(2)]
        ray.get([a.handle.remote(0, "warm") for a in actors])
        try:
            from ray import serve
        except ImportError as missing:
            result["ray_serve"] = {"skipped": f"Ray Serve is not installed ({missing}): "
                                              "pip install \"ray[serve]\""}
        else:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(_serve_app(actors), route_prefix="/score")
            try:
                result["ray_serve"] = _offer(f"http://127.0.0.1:{port}/score", rates, seconds,
                                             log, "ray serve")
            finally:
                serve.shutdown()
        ingress = _aiohttp_ingress_class().remote(actors)
        port = free_port()
        ray.get(ingress.start.remote(port))
        try:
            result["aiohttp_actor"] = _offer(f"http://127.0.0.1:{port}/score", rates, seconds,
                                             log, "aiohttp actor")
        finally:
            ray.get(ingress.stop.remote())
    return result
