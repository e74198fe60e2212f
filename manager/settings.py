"""The one settings class. Built once at start (``Settings()`` reads ``GTM_*`` from
the environment) and passed in; nothing else reads the environment.

Every field is documented in docs/settings.md; a test fails when one is not."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from manager.contract import HOLD_TIMEOUT_S, MAX_WAITING
from manager.errors import InvalidInput
from manager.node_report import AGENT_PORT
from manager.platform import PLATFORMS, Platform, platform_of
from manager.sizes import parse_size


def _size(value: object) -> int:
    """A size setting; its error a ValueError, so that the refusal names the setting."""
    try:
        return parse_size(value)  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise ValueError(exc.message) from exc


Size = Annotated[int, BeforeValidator(_size)]
GIB = 1024**3
MIB = 1024**2
"""nvml: vLLM's budget beyond weights and KV cache, from its own start-up logs (docs/gpu.md): the
activation peak of a profile run (1.26-2.38 GiB for 7-8B models at 2048 batched tokens), memory
outside torch (0.03-0.30 GiB, 1.79 once), CUDA graphs (about 0.2-0.5 GiB)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GTM_", extra="ignore")

    environment: Literal["production", "development"] = "production"
    gpu_mode: Literal["nvml", "cpu"] | None = None
    instance: str = Field("gtm", pattern=r"^[a-z][a-z0-9-]{0,19}$")

    state_dir: Path = Path("/var/lib/gtm")
    api_host: str = "0.0.0.0"
    api_port: int = 8080
    api_url: str = "http://127.0.0.1:8080"
    admin_token: SecretStr | None = None
    agent_token: SecretStr | None = None
    agent_port: int = AGENT_PORT

    console_user: str = "admin"
    console_password: SecretStr | None = None
    templates_dir: Path | None = None

    engine_image: str = "gtm-engine-cpu:0.32.0"
    manager_image: str = "gtm-manager:dev"
    converter_image: str = "gtm-engine-cpu:0.32.0"
    """Where import-model converts GGUF files (on the CPU): an image with torch, transformers, gguf
    and accelerate. The CPU engine image has them in every mode; the upstream GPU image lacks
    accelerate."""
    control_network: str | None = None
    models_source: str = "gtm-models"
    models_dir: Path = Path("/models")
    default_model: str = "demo"
    default_max_model_len: int = 512
    tenant_bind_address: str = "0.0.0.0"

    headroom: Size = GIB
    process_overhead: Size = 512 * MIB
    kept_asleep: Size | None = None
    engine_host_memory: Size = 4 * GIB
    host_headroom: Size = 4 * GIB
    meminfo: Path = Path("/proc/meminfo")
    engine_overhead: Size | None = None
    min_kv_tokens: int = 256
    engine_pids_limit: int = 512
    engine_cpus: float | None = None
    gpu_sharing: Literal["none", "mps"] = "none"
    """How engines on one GPU share it (nvml): none, or NVIDIA MPS, a control daemon per device and
    each engine capped at the memory admission counted for it, with its share of the SMs
    (``plan.mps_env``)."""

    runtime: Literal["docker", "swarm"] = "docker"
    """What runs the containers: this host's Docker engine, or a Docker Swarm through a manager
    node's engine (``runtime.swarm``: tenants placed across the nodes, a node agent on each)."""
    docker_socket: str = "/var/run/docker.sock"
    """Where each swarm node's Docker socket is, on the node: what its node agent mounts."""
    node_loss_grace_s: float = Field(60.0, ge=0)
    """On a swarm: how long a tenant's node may go unreported (its agent silent: the node down or
    cut off) before the tenant is placed again on another node where it fits."""

    reconcile_interval_s: float = 30.0
    usage_interval_s: float = 15.0
    sleep_check_s: float = 1.0
    """How often the sleeper reads the activity of tenants that may sleep or sleep (control.sleeper)."""
    wake_timeout_s: float = Field(HOLD_TIMEOUT_S, gt=0)
    """How long a request that found its tenant asleep waits for the wake before a 503."""
    max_waiting: int = Field(MAX_WAITING, ge=1)
    """Requests a sleeping or waking tenant's gateway holds at most; more get a 503 at once."""
    overcommit: bool = False
    """Admission and wakes count only awake tenants' reservations (control.overcommit): more tenants
    than fit awake, a wake putting the least recently used idle ones to sleep first."""
    orphan_grace_s: float = 300.0

    volume_encryption: Literal["fscrypt", "off"] = "fscrypt"
    """How ``--volume encrypted:/data`` is made (``manager.volumes``); off refuses it."""
    volumes_dir: Path = Path("/var/lib/gpu-tenant-manager/volumes")
    """Encrypted volumes' images and mounts: the same path on the host and in the manager's
    container (Docker binds an engine's /data from it), a shared mount."""
    volume_key_file: Path | None = Path("/run/secrets/volume_keys")
    """The host's key-encryption keys (``manager.volumes.keyring``): a Docker secret or tmpfs,
    never the state volume."""
    volume_size: Size = 10 * GIB
    """An encrypted volume's size when the tenant does not give ``--volume-size``."""
    engine_start_timeout_s: float = 900.0

    @model_validator(mode="after")
    def _mode_defaults(self) -> Settings:
        limit = PLATFORMS[self.gpu_mode].pids_limit if self.gpu_mode else None
        if limit is not None and "engine_pids_limit" not in self.model_fields_set:
            self.engine_pids_limit = limit
        return self

    @model_validator(mode="after")
    def _refuse_mps_without_gpus(self) -> Settings:
        if self.gpu_sharing == "mps" and self.gpu_mode == "cpu":
            raise ValueError("GTM_GPU_SHARING=mps shares NVIDIA GPUs: it needs GTM_GPU_MODE=nvml")
        return self

    @model_validator(mode="after")
    def _refuse_mps_on_a_swarm(self) -> Settings:
        if self.gpu_sharing == "mps" and self.runtime == "swarm":
            raise ValueError("GTM_GPU_SHARING=mps needs an IPC mode that Swarm services lack: use GTM_RUNTIME=docker")
        return self

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Settings:
        token = self.admin_token
        if self.environment == "production" and token is not None and len(token.get_secret_value()) < 24:
            raise ValueError("GTM_ADMIN_TOKEN must be at least 24 characters outside development")
        return self

    @property
    def effective_templates_dir(self) -> Path:
        """The console's templates: the repository's templates/ in a checkout, /opt/gtm/templates in the image."""
        if self.templates_dir is not None:
            return self.templates_dir
        checkout = Path(__file__).resolve().parents[1] / "templates"
        return checkout if checkout.is_dir() else Path("/opt/gtm/templates")

    @property
    def database_path(self) -> Path:
        return self.state_dir / "manager.db"

    @property
    def platform(self) -> Platform:
        """The platform the engines run on (``GTM_GPU_MODE``); GpuUnavailable when it is not set."""
        return platform_of(self.gpu_mode)

    @property
    def effective_engine_overhead(self) -> int:
        """Memory an engine needs beyond weights and KV cache: the setting, else the platform's
        (``Platform.engine_overhead``)."""
        if self.engine_overhead is not None:
            return self.engine_overhead
        return self.platform.engine_overhead

    @property
    def effective_kept_asleep(self) -> int:
        """What a sleeping tenant keeps of its device until its own is measured: ``GTM_KEPT_ASLEEP``,
        else the platform's figure (``Platform.kept_asleep``)."""
        return self.platform.kept_asleep(self.process_overhead, self.kept_asleep)


def describe(exc: ValidationError, prefix: str = "GTM_") -> str:
    """A refused setting as the admin wrote it: ``GTM_HEADROOM: size must be positive, got '-5'``."""
    parts = []
    for error in exc.errors():
        name = prefix + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else "settings"
        parts.append(f"{name}: {str(error['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)
