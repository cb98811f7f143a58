"""Image builds: cold build time, size, rebuild with nothing changed, rebuild after a source-only change.

    python benchmarks/images.py [--cold] [--images gguf,merge,train] [--base kiln-base:bookworm]
        [--torch-index-url ''] [--ca-bundle /etc/ssl/certs/ca-certificates.crt] [--client /usr/bin/docker]

Each image is built with the project's own `build_image` (what `invoke build` runs), one after the
other. `--cold` first empties BuildKit's cache (`docker builder prune -af`: layers, the pip cache
mount, the llama.cpp build cache), so the first build downloads and compiles everything; the base
image is not rebuilt. The source-only change is a new module under stages/ (removed afterwards, and
the image rebuilt once more so it matches the tree). Sizes are `docker image inspect`'s Size.
Writes benchmarks/results/images-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import stamp, write_result  # noqa: E402

from stages.common import docker_build as b  # noqa: E402
from stages.common import docker_runtime as d  # noqa: E402

PROBE = ROOT / "stages" / "_benchmark_probe.py"


def timed_build(image: str, opts: dict) -> float:
    start = time.monotonic()
    b.build_image(image, **opts)
    return round(time.monotonic() - start, 1)


def engine_version() -> str:
    return d.connect().version()["Version"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=",".join(d.IMAGES), help="comma-separated, in build order")
    p.add_argument("--cold", action="store_true", help="prune BuildKit's cache first")
    p.add_argument("--base", default=None, help="BASE_IMAGE build arg (default: the Dockerfiles' own)")
    p.add_argument("--torch-index-url", default=None, help="TORCH_INDEX_URL build arg ('' = PyPI + cache/wheels)")
    p.add_argument("--ca-bundle", type=Path, default=None, help="extra CA bundle, as a BuildKit secret")
    p.add_argument("--client", default="docker", help="docker CLI that builds (docs/containers.md)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    opts = {"base": args.base, "torch_index_url": args.torch_index_url, "ca_bundle": args.ca_bundle}
    opts["client"] = args.client
    if args.cold:
        d.connect().api.prune_builds(all=True)
    results = {}
    for image in args.images.split(","):
        r = results[image] = {"load_average_before": round(os.getloadavg()[0], 1)}
        r["cold" if args.cold else "first"] = timed_build(image, opts)
        r["no_change"] = timed_build(image, opts)
        PROBE.write_text('"""Written and removed by benchmarks/images.py."""\n')
        try:
            r["source_change"] = timed_build(image, opts)
        finally:
            PROBE.unlink()
        timed_build(image, opts)
        meta = d.image_meta(d.IMAGES[image])
        r |= {"size_bytes": meta["Size"], "size_gb": round(meta["Size"] / 1e9, 2), "image_id": meta["Id"]}
        print(f"{image}: {r}", flush=True)
    measured_at = stamp()
    report = {
        "images": results,
        "seconds": "wall-clock seconds of `docker build` (BuildKit) through docker_build.build_image",
        "base": args.base or "Dockerfile default",
        "torch_index_url": args.torch_index_url,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release()},
        "note": "the host's 2 cores are shared with other work; load_average_before shows how busy they were",
        "docker_client": args.client,
        "engine": engine_version(),
        "command": "python benchmarks/images.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "measured_at": measured_at,
    }
    print(write_result(args.out, "images", report, measured_at))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
