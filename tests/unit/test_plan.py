from dataclasses import replace

import pytest

from manager import names
from manager.control.enginefit import EngineFit, Terms, fit
from manager.control.modelfit import ModelFootprint
from manager.control.parsers import EngineParsers
from manager.control.plan import (
    TenantPlan,
    drain_plan,
    engine_args,
    identity,
    move_plan,
    mps_daemon_plan,
    mps_thread_percentage,
    node_agent_plan,
    prepare_plan,
)
from manager.control.plan import tenant_plan as plan_with
from manager.domain import TenantSpec
from manager.errors import InvalidInput
from manager.platform import gpu_memory_utilization
from manager.runtime.docker import container_kwargs
from manager.settings import Settings

G = 1024**3
M = 1024**2


DEMO = ModelFootprint("demo", parameters=0, weight_bytes=0, kv_bytes_per_token=1024)


def spec(**over: object) -> TenantSpec:
    base = TenantSpec(name="companya", port=30001, gpu_memory=2 * G, model="demo", max_model_len=512)
    return base.with_changes(**over)


def fitted(s: TenantSpec, settings: Settings) -> EngineFit:
    terms = Terms(
        settings.platform,
        settings.effective_engine_overhead,
        0,
        s.max_model_len,
        settings.min_kv_tokens,
        s.max_num_seqs,
    )
    return fit(s.gpu_memory, DEMO, terms)


def tenant_plan(s: TenantSpec, settings: Settings, device_total: int, *args: object, **kw: object) -> TenantPlan:
    """The plan with the split ``enginefit`` makes of the reservation (its own tests: test_enginefit)."""
    return plan_with(s, settings, device_total, fitted(s, settings), *args, **kw)  # type: ignore[arg-type]


def test_cpu_engine_is_hardened_and_limited(settings: Settings) -> None:
    plan = tenant_plan(spec(), settings, device_total=24 * G)
    e = plan.engine
    assert plan.network.internal is True
    assert e.network == "gtm-t-companya" and e.aliases == ["engine"]
    assert e.user == "1000:1000" and e.read_only and e.cap_drop == ["ALL"]
    assert e.security_opt == ["no-new-privileges:true"]
    assert e.mem_limit == 2 * G and e.pids_limit == 512 and e.gpu_device_ids is None
    assert not e.ports, "an engine is never published on the host"
    mounts = {m.target: (m.source, m.read_only, m.kind) for m in e.mounts}
    assert mounts == {"/data": ("gtm-t-companya-data", False, "volume"), "/models": ("gtm-models", True, "volume")}
    assert "/var/run/docker.sock" not in str(e)
    args = e.command
    split = fitted(spec(), settings)
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(split.kv_cache)
    assert args[args.index("--max-num-seqs") + 1] == str(split.max_num_seqs) == "128"
    assert args[args.index("--max-num-batched-tokens") + 1] == "2048"
    assert args[args.index("--max-model-len") + 1] == "512"
    assert "--gpu-memory-utilization" not in args


def test_nvml_engine_gets_its_fraction_of_the_gpu(settings: Settings) -> None:
    gpu = settings.model_copy(update={"gpu_mode": "nvml"})
    e = tenant_plan(spec(gpu_memory=10 * G, quantization="awq"), gpu, device_total=80 * G, gpu_uuid="GPU-1").engine
    assert e.command[e.command.index("--gpu-memory-utilization") + 1] == "0.1250"
    assert e.command[e.command.index("--quantization") + 1] == "awq"
    assert (
        e.gpu_device_ids == ["GPU-1"] and e.mem_limit == 4 * G
    )  # GTM_ENGINE_HOST_MEMORY; the demo weights are 0 bytes
    assert "--kv-cache-memory-bytes" not in e.command


def test_utilization_rounds_down_never_over_the_slice() -> None:
    assert gpu_memory_utilization(1, 3) == 0.3333
    with pytest.raises(InvalidInput):
        gpu_memory_utilization(81 * G, 80 * G)


def test_engine_hash_ignores_port_and_quotas_but_not_size() -> None:
    from manager.domain import Quotas

    a = spec()
    assert a.engine_hash() == spec(port=30009, quotas=Quotas(rpm_limit=5)).engine_hash()
    assert a.engine_hash() != spec(gpu_memory=3 * G).engine_hash()


def test_sdk_arguments_of_a_plan(settings: Settings) -> None:
    kw = container_kwargs(tenant_plan(spec(shm_size=5 * G), settings, device_total=24 * G).engine)
    assert kw["mem_limit"] == kw["memswap_limit"] == 2 * G
    assert kw["shm_size"] == 5 * G
    assert kw["read_only"] is True and kw["cap_drop"] == ["ALL"]
    assert kw["networking_config"] == {"gtm-t-companya": {"Aliases": ["engine"]}}
    assert kw["restart_policy"] == {"Name": "no"}
    assert kw["healthcheck"]["test"][0] == "CMD"
    assert kw["labels"]["org.gtm.tenant"] == "companya"
    assert "device_requests" not in kw and "ports" not in kw
    assert [(m["Target"], m["ReadOnly"]) for m in kw["mounts"]] == [("/data", False), ("/models", True)]


def test_the_health_probe_passes_on_a_200_only_and_an_engine_is_probed_every_2_s(settings: Settings) -> None:
    """The probe is bash over /dev/tcp (run here for real against a loopback server); engines are
    probed every 2 s, gateways every 5 s."""
    import http.server
    import socket
    import subprocess
    import threading
    import time

    from manager.control.plan import SECOND_NS, http_healthcheck

    answered: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()
            self.wfile.flush()
            for _ in range(2):  # the body, in two writes after the probe has read the status line:
                time.sleep(0.1)  # a probe that hung up then makes the second one raise
                self.wfile.write(b'{"status": "ok"}' * 100)
                self.wfile.flush()
            answered.append(self.path)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def probe(path: str, at: int = port) -> int:
        test = http_healthcheck(at, path, 30)["test"]
        assert isinstance(test, list) and test[:2] == ["CMD", "bash"]
        return subprocess.run(test[1:], capture_output=True, timeout=10, check=False).returncode

    try:
        assert probe("/health") == 0
        assert probe("/starting") != 0, "a 503"
        assert answered == ["/health", "/starting"], "each answer read whole"
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            assert probe("/health", unused.getsockname()[1]) != 0, "nothing listening"
    finally:
        server.shutdown()
        server.server_close()
    plan = tenant_plan(spec(), settings, device_total=24 * G)
    assert plan.engine.healthcheck and plan.engine.healthcheck["interval"] == 2 * SECOND_NS
    assert plan.gateway.healthcheck and plan.gateway.healthcheck["interval"] == 5 * SECOND_NS


def test_sdk_arguments_request_the_gpu(settings: Settings) -> None:
    gpu = settings.model_copy(update={"gpu_mode": "nvml"})
    kw = container_kwargs(tenant_plan(spec(gpu_memory=10 * G), gpu, device_total=80 * G, gpu_uuid="GPU-abc").engine)
    (req,) = kw["device_requests"]
    assert req["DeviceIDs"] == ["GPU-abc"] and req["Capabilities"] == [["gpu"]]


def test_control_network_has_no_outbound_route_in_the_plan_and_in_compose(settings) -> None:
    from pathlib import Path

    from manager.control.plan import CONTROL_BRIDGE, control_network_plan

    plan = control_network_plan(settings)
    assert plan.options == CONTROL_BRIDGE and not plan.internal  # published ports need a non-internal bridge
    compose = (Path(__file__).parents[2] / "compose" / "docker-compose.yml").read_text()
    ((key, value),) = CONTROL_BRIDGE.items()
    assert f'{key}: "{value}"' in compose


def test_the_warm_up_reads_the_engine_image_and_model_without_a_memory_limit(settings) -> None:
    from manager.control.plan import warmup_plan
    from manager.runtime.docker import container_kwargs

    plan = warmup_plan(settings, "demo")
    kwargs = container_kwargs(plan)
    assert kwargs["image"] == settings.engine_image and kwargs["network"] == "none"
    assert "mem_limit" not in kwargs  # a limit would evict what it reads
    assert kwargs["command"] == ["/models/demo"] and kwargs["entrypoint"][:2] == ["python3", "-c"]
    (mount,) = kwargs["mounts"]
    assert mount["Target"] == "/models" and mount["ReadOnly"] is True
    assert kwargs["read_only"] is True and kwargs["cap_drop"] == ["ALL"] and kwargs["user"] == "1000:1000"


def test_the_gguf_converter_runs_its_own_program_offline_writing_only_the_models_volume(settings) -> None:
    from manager.control.plan import convert_plan
    from manager.runtime.docker import container_kwargs

    kwargs = container_kwargs(convert_plan(settings, "smollm2", ".importing-smollm2"))
    assert kwargs["image"] == settings.converter_image and kwargs["network"] == "none"
    assert kwargs["entrypoint"][:2] == ["python3", "-c"] and "GgufConfig(dequantize=True)" in kwargs["entrypoint"][2]
    assert kwargs["command"] == ["/models/.importing-smollm2/source.gguf", "/models/.importing-smollm2/model"]
    (mount,) = kwargs["mounts"]
    assert mount["Target"] == "/models" and mount["ReadOnly"] is False
    assert kwargs["read_only"] is True and kwargs["cap_drop"] == ["ALL"] and kwargs["name"].endswith("-convert-smollm2")


def test_engine_options_as_vllm_spells_them(settings: Settings) -> None:
    default = tenant_plan(spec(), settings, device_total=24 * G).engine.command
    # no images for a text model's tenant, and never video or audio (vLLM's default is 999 of each)
    assert default[default.index("--limit-mm-per-prompt") + 1] == '{"image": 0, "video": 0, "audio": 0}'

    assert "--enable-prefix-caching" in default and "--no-enable-prefix-caching" not in default
    assert "--trust-remote-code" not in default and default.count("--max-num-seqs") == 1

    chosen = spec(max_images=1, enable_prefix_caching=False, trust_remote_code=True, max_num_seqs=8, gpu_memory=3 * G)
    args = tenant_plan(chosen, settings, device_total=24 * G).engine.command
    assert args[args.index("--limit-mm-per-prompt") + 1] == '{"image": 1, "video": 0, "audio": 0}'
    assert args[args.index("--mm-processor-cache-gb") + 1] == "0" and "--mm-processor-cache-gb" not in default
    assert "--no-enable-prefix-caching" in args and "--enable-prefix-caching" not in args
    assert "--trust-remote-code" in args
    assert args.count("--max-num-seqs") == 1 and args[args.index("--max-num-seqs") + 1] == "8"
    assert "--mm-processor-kwargs" not in args, "only a processor that resizes by pixels is told its limit"
    qwen = replace(fitted(chosen, settings), image_pixels=4_000_000)
    args = plan_with(chosen, settings, 24 * G, qwen).engine.command
    assert args[args.index("--mm-processor-kwargs") + 1] == '{"max_pixels": 4000000}'


def test_the_parsers_are_the_engines_flags(settings: Settings) -> None:
    s = spec(tool_call_parser="auto", reasoning_parser="qwen3")
    args = engine_args(s, settings, 24 * G, fitted(s, settings), EngineParsers("hermes", "qwen3"))
    assert args[-7:-2] == [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--tool-strict-level",
        "parameter",
    ]
    assert args[-2:] == ["--reasoning-parser", "qwen3"]
    assert "--tool-call-parser" not in engine_args(spec(), settings, 24 * G, fitted(spec(), settings))
    assert s.engine_hash() != spec().engine_hash(), "a parser change recreates the engine"


def test_engine_options_and_image_limits_recreate_the_engine() -> None:
    base = spec().engine_hash()
    changes: list[dict[str, object]] = [
        {"max_images": 2},
        {"max_image_pixels": 1_000_000},  # cpu mode: the engine's memory holds the decode
        {"enable_prefix_caching": False},
        {"trust_remote_code": True},
        {"max_num_seqs": 16},
    ]
    for change in changes:
        assert spec(**change).engine_hash() != base, change
    assert spec(max_body=1024**2).engine_hash() == base, "checked by the gateway only"


def test_a_cpu_gateway_serves_one_image_request_at_a_time(settings: Settings) -> None:
    cpu = tenant_plan(spec(), settings, device_total=24 * G).gateway
    gpu_settings = settings.model_copy(update={"gpu_mode": "nvml"})
    gpu = tenant_plan(spec(gpu_memory=10 * G), gpu_settings, device_total=80 * G).gateway
    assert cpu.env["GTM_GATEWAY_IMAGE_REQUESTS"] == "1" and gpu.env["GTM_GATEWAY_IMAGE_REQUESTS"] == "0"


def test_a_gpu_engine_runs_from_any_vllm_image(tmp_path) -> None:
    """What an engine needs to start in the upstream vllm/vllm-openai image: the server by module,
    a volume its user can write (given to uid 1000 before it starts) and works in (the image's own
    working directory is not writable by uid 1000), a user name for torch inductor's
    getpass.getuser(), caches in its volume, bounded threads and tasks, its GPU by UUID."""
    gpu = Settings(gpu_mode="nvml", state_dir=tmp_path)
    usable = 81920 * M - 870 * M  # an A100 80GB: NVML's total less the driver's reservation
    plan = tenant_plan(spec(gpu_memory=24 * G), gpu, device_total=usable, gpu_uuid="GPU-5f1c")
    e = plan.engine
    assert e.entrypoint == ["vllm", "serve"]
    assert e.user == "1000:1000" and e.gpu_device_ids == ["GPU-5f1c"]
    # its host RAM: what the host-RAM ledger counts, the process and the weights a sleeper pins
    assert e.mem_limit == gpu.engine_host_memory + fitted(spec(gpu_memory=24 * G), gpu).weights
    assert e.pids_limit == 4096 and container_kwargs(e)["working_dir"] == "/data"
    assert e.env["USER"] == e.env["LOGNAME"] == "vllm" and e.env["HOME"] == "/data"
    for cache in ("HF_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert e.env[cache].startswith("/data/"), cache
    assert e.env["OMP_NUM_THREADS"] == "4" and e.env["TORCHINDUCTOR_COMPILE_THREADS"] == "4"
    args = e.command
    util = float(args[args.index("--gpu-memory-utilization") + 1])
    assert util == int(24 * G / usable * 10_000) / 10_000  # a fraction of CUDA's total, as vLLM multiplies
    assert 24 * G - 10 * M < util * usable <= 24 * G
    assert args[args.index("--max-num-batched-tokens") + 1] == "2048"
    assert args[args.index("--max-num-seqs") + 1] == "128"
    many = spec(gpu_memory=24 * G, max_num_seqs=4096)
    tuned = tenant_plan(many, gpu, device_total=usable, gpu_uuid="GPU-5f1c").engine.command
    assert tuned.count("--max-num-seqs") == 1 and tuned[tuned.index("--max-num-batched-tokens") + 1] == "4096"

    prep = prepare_plan(spec(gpu_memory=24 * G), gpu)
    assert prep.image == e.image and prep.user == "0:0" and prep.cap_drop == ["ALL"] and prep.cap_add == ["CHOWN"]
    assert prep.network == "none" and [(m.source, m.target) for m in prep.mounts] == [("gtm-t-companya-data", "/data")]
    assert "os.chown('/data', 1000, 1000)" in prep.entrypoint[-1] and "/data/.owner" in prep.entrypoint[-1]
    assert container_kwargs(prep)["cap_add"] == ["CHOWN"]


def test_the_cpu_engine_gets_the_same_volume_and_user_steps(settings: Settings) -> None:
    e = tenant_plan(spec(), settings, device_total=24 * G).engine
    assert e.entrypoint == ["python3", "-m", "vllm.entrypoints.openai.api_server"]  # the CPU wheel has no `vllm` CLI
    assert e.env["USER"] == "vllm" and "OMP_NUM_THREADS" not in e.env  # the CPU backend binds its own threads
    assert e.command.count("--max-num-batched-tokens") == 1 and e.command.count("--max-num-seqs") == 1
    assert container_kwargs(e).get("cap_add") is None


def test_moving_a_gpu_tenant_replaces_its_engine_and_cpu_hashes_stay(settings: Settings) -> None:
    gpu = settings.model_copy(update={"gpu_mode": "nvml"})
    ten = spec(gpu_memory=10 * G)
    one = tenant_plan(ten, gpu, 80 * G, "GPU-a", image_ids={gpu.engine_image: "sha256:1"}).engine
    two = tenant_plan(ten, gpu, 80 * G, "GPU-b", image_ids={gpu.engine_image: "sha256:1"}).engine
    assert one.labels[names.SPEC_HASH] != two.labels[names.SPEC_HASH]
    cpu = tenant_plan(spec(), settings, 24 * G, image_ids={settings.engine_image: "sha256:1"}).engine
    assert cpu.labels[names.SPEC_HASH] == identity(spec().engine_hash(), "sha256:1")  # what older releases labelled


def test_engines_share_the_cpus_by_reservation_or_by_the_admins_weight(settings: Settings) -> None:
    """Docker CPU shares (cgroup v2 cpu.weight): they divide the CPUs only while engines contend."""
    from manager.runtime.docker import container_kwargs

    default = tenant_plan(spec(gpu_memory=1536 * M), settings, device_total=24 * G).engine
    bigger = tenant_plan(spec(gpu_memory=10 * G), settings, device_total=24 * G).engine
    chosen = tenant_plan(spec(gpu_memory=1536 * M, cpu_weight=3000), settings, device_total=24 * G).engine
    assert container_kwargs(default)["cpu_shares"] == 1536 and container_kwargs(bigger)["cpu_shares"] == 10240
    assert container_kwargs(chosen)["cpu_shares"] == 3000
    assert spec(cpu_weight=3000).engine_hash() != spec().engine_hash() == spec(cpu_weight=None).engine_hash()


def test_an_encrypted_tenants_engine_binds_its_volumes_data_and_has_no_docker_volume(settings: Settings) -> None:
    plan = tenant_plan(spec(volume="encrypted"), settings, device_total=24 * G)
    mounts = {m.target: (m.source, m.kind) for m in plan.engine.mounts}
    source = str(settings.volumes_dir / settings.instance / "companya" / "data")
    assert mounts["/data"] == (source, "bind") and plan.volume is None
    assert container_kwargs(plan.engine)["mounts"][0]["Type"] == "bind"
    prep = prepare_plan(spec(volume="encrypted"), settings)
    assert [(m.source, m.target) for m in prep.mounts] == [(source, "/data")]
    assert plan.engine.cap_drop == ["ALL"] and plan.engine.read_only  # as hardened as a plain tenant's


def test_the_copy_into_an_encrypted_volume_reads_the_docker_volume_and_marks_the_end(settings: Settings) -> None:
    job = move_plan(spec(volume="encrypted"), settings, ".moved")
    mounts = {m.target: (m.source, m.read_only) for m in job.mounts}
    assert mounts["/from"] == ("gtm-t-companya-data", True) and mounts["/to"][0].endswith("/companya/data")
    assert job.network == "none" and job.user == "0:0" and job.cap_drop == ["ALL"]
    assert job.entrypoint[-1].startswith("cp -a /from/. /to/ && ") and job.entrypoint[-1].endswith(
        "touch /to/.moved && sync"
    )


def test_under_mps_an_engine_is_a_client_of_its_devices_daemon_capped_at_what_admission_counted(tmp_path) -> None:
    """GTM_GPU_SHARING=mps: the engine joins the IPC namespace of its device's control daemon,
    whose pipe is in the /dev/shm they share; its memory cap is its reservation and the
    per-process overhead (what the ledger counts for it, in whole MiB); its share of the SMs is
    its reservation's share of the device, rounded up; its KV cache is given in bytes, so its
    budget does not hang on the total CUDA reports under a cap."""
    mps = Settings(gpu_mode="nvml", state_dir=tmp_path, gpu_sharing="mps")
    usable = 81920 * M - 870 * M
    s = spec(gpu_memory=10 * G + 5)
    e = tenant_plan(s, mps, device_total=usable, gpu_uuid="GPU-5f1c").engine
    daemon = mps_daemon_plan(mps, "GPU-5f1c")
    assert e.ipc_mode == f"container:{daemon.name}" and container_kwargs(e)["ipc_mode"] == e.ipc_mode
    assert e.shm_size is None, "an MPS client shares its daemon's /dev/shm"
    assert e.env["CUDA_MPS_PIPE_DIRECTORY"] == daemon.env["CUDA_MPS_PIPE_DIRECTORY"] == "/dev/shm/nvidia-mps"
    counted = (10 * G + 5 + mps.process_overhead) // M
    assert e.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={counted}M"
    assert e.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "13"  # 10 GiB of 79.15: 12.6%, rounded up
    args = e.command
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(fitted(s, mps).kv_cache)
    assert "--gpu-memory-utilization" in args  # still vLLM's start-up check of free memory
    plain = tenant_plan(s, mps.model_copy(update={"gpu_sharing": "none"}), usable, gpu_uuid="GPU-5f1c").engine
    assert plain.ipc_mode is None and plain.shm_size == s.shm_size and "CUDA_MPS_PIPE_DIRECTORY" not in plain.env
    assert "--kv-cache-memory-bytes" not in plain.command
    assert plain.labels[names.SPEC_HASH] != e.labels[names.SPEC_HASH], "turning MPS on or off replaces the engine"
    bigger = tenant_plan(spec(gpu_memory=20 * G), mps, usable, gpu_uuid="GPU-5f1c").engine
    assert bigger.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "26"
    assert mps_thread_percentage(1, usable) == 1 and mps_thread_percentage(usable, usable) == 100


def test_the_mps_daemon_is_hardened_and_named_by_its_device(tmp_path) -> None:
    mps = Settings(gpu_mode="nvml", state_dir=tmp_path, gpu_sharing="mps")
    d = mps_daemon_plan(mps, "MIG-GPU-5f1c/1/0")
    assert d.name == "gtm-mps-MIG-GPU-5f1c-1-0" and d.labels[names.DEVICE] == "MIG-GPU-5f1c/1/0"
    assert d.gpu_device_ids == ["MIG-GPU-5f1c/1/0"] and d.network == "none" and d.ipc_mode == "shareable"
    assert d.user == "1000:1000", "the engines' user: MPS serves one user's clients on a device at a time"
    assert d.cap_drop == ["ALL"] and d.read_only and d.restart_policy == "unless-stopped"
    assert d.entrypoint is not None and "nvidia-cuda-mps-control -f" in d.entrypoint[-1]
    assert d.healthcheck is not None and "get_server_list" in str(d.healthcheck["test"])
    kwargs = container_kwargs(d)
    assert kwargs["ipc_mode"] == "shareable" and kwargs["shm_size"] == d.shm_size


def test_mps_is_refused_without_gpus(tmp_path) -> None:
    with pytest.raises(ValueError, match="GTM_GPU_SHARING=mps"):
        Settings(gpu_mode="cpu", state_dir=tmp_path, gpu_sharing="mps")
    with pytest.raises(ValueError, match="use GTM_RUNTIME=docker"):  # Swarm services take no IPC mode
        Settings(gpu_mode="nvml", state_dir=tmp_path, gpu_sharing="mps", runtime="swarm")
    cpu = Settings(gpu_mode="cpu", state_dir=tmp_path)
    assert "CUDA_MPS_PIPE_DIRECTORY" not in tenant_plan(spec(), cpu, device_total=24 * G).engine.env


def test_the_node_agent_reads_its_node_read_only_and_publishes_nothing(settings: Settings, tmp_path) -> None:
    a = node_agent_plan(settings, "agent-token", image_id="sha256:1")
    assert a.name == "gtm-node-agent" and a.command == ["node-agent"] and a.image == settings.manager_image
    assert a.network == "gtm-control" and not a.ports, "served on the control overlay only"
    (socket,) = a.mounts
    assert (socket.kind, socket.source, socket.read_only) == ("bind", "/var/run/docker.sock", True)
    assert a.read_only and a.cap_drop == ["ALL"] and a.mem_limit and a.pids_limit
    assert a.healthcheck and "/dev/tcp/127.0.0.1/8002 " in a.healthcheck["test"][-1], "its own port"
    assert "GET /healthz " in a.healthcheck["test"][-1], "its own check, not the manager image's"
    assert a.env["GTM_AGENT_TOKEN"] == "agent-token" and a.env["GTM_GPU_MODE"] == "cpu"
    assert "NVIDIA_VISIBLE_DEVICES" not in a.env
    gpu = node_agent_plan(Settings(gpu_mode="nvml", state_dir=tmp_path), "agent-token")
    assert gpu.env["NVIDIA_DRIVER_CAPABILITIES"] == "utility", "NVML only: no compute context on any GPU"
    # a new image or token replaces the agents; the same plan does not
    same = node_agent_plan(settings, "agent-token", image_id="sha256:1").labels[names.SPEC_HASH]
    assert same == a.labels[names.SPEC_HASH]
    assert node_agent_plan(settings, "agent-token", image_id="sha256:2").labels[names.SPEC_HASH] != same
    assert node_agent_plan(settings, "other-token", image_id="sha256:1").labels[names.SPEC_HASH] != same


def test_on_a_swarm_the_engine_and_gateway_run_on_the_devices_node(settings: Settings) -> None:
    here = tenant_plan(spec(), settings, device_total=24 * G)
    there = tenant_plan(spec(), settings, device_total=24 * G, node="n2id")
    assert (here.engine.node, here.gateway.node) == (None, None), "one host: no constraint, hashes as before"
    assert (there.engine.node, there.gateway.node) == ("n2id", "n2id"), "the port is published where the engine runs"
    for role in ("engine", "gateway"):  # placed on another node: new containers there
        assert getattr(here, role).labels[names.SPEC_HASH] != getattr(there, role).labels[names.SPEC_HASH]
    again = tenant_plan(spec(), settings, device_total=24 * G, node="n2id")
    assert again.engine.labels == there.engine.labels and again.gateway.labels == there.gateway.labels
    assert there.gateway.labels[names.NODE] == "n2id" and names.NODE not in here.gateway.labels, "where its spool is"
    assert there.engine.reserved == spec().gpu_memory, "held in Swarm's own accounting too"
    assert "reserved" not in repr(there.engine), "an engine's identity stays as it was"


def test_a_spool_left_on_a_node_is_read_there_by_its_gateways_user_without_network(settings: Settings) -> None:
    plan = drain_plan(settings, "acme", "n2id", {"s1": 7})
    gateway = tenant_plan(spec(), settings, device_total=24 * G, node="n2id").gateway
    assert plan.node == "n2id" and plan.network == "none" and plan.user == gateway.user
    assert plan.image == settings.manager_image and plan.command[0] == "drain-spool"
    assert plan.command[plan.command.index("--cursors") + 1] == '{"s1": 7}'
    assert [(m.source, m.target) for m in plan.mounts] == [(names.gateway_volume(settings.instance, "acme"), "/data")]
