"""Plain, declarative plans of what Docker should run for a tenant.

Built by pure functions from the tenant's spec and the settings; the runtime
adapter (``manager.runtime.docker``) turns them into SDK calls. Unit tests read
these plans directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from manager import names
from manager.control import gguf_convert
from manager.control.enginefit import EngineFit
from manager.control.parsers import EngineParsers
from manager.domain import MAX_CPU_WEIGHT, TenantSpec
from manager.names import Role
from manager.node_report import HEALTH_PATH
from manager.runtime.types import ContainerPlan, Mount, NetworkPlan, VolumePlan
from manager.settings import Settings
from manager.volumes.fscrypt import data_path as encrypted_data_path

MIB = 1024**2
ENGINE_PORT = 8000
GATEWAY_PUBLIC_PORT = 8000
GATEWAY_ADMIN_PORT = 8001
SECOND_NS = 1_000_000_000
GATEWAY_MEMORY = 1024 * MIB
NO_PARSERS = EngineParsers()
STRUCTURED_OUTPUTS = json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})
"""JSON that a schema constrains (response_format, tool arguments) is written without free
whitespace: a small model could otherwise spend every token it may write on blanks."""


def http_healthcheck(port: int, path: str, start_period_s: int, interval_s: int = 5) -> dict[str, object]:
    """A Docker health check that works in any image with bash (ours and upstream vLLM's): one GET
    over bash's ``/dev/tcp``, about two thirds of what a python3 probe costs per run, so that an
    engine is probed every 2 s (dockerd 20.10 has no start interval: the whole start would
    otherwise go by the 5 s steps). The manager reads health through the Docker API and never
    needs a route to the tenant network."""
    # the whole answer is read (to the close HTTP/1.0 asks for): a probe that hung up after the
    # status line would leave the server a reset connection, and a traceback, every run
    probe = (
        f"exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3"
        ' && read -r status <&3 && while read -r _ <&3; do :; done; [[ $status == *" 200 "* ]]'
    )
    return {
        "test": ["CMD", "bash", "-c", probe],
        "interval": interval_s * SECOND_NS,
        "timeout": 4 * SECOND_NS,
        "retries": 3,
        "start_period": start_period_s * SECOND_NS,
    }


ENGINE_HEALTH_INTERVAL_S = 2
"""How often an engine's health is probed: how soon a started engine is seen serving (its start
gate then passes to the next one on its device) and a dead one replaced."""


@dataclass(frozen=True)
class TenantPlan:
    network: NetworkPlan
    volume: VolumePlan | None
    """The tenant's Docker volume; None: its /data is an encrypted volume (``data_source``)."""
    engine: ContainerPlan
    gateway_volume: VolumePlan
    gateway: ContainerPlan


# An internal network still lets containers reach the host's own addresses through
# the bridge's IP; with no IPv4 on the bridge, nothing outside the network answers.
ISOLATED_BRIDGE = {"com.docker.network.bridge.inhibit_ipv4": "true"}


# The control network (manager and gateways) is a plain bridge so that gateways can publish
# tenant ports, but without masquerading nothing on it reaches beyond the host: gateways
# need no outbound traffic. compose/docker-compose.yml creates it with the same option.
CONTROL_BRIDGE = {"com.docker.network.bridge.enable_ip_masquerade": "false"}


def cpu_shares(spec: TenantSpec) -> int:
    """The engine's CPU shares: what the admin set (``--cpu-weight``), else its reservation in MiB.
    They divide the host's CPUs only while containers contend for them (cgroup v1 cpu.shares, v2
    cpu.weight), so a flooding tenant's engine cannot starve another's, and each gets CPU in
    proportion to the memory it reserved; an idle host lets any engine use every core."""
    if spec.cpu_weight is not None:
        return spec.cpu_weight
    return max(2, min(MAX_CPU_WEIGHT, spec.gpu_memory // MIB))


def modality_limits(max_images: int) -> dict[str, int]:
    """``--limit-mm-per-prompt``: the tenant's images, and no video or audio. vLLM gives a modality
    left out 999 (config/multimodal.py ``get_limit_per_prompt``), and Qwen-VL profiles whichever of
    image or video is larger; a modality the model does not take is ignored. The gateway refuses
    video and audio parts (``gateway.images.UNSERVED_PARTS``)."""
    return {"image": max_images, "video": 0, "audio": 0}


def engine_args(
    spec: TenantSpec, settings: Settings, device_total: int, fit: EngineFit, parsers: EngineParsers = NO_PARSERS
) -> list[str]:
    """``fit``: how the reservation is split (``enginefit.fit``); its sequences and batched tokens
    bound what the engine runs at once, in both modes, so that its peak stays inside the split.
    ``parsers``: its tool-call and reasoning parsers, ``auto`` resolved (``parsers.engine_parsers``)."""
    args = [
        "--model", f"/models/{spec.model}",
        "--served-model-name", spec.model,
        "--host", "0.0.0.0",
        "--port", str(ENGINE_PORT),
        "--max-model-len", str(spec.max_model_len),
        "--max-num-seqs", str(fit.max_num_seqs),
        "--max-num-batched-tokens", str(fit.max_num_batched_tokens),
    ]  # fmt: skip
    args += settings.platform.engine_args(spec.gpu_memory, device_total, fit.kv_cache)
    args += ["--structured-outputs-config", STRUCTURED_OUTPUTS]
    if spec.quantization:
        args += ["--quantization", spec.quantization]
    # the gateway refuses requests with more images; a text model ignores the limit. Prefix caching is
    # on by default where vLLM supports it (its CPU backend too; it turns it off itself for MLA models
    # on CPU): every member's requests carry their own cache salt (manager.gateway.proxy.cache_salt)
    args += ["--limit-mm-per-prompt", json.dumps(modality_limits(spec.max_images))]
    if spec.max_images:
        # vLLM caches processed images up to 4 GiB in each of its processes by default
        # (config/multimodal.py): memory no reservation holds (cpu) and host RAM that is never
        # admitted (nvml). Off: an image sent again is processed again.
        args += ["--mm-processor-cache-gb", "0"]
    if fit.image_pixels:
        # Qwen-VL's processor resizes every image to at most this many pixels, and vLLM profiles
        # the largest image at it: the tenant's own limit instead of the processor's 12.8-16.8 MP
        args += ["--mm-processor-kwargs", json.dumps({"max_pixels": fit.image_pixels})]
    if settings.gpu_sharing == "mps":
        # the KV cache in bytes, not as a share of what CUDA reports: under MPS the engine's memory
        # is capped (mps_env), and its budget must not hang on whether CUDA reports the cap or the
        # device as its total
        args += ["--kv-cache-memory-bytes", str(fit.kv_cache)]
    args += ["--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching"]
    if spec.trust_remote_code:
        args += ["--trust-remote-code"]
    return args + parsers.args()


WARMUP_CODE = """
import os, sys, sysconfig
paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.argv[1:]}
read = 0
for root in paths:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        read += len(chunk)
print(f"read {read} bytes")
"""


ENGINE_UID = 1000
PREPARE_CODE = (
    "import os, sys\n"
    f"if os.stat('/data').st_uid == {ENGINE_UID}:\n"
    "    sys.exit(0)\n"
    "os.chmod('/data', 0o700)\n"
    "open('/data/.owner', 'w').write('the engine user owns this volume\\n')\n"
    f"os.chown('/data/.owner', {ENGINE_UID}, {ENGINE_UID})\n"
    f"os.chown('/data', {ENGINE_UID}, {ENGINE_UID})\n"
)
"""Idempotent: a volume the engine's user owns already is left alone (root, with CHOWN alone, could
not touch it). Root owns /data until the last step (chmod needs its owner). The file keeps the volume from being
empty: Docker copies an image's mount point, owner included, into an empty volume at every mount,
which would give a volume back to root when an image has /data of its own."""


def prepare_plan(spec: TenantSpec, settings: Settings, node: str = "") -> ContainerPlan:
    """A one-off container that gives the tenant's volume to the engine's user before its engine
    starts. A new named volume is root's (0755) unless the image has the mount point with other
    owners, and the upstream vLLM image has no /data: its engine, running as uid 1000, could not
    write its caches. It runs from the engine image as root with CHOWN alone, no network; on a
    swarm on the engine's ``node``, where the volume is."""
    return ContainerPlan(
        name=names.prepare(settings.instance, spec.name),
        image=settings.engine_image,
        entrypoint=["python3", "-c", PREPARE_CODE],
        command=[],
        labels=names.labels(settings.instance, Role.PREPARE, spec.name),
        network="none",
        node=node or None,
        mounts=[Mount(data_source(spec, settings), "/data")],
        user="0:0",
        cap_add=["CHOWN"],
        pids_limit=16,
    )


def data_source(spec: TenantSpec, settings: Settings) -> str:
    """What the engine mounts at /data: its Docker volume, or its encrypted volume's data
    directory, which exists only while that volume is open (Docker refuses to start an engine
    whose bind source is missing, so it never writes underneath a closed volume)."""
    if spec.encrypted:
        return str(encrypted_data_path(settings.volumes_dir / settings.instance, spec.name))
    return names.volume(settings.instance, spec.name)


def drain_plan(settings: Settings, tenant: str, node: str, cursors: Mapping[str, int]) -> ContainerPlan:
    """A one-off on swarm ``node`` that prints what the tenant's old gateway spooled there after
    the manager's ``cursors`` (``control.drains``): the gateway's volume on that node, its user,
    no network."""
    return ContainerPlan(
        name=names.drain(settings.instance, tenant),
        image=settings.manager_image,
        command=["drain-spool", "--data-dir", "/data", "--cursors", json.dumps(dict(cursors), sort_keys=True)],
        labels=names.labels(settings.instance, Role.PREPARE, tenant),
        network="none",
        node=node,
        mounts=[Mount(names.gateway_volume(settings.instance, tenant), "/data")],
        pids_limit=16,
    )


MOVE_SCRIPT = "cp -a /from/. /to/ && sync && touch /to/{moved} && sync"


def move_plan(spec: TenantSpec, settings: Settings, moved_marker: str) -> ContainerPlan:
    """A one-off container that copies the tenant's Docker volume into its new encrypted volume,
    owners and modes kept, and leaves ``moved_marker`` there once all of it is copied. Root with
    the capabilities a faithful copy needs (read what uid 1000 owns, keep owners), no network."""
    return ContainerPlan(
        name=names.move_data(settings.instance, spec.name),
        image=settings.manager_image,
        entrypoint=["sh", "-c", MOVE_SCRIPT.format(moved=moved_marker)],
        command=[],
        labels=names.labels(settings.instance, Role.PREPARE, spec.name),
        network="none",
        mounts=[
            Mount(names.volume(settings.instance, spec.name), "/from", read_only=True),
            Mount(data_source(spec, settings), "/to"),
        ],
        user="0:0",
        cap_add=["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID"],
        pids_limit=16,
    )


def engine_env(settings: Settings) -> dict[str, str]:
    """The engine's environment. Its user (uid 1000) has no passwd entry in the upstream vLLM image:
    ``getpass.getuser()`` (torch inductor's cache path) reads USER/LOGNAME before it asks passwd,
    and every cache lives in the tenant's volume."""
    env = {
        "HOME": "/data",
        "USER": "vllm",
        "LOGNAME": "vllm",
        "HF_HOME": "/data/hf",
        "VLLM_CACHE_ROOT": "/data/vllm-cache",
        "TORCHINDUCTOR_CACHE_DIR": "/data/inductor-cache",
        "TRITON_CACHE_DIR": "/data/triton-cache",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    return env | settings.platform.engine_env()


def warmup_plan(settings: Settings, model: str, node: str = "") -> ContainerPlan:
    """A one-off container that reads the engine's Python packages and the model once, so that
    they are in the host's page cache before an engine starts (cpu mode); on a swarm, in the page
    cache of the engine's ``node``.

    Why: vLLM's CPU backend sizes its KV cache against ``cgroup limit - cgroup usage``, and
    cgroup usage counts the page cache an engine charges to itself by reading its libraries
    and weights for the first time. On a cold cache (after an image build, a host boot, or
    memory pressure) that is over 1 GiB, so an engine with a 1.5 GiB reservation found 0.1 GiB
    "available" and refused its KV cache. Pages read here are charged to this container,
    which is gone before the engine starts; the engine's own reads then hit the cache. It has
    no memory limit on purpose: a limit would evict what it reads.
    """
    return ContainerPlan(
        name=names.warmup(settings.instance, node),
        image=settings.engine_image,
        entrypoint=["python3", "-c", WARMUP_CODE],
        command=[f"/models/{model}"],
        labels=names.labels(settings.instance, Role.WARMUP),
        network="none",
        node=node or None,
        mounts=[Mount(settings.models_source, "/models", read_only=True)],
        pids_limit=64,
    )


@functools.cache
def convert_code() -> str:
    """The converter job's program: ``gguf_convert.py`` beside this file, passed to ``python3 -c``,
    so any image with its libraries runs it without a copy of the manager (read on first use)."""
    return (Path(__file__).parent / "gguf_convert.py").read_text()


def convert_plan(settings: Settings, model: str, staging: str) -> ContainerPlan:
    """A one-off container converting ``<staging>/source.gguf`` in the models volume into the
    model folder ``<staging>/model`` (``gguf_convert.py``). No network; root only to write into
    the staging folder the manager made (it owns it: no capability is needed); a tmpfs home for
    the libraries' caches (/scratch) on an otherwise read-only filesystem. It has no memory limit: the
    dequantised model is held in memory once (twice its bf16 size at most)."""
    return ContainerPlan(
        name=names.converter(settings.instance, model),
        image=settings.converter_image,
        entrypoint=["python3", "-c", convert_code()],
        command=[f"/models/{staging}/{gguf_convert.SOURCE}", f"/models/{staging}/{gguf_convert.OUT}"],
        labels=names.labels(settings.instance, Role.CONVERT),
        network="none",
        mounts=[Mount(settings.models_source, "/models")],
        tmpfs={"/scratch": "size=1g"},
        env={
            "HOME": "/scratch",
            "TMPDIR": "/scratch",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TQDM_DISABLE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        },
        user="0:0",
        pids_limit=256,
    )


PORT_TAKEN = ("address already in use", "port is already allocated")
"""How Docker says a host port cannot be published (docker-proxy's bind, its own allocator)."""


def port_probe_plan(settings: Settings, port: int) -> ContainerPlan:
    """A container that exists only to see whether Docker can publish a tenant's port (see
    ``Runtime.publish_error``): the gateway's port binding, on Docker's default bridge."""
    return ContainerPlan(
        name=names.port_probe(settings.instance, port),
        image=settings.manager_image,
        entrypoint=["python3", "-c", "pass"],
        command=[],
        labels=names.labels(settings.instance, Role.PROBE),
        network="bridge",
        ports={GATEWAY_PUBLIC_PORT: (settings.tenant_bind_address, port)},
        pids_limit=16,
    )


def docker_words(error: str) -> str:
    """The part of Docker's port error that says what happened ("listen tcp4 0.0.0.0:30009: bind:
    address already in use"), without the container ID and driver wording before it."""
    for marker in ("Error starting userland proxy: ", "failed programming external connectivity"):
        if marker in error:
            error = error.split(marker)[-1]
    return error.strip(" :)\"'")[-160:]


def port_taken(error: str) -> bool:
    low = error.lower()
    return any(taken in low for taken in PORT_TAKEN)


def control_network_name(settings: Settings) -> str:
    return settings.control_network or names.control_network(settings.instance)


def control_network_plan(settings: Settings) -> NetworkPlan:
    """The bridge the manager and every gateway are on; gateways publish tenant ports through it."""
    return NetworkPlan(
        control_network_name(settings),
        names.labels(settings.instance, Role.NETWORK),
        internal=False,
        options=dict(CONTROL_BRIDGE),
    )


def identity(*parts: str) -> str:
    """The ``spec-hash`` label: a container is replaced when any of its parts changes."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def engine_identity(
    spec: TenantSpec, image_id: str, gpu_uuid: str | None, sharing: dict[str, str] | None = None, node: str = ""
) -> str:
    """The engine's ``spec-hash``: its spec, the image the tag points at, the GPU it runs on (a
    tenant moved with --gpu gets a new engine there), its MPS settings (``sharing``: turning MPS
    on or off replaces it) and its swarm node (a tenant placed on another node gets a new engine
    there). cpu mode on one host has no GPU or node, so its hash is what it was."""
    parts = [spec.engine_hash()] + ([image_id] if image_id else []) + ([gpu_uuid] if gpu_uuid else [])
    parts += [json.dumps(sharing, sort_keys=True)] if sharing else []
    parts += [f"node={node}"] if node else []
    return identity(*parts) if len(parts) > 1 else parts[0]


MPS_PIPE_DIR = "/dev/shm/nvidia-mps"  # noqa: S108 - the IPC namespace the daemon and its engines share
"""Where the MPS control daemon and its clients meet: in /dev/shm of the daemon's IPC namespace,
which its engines join (``ipc_mode``), so no host path or volume is shared."""
MPS_LOG_DIR = "/tmp/nvidia-mps-log"  # noqa: S108 - in the daemon's private tmpfs
MPS_SHM = 16384 * MIB
"""The size of the /dev/shm that a device's daemon and engines share: a ceiling, each page charged
to the engine that writes it (an engine under MPS cannot have /dev/shm of its own)."""
MPS_CONTROL = 'mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" && exec nvidia-cuda-mps-control -f'
MPS_HEALTH = "echo get_server_list | nvidia-cuda-mps-control"


def mps_memory_limit(spec: TenantSpec, settings: Settings) -> int:
    """An engine's hard memory cap under MPS: what admission counted for it, its reservation and
    the per-process overhead, in whole MiB (rounded down)."""
    counted = spec.gpu_memory + settings.platform.process_overhead(settings.process_overhead)
    return counted // MIB * MIB


def mps_thread_percentage(reserved: int, device_total: int) -> int:
    """An engine's share of the device's SMs under MPS: its reservation's share of the device's
    memory, rounded up, 1-100. A ceiling on what its kernels may occupy, not a guarantee: shares
    may add up to more than 100, and an idle neighbour's share is not lent out."""
    return max(1, min(100, math.ceil(100 * reserved / device_total)))


def mps_env(spec: TenantSpec, settings: Settings, device_total: int) -> dict[str, str]:
    """What makes an engine an MPS client of its device's daemon (``mps_daemon_plan``)."""
    return {
        "CUDA_MPS_PIPE_DIRECTORY": MPS_PIPE_DIR,
        # the engine sees one device, its ordinal 0
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={mps_memory_limit(spec, settings) // MIB}M",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(mps_thread_percentage(spec.gpu_memory, device_total)),
    }


def mps_daemon_plan(settings: Settings, device: str) -> ContainerPlan:
    """The MPS control daemon of one device (``GTM_GPU_SHARING=mps``): the NVIDIA runtime mounts
    ``nvidia-cuda-mps-control`` into the engine image (the compute capability). It runs as the
    engines' user, so one MPS server serves them all (MPS runs one user's server per device at a
    time), in an IPC namespace its engines join, with no network. Restarting it ends every engine
    on the device, so it is replaced only when gone or dead."""
    inst = settings.instance
    return ContainerPlan(
        name=names.mps_daemon(inst, device),
        image=settings.engine_image,
        entrypoint=["sh", "-c", MPS_CONTROL],
        command=[],
        labels=names.labels(inst, Role.MPS, device=device),
        network="none",
        env={
            "CUDA_MPS_PIPE_DIRECTORY": MPS_PIPE_DIR,
            "CUDA_MPS_LOG_DIRECTORY": MPS_LOG_DIR,
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        },
        tmpfs={"/tmp": "rw,nosuid,nodev,size=64m"},  # noqa: S108 - a private tmpfs
        user=f"{ENGINE_UID}:{ENGINE_UID}",
        pids_limit=256,
        shm_size=MPS_SHM,
        ipc_mode="shareable",
        gpu_device_ids=[device],
        restart_policy="unless-stopped",
        healthcheck={
            "test": ["CMD-SHELL", MPS_HEALTH],
            "interval": 5 * SECOND_NS,
            "timeout": 4 * SECOND_NS,
            "retries": 3,
            "start_period": 30 * SECOND_NS,
        },
    )


DOCKER_SOCKET = "/var/run/docker.sock"


def node_agent_plan(settings: Settings, token: str, image_id: str = "") -> ContainerPlan:
    """The node agent (``manager node-agent``), run on every node of a swarm: it reads its node's
    devices (NVML through the node's default NVIDIA runtime, or meminfo) and, through the node's
    Docker socket, the memory and PIDs of the instance's containers there, and serves them on the
    control overlay to the token; asked with the token, it removes a tenant's old volume there
    (``agent.volumes``). The socket is mounted read-only, but Docker's API is root on the node
    whatever the mount: the agent is as trusted as the manager, and publishes nothing. Its
    identity is the plan and ``image_id``: a rebuilt image replaces it on every node."""
    inst = settings.instance
    env = {
        "GTM_AGENT_TOKEN": token,
        "GTM_AGENT_PORT": str(settings.agent_port),
        "GTM_INSTANCE": inst,
        "GTM_GPU_MODE": settings.platform.name,
    }
    env |= settings.platform.agent_env()
    plan = ContainerPlan(
        name=names.node_agent(inst),
        image=settings.manager_image,
        command=["node-agent"],
        labels=names.labels(inst, Role.AGENT),
        network=control_network_name(settings),
        env=env,
        mounts=[Mount(settings.docker_socket, DOCKER_SOCKET, read_only=True)],
        user="0:0",
        read_only=True,
        cap_drop=["ALL"],
        pids_limit=64,
        mem_limit=128 * 1024**2,
        restart_policy="unless-stopped",
        healthcheck=http_healthcheck(settings.agent_port, HEALTH_PATH, 30),
    )
    spec_hash = identity(repr(plan), image_id, token)
    return replace(plan, labels={**plan.labels, names.SPEC_HASH: spec_hash})


def gateway_plan(
    spec: TenantSpec, settings: Settings, gateway_token: str, image_id: str = "", node: str = ""
) -> ContainerPlan:
    """The gateway's identity is the whole plan plus ``image_id`` (what the image tag points at
    now): any change to how it runs, or a rebuilt image (new gateway code, security fixes
    included), replaces the running gateway, not only new ones. On a swarm it runs on its engine's
    ``node``, where the tenant's port is published."""
    inst = settings.instance
    plan = ContainerPlan(
        name=names.gateway(inst, spec.name),
        image=settings.manager_image,
        command=["gateway"],
        labels=names.labels(inst, Role.GATEWAY, spec.name) | ({names.NODE: node} if node else {}),
        network=control_network_name(settings),
        extra_networks={names.network(inst, spec.name): [names.GATEWAY_ALIAS]},
        env={
            "GTM_GATEWAY_TENANT": spec.name,
            "GTM_GATEWAY_UPSTREAM": f"http://{names.ENGINE_ALIAS}:{ENGINE_PORT}",
            "GTM_GATEWAY_PUBLIC_PORT": str(GATEWAY_PUBLIC_PORT),
            "GTM_GATEWAY_ADMIN_PORT": str(GATEWAY_ADMIN_PORT),
            "GTM_GATEWAY_ADMIN_TOKEN": gateway_token,
            "GTM_GATEWAY_DATA_DIR": "/data",
            # host memory: the engine's memory holds one request's image decode (enginefit)
            "GTM_GATEWAY_IMAGE_REQUESTS": "1" if settings.platform.reservation_is_host_memory else "0",
        },
        mounts=[Mount(names.gateway_volume(inst, spec.name), "/data")],
        tmpfs={"/tmp": "rw,nosuid,nodev,size=64m"},  # noqa: S108 - a private tmpfs
        pids_limit=256,
        # large bodies (images) are bounded by the gateway: 4 at once, 64 MiB each at most
        mem_limit=GATEWAY_MEMORY,
        ports={GATEWAY_PUBLIC_PORT: (settings.tenant_bind_address, spec.port)},
        # the data plane outlives the manager: Docker restarts gateways, even after dockerd restarts
        restart_policy="unless-stopped",
        healthcheck=http_healthcheck(GATEWAY_ADMIN_PORT, "/healthz", 30),
        node=node or None,
    )
    ident = identity(json.dumps(asdict(plan), sort_keys=True, default=str), image_id)
    return replace(plan, labels={**plan.labels, names.SPEC_HASH: ident})


def tenant_plan(
    spec: TenantSpec,
    settings: Settings,
    device_total: int,
    fit: EngineFit,
    gpu_uuid: str | None = None,
    gateway_token: str = "",
    image_ids: dict[str, str] | None = None,
    parsers: EngineParsers = NO_PARSERS,
    node: str = "",
) -> TenantPlan:
    """``device_total``: the device's CUDA total (``DeviceMemory.usable``); ``fit``: the split of the
    reservation (``sizing.Sizing.fit``); ``gpu_uuid``: its UUID (nvml); ``node``: the swarm node of
    the device ('' on one host). ``image_ids``: image name -> the ID it points at now (from the
    runtime); part of each container's identity, so a rebuilt image under the same tag replaces
    the containers."""
    inst = settings.instance
    ids = image_ids or {}
    engine_image_id = ids.get(settings.engine_image, "")
    net = names.network(inst, spec.name)
    vol = names.volume(inst, spec.name)
    mps = mps_env(spec, settings, device_total) if settings.gpu_sharing == "mps" and gpu_uuid else None
    engine = ContainerPlan(
        name=names.engine(inst, spec.name),
        image=settings.engine_image,
        entrypoint=list(settings.platform.engine_entrypoint),
        # the tenant's volume: the upstream image's own working directory is not writable by uid 1000
        working_dir="/data",
        command=engine_args(spec, settings, device_total, fit, parsers),
        labels=names.labels(
            inst,
            Role.ENGINE,
            spec.name,
            spec_hash=engine_identity(spec, engine_image_id, gpu_uuid, mps, node),
        ),
        network=net,
        aliases=[names.ENGINE_ALIAS],
        env=engine_env(settings) | (mps or {}),
        mounts=[Mount(data_source(spec, settings), "/data"), Mount(settings.models_source, "/models", read_only=True)],
        tmpfs={"/tmp": "rw,nosuid,nodev,size=1g"},  # noqa: S108 - a private tmpfs, not a shared /tmp
        pids_limit=settings.engine_pids_limit,
        mem_limit=settings.platform.memory_limit(spec.gpu_memory, settings.engine_host_memory + fit.weights),
        # an MPS client shares its daemon's IPC namespace, /dev/shm included (MPS_SHM)
        shm_size=None if mps else spec.shm_size,
        ipc_mode=f"container:{names.mps_daemon(inst, gpu_uuid)}" if mps and gpu_uuid else None,
        nano_cpus=int(settings.engine_cpus * 1e9) if settings.engine_cpus else None,
        cpu_shares=cpu_shares(spec),
        gpu_device_ids=settings.platform.devices(gpu_uuid),
        healthcheck=http_healthcheck(
            ENGINE_PORT, "/health", int(settings.engine_start_timeout_s), ENGINE_HEALTH_INTERVAL_S
        ),
        node=node or None,
        reserved=spec.gpu_memory,
    )
    return TenantPlan(
        network=NetworkPlan(
            net, names.labels(inst, Role.NETWORK, spec.name), internal=True, options=dict(ISOLATED_BRIDGE)
        ),
        volume=None if spec.encrypted else VolumePlan(vol, names.labels(inst, Role.VOLUME, spec.name)),
        engine=engine,
        gateway_volume=VolumePlan(names.gateway_volume(inst, spec.name), names.labels(inst, Role.VOLUME, spec.name)),
        gateway=gateway_plan(spec, settings, gateway_token, ids.get(settings.manager_image, ""), node),
    )
