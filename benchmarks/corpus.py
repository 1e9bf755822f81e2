"""Scenarios 2 and 3: one real recording of N distinct HTTP calls, written in every format.

``build``: records N distinct GETs against the upstream with ``timetracer_otel.record()``, then
writes the same interactions as our msgpack and JSON cassettes (sizes 10…N, prefixes of the
one recording), as VCR.py YAML (through VCR.py's own serializer) and as upstream timetracer
JSON and gzip (through its own event builder and writer), when those tools are installed.
``lookup-ours`` / ``lookup-vcr``: per-request replay time at each size.
``load``: file size and load time of the largest cassette in each format.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import UPSTREAM_TT, VCR, have, worker_main


def build(args: dict[str, Any]) -> dict[str, Any]:
    import msgspec

    import timetracer_otel
    from timetracer_otel.cassette import Cassette, load_cassette, save_cassette

    out = Path(args["dir"])
    sizes: list[int] = args["sizes"]
    n = max(sizes)
    pairs: list[tuple[httpx.Request, httpx.Response]] = []
    t0 = time.perf_counter()
    with timetracer_otel.record(dir=out / "raw", libraries=["httpx"]) as rec, \
            httpx.Client(base_url=args["upstream"]) as client:
        for i in range(n):
            r = client.get("/items", params={"i": i})
            r.read()
            pairs.append((r.request, r))
    record_s = time.perf_counter() - t0
    recorded = load_cassette(rec.paths[0])
    spans = recorded.interactions
    assert len(spans) == n, f"recorded {len(spans)} of {n} calls"
    files: dict[str, dict[int, str]] = {"ours_msgpack": {}, "ours_json": {}}
    for size in sizes:
        c = msgspec.structs.replace(recorded, spans=spans[:size], checksum=None)
        for fmt in ("msgpack", "json"):
            p = out / f"ours_{size}.{fmt}"
            save_cassette(c, p, fmt)  # type: ignore[arg-type]
            files[f"ours_{fmt}"][size] = str(p)
    assert isinstance(recorded, Cassette)

    if have(VCR):
        from vcr.cassette import Cassette as VcrCassette
        from vcr.stubs.httpx_stubs import _make_vcr_request, _serialize_response

        files["vcr_yaml"] = {}
        for size in sizes:
            p = out / f"vcr_{size}.yaml"
            vc = VcrCassette(str(p), record_mode="all")  # default serializer: YAML
            for req, resp in pairs[:size]:
                vc.append(_make_vcr_request(req, req.content), _serialize_response(resp, resp.content))
            vc._save(force=True)
            files["vcr_yaml"][size] = str(p)

    if have(UPSTREAM_TT):
        from timetracer.cassette import write_cassette
        from timetracer.config import TraceConfig
        from timetracer.plugins.httpx_plugin import _build_event
        from timetracer.session import TraceSession

        files["upstream_json"] = {}
        files["upstream_gzip"] = {}
        for size in sizes:
            for key, comp in (("upstream_json", "none"), ("upstream_gzip", "gzip")):
                cfg = TraceConfig(mode="record", cassette_dir=str(out / f"{key}_{size}"),
                                  compression=comp)
                session = TraceSession(config=cfg)
                for req, resp in pairs[:size]:
                    session.add_event(_build_event(req, resp, 0.0, 1.0, None))
                files[key][size] = write_cassette(session, cfg)
    return {"files": {k: {str(s): p for s, p in v.items()} for k, v in files.items()},
            "record_seconds": record_s}


def _sample(n: int, k: int) -> list[int]:
    return random.Random(n).sample(range(n), min(n, k))


def lookup_ours(args: dict[str, Any]) -> dict[str, Any]:
    import timetracer_otel
    from timetracer_otel import replay_shims
    from timetracer_otel.cassette import load_cassette

    replay_shims.install(["httpx"])  # no OTel instrumentation: the lookup alone
    client = httpx.Client()
    k: int = args["k"]
    loaded = {s: load_cassette(p) for s, p in args["files"].items()}
    urls = {s: [c.interactions[i].request["url"] for i in _sample(int(s), k)]
            for s, c in loaded.items()}
    result: dict[str, list[float]] = {s: [] for s in loaded}
    # Sizes interleaved within each run, the same number of calls at every size (a small
    # cassette is replayed in several passes, each from a fresh index): drift hits all alike.
    for r in range(args["runs"] + 1):
        for s, cassette in loaded.items():
            spent, done = 0.0, 0
            while done < k:
                with timetracer_otel.replay(cassette, libraries=[]) as rep:
                    t0 = time.perf_counter()
                    for u in urls[s]:
                        client.get(u)
                    spent += time.perf_counter() - t0
                done += len(urls[s])
                assert rep.report.exact == len(urls[s]), rep.report.summary()
            if r:
                result[s].append(spent * 1e6 / done)
    return {"per_request_us": result}


def lookup_vcr(args: dict[str, Any]) -> dict[str, Any]:
    import vcr
    from vcr.persisters.filesystem import FilesystemPersister
    from vcr.serializers import yamlserializer

    my_vcr = vcr.VCR()
    client = httpx.Client()
    result: dict[str, list[float]] = {}
    for size_s, path in args["files"].items():
        size = int(size_s)
        reqs, _ = FilesystemPersister.load_cassette(path, yamlserializer)
        # VCR.py scans every interaction per request; keep its sample bounded at large sizes.
        k = max(5, min(args["k"], 20_000 // size))
        urls = [reqs[i].uri for i in _sample(size, k)]
        per: list[float] = []
        for _ in range(args["runs"]):
            with my_vcr.use_cassette(path, record_mode="none"):
                t0 = time.perf_counter()
                for u in urls:
                    client.get(u)
                per.append((time.perf_counter() - t0) * 1e6 / len(urls))
        result[size_s] = per
    return {"per_request_us": result}


def load(args: dict[str, Any]) -> dict[str, Any]:
    files: dict[str, str] = args["files"]  # format -> path of the largest cassette
    loaders: dict[str, Any] = {}
    from timetracer_otel.cassette import load_cassette
    from timetracer_otel.index import ReplayIndex

    loaders["ours_msgpack"] = load_cassette
    loaders["ours_json"] = load_cassette
    loaders["ours_msgpack_index"] = lambda p: ReplayIndex.from_paths([p])
    if "vcr_yaml" in files:
        from vcr.persisters.filesystem import FilesystemPersister
        from vcr.serializers import yamlserializer

        loaders["vcr_yaml"] = lambda p: FilesystemPersister.load_cassette(p, yamlserializer)
    if "upstream_json" in files:
        from timetracer.cassette import read_cassette

        loaders["upstream_json"] = read_cassette
        loaders["upstream_gzip"] = read_cassette
    files = dict(files, ours_msgpack_index=files["ours_msgpack"])
    out: dict[str, Any] = {}
    for name, fn in loaders.items():
        path = files[name]
        fn(path)
        times = []
        for _ in range(args["runs"]):
            t0 = time.perf_counter()
            fn(path)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = {"load_ms": times, "bytes": Path(path).stat().st_size}
    return out


def run(args: dict[str, Any]) -> dict[str, Any]:
    modes = {"build": build, "lookup-ours": lookup_ours, "lookup-vcr": lookup_vcr, "load": load}
    return modes[args["mode"]](args)  # type: ignore[no-any-return]


if __name__ == "__main__":
    worker_main(run)


_ = tempfile  # the parent passes a temporary directory in args["dir"]
