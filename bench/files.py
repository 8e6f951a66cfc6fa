"""File transfer benchmark (issue 15): the gateway's file routes beside ``docker cp``, in one run.

    python bench/files.py [--size-mib 512] [--files 10000] [--repeat 3] [--json PATH]

Starts its own gateway (``--writable-root``, so that ``docker cp`` can write into the same
container: Docker's archive API cannot write to a read-only root or its tmpfs mounts), creates
one sandbox and measures, each ``--repeat`` times (the median is reported):

- a ``--size-mib`` file up (``PUT /files``) and down (``GET /files``), against ``docker cp``
  into and out of the same container, with the gateway's RSS sampled every 50 ms;
- a directory of ``--files`` small files as a tar up (``PUT /files/archive``) and down
  (``GET /files/archive``), against ``docker cp`` of that directory.

Targets: gateway throughput >= 0.5x docker cp for each, gateway RSS growth < 32 MiB during the
big transfers. The machine's load average is printed before and after (it is shared).
Everything it creates (the gateway, its containers, temporary files) is removed at the end.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import benchlib
import docker
import requests
from benchlib import RssSampler, rss_kib

from twistedgw.testing.process import GatewayProcess

MIB = 1024 * 1024


def timed(action: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    action(*args)
    return time.perf_counter() - start


def median_rate(nbytes: int, seconds: list[float]) -> float:
    return nbytes / MIB / statistics.median(seconds)


def docker_cp(*args: str) -> None:
    subprocess.run(["docker", "cp", *args], check=True, stdout=subprocess.DEVNULL)


class BigReads:
    """A file body read 1 MiB at a time (http.client asks for 8 KiB, which costs the client
    more CPU than the gateway on a small machine); its length makes a Content-Length."""

    def __init__(self, file: Any, size: int) -> None:
        self.file = file
        self.size = size

    def __len__(self) -> int:
        return self.size

    def read(self, size: int = -1) -> bytes:
        return bytes(self.file.read(MIB))


def main() -> int:
    parser = benchlib.bench_arguments(__doc__)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("file", "tree"), default=None)
    options = parser.parse_args()

    client = docker.from_env(timeout=600)  # removing 30,000 files on a loaded host is slow
    work = Path(tempfile.mkdtemp(prefix="twistedgw-bench-files-"))
    instance = f"bench-files-{secrets.token_hex(3)}"
    memory = f"{max(1024, 2 * options.size_mib + 512)}m"
    gateway = GatewayProcess(
        instance, "--writable-root", "--memory", memory, "--max-upload", str(4 * 1024 * MIB)
    )
    results: dict[str, Any] = benchlib.host_load_before()
    try:
        gateway.start()
        created = requests.post(gateway.url + "/sandboxes", timeout=120)
        assert created.status_code == 200, created.text
        sandbox_id = created.json()["sandbox_id"]
        container = f"twistedgw-{sandbox_id}"
        url = f"{gateway.url}/sandboxes/{sandbox_id}/files"

        # -- one big file ------------------------------------------------------------------
        if options.only in (None, "file"):
            big = work / "big.bin"
            block = os.urandom(MIB)
            with open(big, "wb") as f:
                for _ in range(options.size_mib):
                    f.write(block)
            nbytes = options.size_mib * MIB

            def gw_up() -> None:
                with open(big, "rb") as f:
                    body = BigReads(f, nbytes)
                    r = requests.put(url, params={"path": "gw.bin"}, data=body, timeout=600)
                assert r.status_code == 201, r.text

            def gw_down() -> None:
                with requests.get(url, params={"path": "gw.bin"}, stream=True, timeout=600) as r:
                    assert r.status_code == 200
                    for _ in r.iter_content(1024 * 1024):
                        pass

            def cp_up() -> None:
                docker_cp(str(big), f"{container}:/home/sandbox/cp.bin")

            def cp_down() -> None:
                subprocess.run(
                    ["docker", "cp", f"{container}:/home/sandbox/cp.bin", "-"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )

            rss_before = rss_kib(gateway.pid)
            with RssSampler(gateway.pid, 0.05) as sampler:
                up = [timed(gw_up) for _ in range(options.repeat)]
                down = [timed(gw_down) for _ in range(options.repeat)]
            rss_growth = (max(sampler.samples) - rss_before) / 1024
            cp_up_s = [timed(cp_up) for _ in range(options.repeat)]
            cp_down_s = [timed(cp_down) for _ in range(options.repeat)]
            results["file"] = {
                "mib": options.size_mib,
                "gateway_up_mib_s": median_rate(nbytes, up),
                "docker_cp_up_mib_s": median_rate(nbytes, cp_up_s),
                "gateway_down_mib_s": median_rate(nbytes, down),
                "docker_cp_down_mib_s": median_rate(nbytes, cp_down_s),
                "gateway_rss_growth_mib": rss_growth,
                "gateway_rss_before_mib": rss_before / 1024,
            }
            print(json.dumps(results["file"]), flush=True)
            big.unlink()

        # -- many small files --------------------------------------------------------------
        if options.only in (None, "tree"):
            tree = work / "tree"
            for i in range(options.files):
                sub = tree / f"d{i % 100:02d}"
                sub.mkdir(parents=True, exist_ok=True)
                (sub / f"f{i:05d}.txt").write_bytes(os.urandom(512))
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                tar.add(tree, arcname=".")
            tar_bytes = buffer.getvalue()

            # Each round into fresh directories (root in the container cannot remove what
            # docker cp left: it has no DAC override).
            def gw_tar_up(name: str) -> None:
                r = requests.put(
                    url + "/archive", params={"path": name}, data=tar_bytes, timeout=600
                )
                assert r.status_code == 201, r.text

            def gw_tar_down(name: str) -> None:
                with requests.get(
                    url + "/archive", params={"path": name}, stream=True, timeout=600
                ) as r:
                    assert r.status_code == 200
                    for _ in r.iter_content(1024 * 1024):
                        pass

            def cp_tar_up(name: str) -> None:
                docker_cp(str(tree), f"{container}:/home/sandbox/{name}")

            def cp_tar_down(name: str) -> None:
                subprocess.run(
                    ["docker", "cp", f"{container}:/home/sandbox/{name}", "-"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )

            tar_up, tar_down, cp_tar_up_s, cp_tar_down_s = [], [], [], []
            for i in range(options.repeat):
                tar_up.append(timed(gw_tar_up, f"gwtree{i}"))
                tar_down.append(timed(gw_tar_down, f"gwtree{i}"))
                cp_tar_up_s.append(timed(cp_tar_up, f"cptree{i}"))
                cp_tar_down_s.append(timed(cp_tar_down, f"cptree{i}"))
            results["tree"] = {
                "files": options.files,
                "tar_mib": len(tar_bytes) / MIB,
                "gateway_up_s": statistics.median(tar_up),
                "docker_cp_up_s": statistics.median(cp_tar_up_s),
                "gateway_down_s": statistics.median(tar_down),
                "docker_cp_down_s": statistics.median(cp_tar_down_s),
            }
            print(json.dumps(results["tree"]), flush=True)
    finally:
        benchlib.stop_instance(gateway, client)
        shutil.rmtree(work, ignore_errors=True)
    return benchlib.finish_run(results, report, options.json)


def report(results: dict[str, Any]) -> None:
    print(f"host {benchlib.host_load_line(results)}")
    f, t = results.get("file"), results.get("tree")
    if f is not None:
        print_file(f)
    if t is not None:
        print_tree(t)


def print_file(f: dict[str, Any]) -> None:
    print(f"{f['mib']} MiB file          gateway      docker cp    ratio (>= 0.5)")
    for way in ("up", "down"):
        g, d = f[f"gateway_{way}_mib_s"], f[f"docker_cp_{way}_mib_s"]
        print(f"  {way:<4} MiB/s         {g:9.1f}    {d:9.1f}    {g / d:5.2f}")
    print(
        f"  gateway RSS growth during the transfers: {f['gateway_rss_growth_mib']:.1f} MiB"
        f" (from {f['gateway_rss_before_mib']:.1f} MiB; target < 32)"
    )


def print_tree(t: dict[str, Any]) -> None:
    print(f"{t['files']} files as tar ({t['tar_mib']:.1f} MiB)  gateway s   docker cp s   ratio")
    for way in ("up", "down"):
        g, d = t[f"gateway_{way}_s"], t[f"docker_cp_{way}_s"]
        print(f"  {way:<4}                 {g:9.2f}    {d:9.2f}    {d / g:5.2f}")


if __name__ == "__main__":
    sys.exit(main())
