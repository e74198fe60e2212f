"""Encrypted volumes against plain storage, measured in one run on this host.

- create: a new encrypted volume of SIZE (fallocate, mkfs, loop, mount, key, policy), median of 5;
- open: a closed volume opened again (loop, mount, key checked), median of 5;
- engine starts (``--engine-starts N``): add-tenant to running, plain and encrypted, alternating;
- throughput: writing FILE MiB with fsync, then reading it back with the page cache dropped, in
  the host's disk directly (where Docker's volumes live: a plain tenant's /data), in a plain ext4
  image on a loop device (the same path minus encryption), and in an encrypted volume.

Needs root, ext4 encryption and loop devices. ``scripts/bench.sh --encrypted-volumes [MIB] [STARTS]``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import docker

from bench.engine_starts import bench_settings, free_port, serve_manager, stop_manager
from bench.timing import timed
from manager.volumes import kernel
from manager.volumes.fscrypt import FscryptVolumes
from manager.volumes.keyring import new_kek_line

MIB = 1024**2
CHUNK = 4 * MIB


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def throughput(folder: Path, size: int) -> tuple[float, float]:
    """MB/s writing ``size`` bytes (fsync included), then reading them from the disk."""
    path = folder / "bench.bin"
    block = os.urandom(CHUNK)
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    wrote = time.perf_counter() - started
    drop_caches()
    started = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    read = time.perf_counter() - started
    path.unlink()
    return size / wrote / 1e6, size / read / 1e6


def plain_loop(root: Path, size: int) -> tuple[Path, str]:
    """A plain ext4 image of ``size`` mounted through a loop device: its mount point and device."""
    image, mountpoint = root / "plain.img", root / "plain"
    with open(image, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-m", "0", str(image)], check=True)
    mountpoint.mkdir()
    dev, fd = kernel.loop_attach(image)
    kernel.mount_ext4(dev, mountpoint)
    kernel.loop_autoclear(fd)
    os.close(fd)
    return mountpoint, dev


def engine_starts(models: Path, rounds: int) -> None:
    """add-tenant to running for a plain and an encrypted tenant, alternating, ``rounds`` each:
    what the engine's start pays for reading and writing its caches through the encryption."""
    instance = "gtmbench" + secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix="gtm-bench-engines-", dir="/var/tmp"))
    (root / "volumes").mkdir()
    subprocess.run(["mount", "--bind", str(root / "volumes"), str(root / "volumes")], check=True)
    subprocess.run(["mount", "--make-shared", str(root / "volumes")], check=True)
    (root / "keys").write_text(new_kek_line() + "\n")
    settings = bench_settings(instance, models).model_copy(
        update={"volumes_dir": root / "volumes", "volume_key_file": root / "keys", "volume_size": 1024 * MIB}
    )
    client = docker.from_env()
    server, api = serve_manager(settings)
    times: dict[str, list[float]] = {"plain": [], "encrypted": []}
    try:
        for i in range(rounds):
            for volume in ("plain", "encrypted"):
                name = f"{volume[:3]}{i}"
                started = time.perf_counter()
                body = {"name": name, "gpu_memory": "1536M", "port": free_port(), "volume": volume}
                created = api.post("/api/v1/tenants", json=body)
                assert created.status_code == 201, created.text
                while (status := api.get(f"/api/v1/tenants/{name}").json())["status"] != "running":
                    if status["status"] == "failed":
                        raise SystemExit(f"{name} failed: {status['reason']}")
                    time.sleep(0.5)
                times[volume].append(time.perf_counter() - started)
                api.delete(f"/api/v1/tenants/{name}")
                while api.get(f"/api/v1/tenants/{name}").status_code != 404:
                    time.sleep(0.5)
        plain, encrypted = statistics.median(times["plain"]), statistics.median(times["encrypted"])
        print(
            f"add-tenant to running, median of {rounds}: plain {plain:.1f} s, encrypted {encrypted:.1f} s "
            f"({encrypted / plain:.2f}x)"
        )
    finally:
        stop_manager(server, client, instance)
        volumes = FscryptVolumes(root / "volumes" / instance)
        for name in volumes.names():
            volumes.erase(name)
        subprocess.run(["umount", str(root / "volumes")], check=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-mib", type=int, default=512, help="MiB written and read (default 512)")
    parser.add_argument("--size-mib", type=int, default=1024, help="volume size (default 1024)")
    parser.add_argument("--engine-starts", type=int, default=0, help="rounds of engine starts, plain and encrypted")
    parser.add_argument("--models", type=Path, default=Path("/var/cache/gpu-tenant-manager/models"))
    args = parser.parse_args()
    if os.geteuid() != 0 or not kernel.ext4_encryption():
        raise SystemExit("needs root and a kernel whose ext4 can encrypt")
    if args.engine_starts:
        engine_starts(args.models, args.engine_starts)
    size, file_size = args.size_mib * MIB, args.file_mib * MIB
    root = Path(tempfile.mkdtemp(prefix="gtm-bench-volumes-", dir="/var/tmp"))
    volumes = FscryptVolumes(root / "encrypted", require_shared=False)
    key = os.urandom(64)
    try:
        made = iter(range(100))

        def create() -> None:
            volumes.create(f"v{next(made)}", size, key, str(uuid.uuid4()), 0)

        create_s = timed(create)
        volumes.close("v0")
        open_times = []
        for _ in range(5):
            started = time.perf_counter()
            volumes.open("v0", key)
            open_times.append(time.perf_counter() - started)
            volumes.close("v0")
        open_s = sorted(open_times)[2]
        volumes.open("v0", key)

        host_dir = root / "host"
        host_dir.mkdir()
        loop_dir, _ = plain_loop(root, size)
        rows = [
            ("host disk (a plain tenant's Docker volume)", throughput(host_dir, file_size)),
            ("plain ext4 on a loop device", throughput(loop_dir, file_size)),
            ("encrypted volume (fscrypt)", throughput(volumes.data_path("v0"), file_size)),
        ]
        kernel.unmount(loop_dir)
        print(f"encrypted volume of {args.size_mib} MiB: create {create_s * 1000:.0f} ms, open {open_s * 1000:.0f} ms")
        print(f"{args.file_mib} MiB written with fsync, read back with the page cache dropped (MB/s):")
        base_w, base_r = rows[0][1]
        for name, (w, r) in rows:
            print(f"  {name:45s} write {w:7.1f} ({w / base_w:4.2f}x)  read {r:7.1f} ({r / base_r:4.2f}x)")
    finally:
        for name in volumes.names():
            volumes.erase(name)
        if kernel.mount_of(root / "plain") is not None:
            kernel.unmount(root / "plain")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
