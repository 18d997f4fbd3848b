"""The Helm chart (deploy/helm/tandem), offline.

Helm's own engine (helm-python-sdk: the Go library, in process) renders and lints the chart
for the default values, the multi-node example (2 prefill pools, 4 decode pools), external
etcd, the ingress, and a CPU-only variant. For each of them:
  - every manifest passes `kubernetes-validate` (strict: unknown fields fail) against the
    oldest and the newest Kubernetes it ships schemas for, from 1.31 on; the one custom
    resource (ServiceMonitor) against a schema of the fields the chart uses, written here;
  - the manifests refer to each other consistently (selectors, named ports, volumes,
    ConfigMap and Secret names, the ServiceMonitor's Services);
  - each Tandem container's command line, with Kubernetes' $(VAR) expansion from its env,
    parses with the CLI's own parser (`tandem_cli.args.build_parser`) and passes the
    argument-level checks that need no filesystem or network (etcd endpoints, port ranges,
    EngineConfig / RouterConfig construction, the cluster token through `resolve_token`).
Each template-time `fail` rule (templates/_validate.tpl) and a set of schema rejections
(values.schema.json) have a case. When an `etcd` binary is installed, the bundled etcd's
rendered flags start a real etcd, and the rendered router/prefill/decode command lines, run
as processes on loopback (tiny model, CPU), serve a completion to the openai client with the
API key from the Secret, their probe endpoints answering. The image: tests/test_dockerfile.py.
"""
from __future__ import annotations

import base64
import json
import re
import shlex
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from dockerfile import dockerfile_entrypoint, dockerfile_user  # noqa: E402
from engine.cluster_auth import resolve_token  # noqa: E402
from tandem_cli.args import build_parser, engine_config_from_args, router_config_from_args  # noqa: E402
from tandem_cli.checks import check_etcd, check_port_range  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "tandem"
RELEASE, NAMESPACE = "llm", "serving"
POD_IP = "10.244.3.17"

EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
SCENARIOS: dict[str, dict] = {
    "default": {},
    **{path.stem: yaml.safe_load(path.read_text()) for path in EXAMPLES},
    "cpu": {"engine": {"loadFormat": "dummy", "maxNumSeqs": 8, "numPages": 1048576},
            "prefill": {"gpus": 0, "tolerations": []},
            "decode": {"gpus": 0, "tolerations": [], "extraArgs": ["--no-async-scheduling",
                                                                   "--request-trace-file=/tmp/requests.jsonl"]},
            "router": {"maxQueuedRequests": -1, "queueTimeout": 2.5, "maxRequestBytes": 1048576},
            "serviceMonitor": {"enabled": True}},
}


# ---- rendering -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_docs(chart, values: dict) -> list[dict]:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(out.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    return {name: render_docs(chart, values) for name, values in SCENARIOS.items()}


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def render_error(chart, values) -> str:
    with pytest.raises(helm.HelmError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(info.value)


# ---- Kubernetes validity -----------------------------------------------------------------


def k8s_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions
    from packaging.version import Version

    current = [v for v in all_versions() if Version(v) >= Version("1.31")]
    assert current, f"kubernetes-validate ships no schemas for 1.31 or later: {all_versions()}"
    return sorted({current[0], current[-1]}, key=Version)


# The fields of monitoring.coreos.com/v1 ServiceMonitor that the chart writes (kubernetes-validate
# has no schema for custom resources); unknown fields fail, like the strict core schemas.
_LABEL_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "labels": _LABEL_MAP}},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchLabels": _LABEL_MAP}},
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "matchNames": {"type": "array", "items": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["port"], "additionalProperties": False, "properties": {
                             "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                             "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}}}}}}},
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lint(scenario):
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE,
                       kube_version="v" + k8s_versions()[0])
    assert not report["errors"], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_manifests_validate(rendered, scenario):
    import jsonschema

    docs = rendered[scenario]
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    for doc in docs:
        where = f"{scenario}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ServiceMonitor":
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):   # so nothing else is skipped
                kubernetes_validate.validate(doc, k8s_versions()[-1], strict=True)
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
            continue
        for version in k8s_versions():
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not valid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
        assert doc["metadata"].get("namespace") in (None, NAMESPACE), where


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_manifests_refer_to_each_other(rendered, scenario):
    docs = rendered[scenario]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    pods = {w["metadata"]["name"]: w["spec"]["template"] for w in workloads(docs)}
    for w in workloads(docs):
        name, tmpl = w["metadata"]["name"], w["spec"]["template"]
        assert matches(w["spec"]["selector"]["matchLabels"], tmpl["metadata"]["labels"]), name
        # no workload's selector takes another's pods
        owners = [o["metadata"]["name"] for o in workloads(docs)
                  if matches(o["spec"]["selector"]["matchLabels"], tmpl["metadata"]["labels"])]
        assert owners == [name], f"pods of {name} are selected by {owners}"
        spec = tmpl["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{name}/{c['name']} has no {probe}"
                action = c[probe].get("httpGet") or c[probe].get("tcpSocket")
                assert action["port"] in ports, f"{name}: {probe} on unknown port {action['port']}"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in {t["metadata"]["name"] for t in
                                                             w["spec"].get("volumeClaimTemplates", [])}, m
            for src in c.get("envFrom", []):
                one(docs, "ConfigMap", src["configMapRef"]["name"])
        for v in volumes.values():
            if "secret" in v:
                secret = v["secret"]["secretName"]
                given = [SCENARIOS[scenario].get("clusterToken", {}).get("existingSecret")]
                if secret not in given:
                    data = one(docs, "Secret", secret)["data"]
                    assert {i["key"] for i in v["secret"].get("items", [])} <= set(data), v
    for svc in of_kind(docs, "Service"):
        backs = [n for n, t in pods.items() if matches(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert backs, f"Service {svc['metadata']['name']} selects no pods"
        for n in backs:
            names_ = {p["name"] for c in pods[n]["spec"]["containers"] for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in names_, f"{svc['metadata']['name']}: {p['targetPort']} not on {n}"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        covered = [n for n, t in pods.items() if matches(pdb["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])]
        assert covered == [pdb["metadata"]["name"]], f"PDB {pdb['metadata']['name']} covers {covered}"
    for sts in of_kind(docs, "StatefulSet"):
        assert one(docs, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    for ing in of_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = one(docs, "Service", backend["name"])
                assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    for sm in of_kind(docs, "ServiceMonitor"):
        scraped = [s for s in of_kind(docs, "Service") if matches(sm["spec"]["selector"]["matchLabels"],
                                                                  s["metadata"]["labels"])]
        components = sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped)
        assert components == ["decode", "prefill", "router"], components
        ports = {p["name"] for s in scraped for p in s["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    for np in of_kind(docs, "NetworkPolicy"):
        guarded = [n for n, t in pods.items() if matches(np["spec"]["podSelector"]["matchLabels"], t["metadata"]["labels"])]
        assert guarded == [f"{RELEASE}-tandem-etcd"]
        allowed = np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        assert all(matches(allowed, t["metadata"]["labels"]) for t in pods.values()), "a Tandem pod cannot reach etcd"


# ---- command lines -------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command and args: $(VAR) from the container's env, $$ -> $;
    an undefined $(VAR) stays as it is."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def secret_value(docs, name: str, key: str) -> str:
    found = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    if found:
        return base64.b64decode(found[0]["data"][key]).decode()
    return f"value-of-{name}-{key}"   # a Secret the user manages


def container_env(docs, pod_name: str, container: dict, pod_ip: str = POD_IP) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(one(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    fields = {"status.podIP": pod_ip, "metadata.name": f"{pod_name}-7d4b9-x2x8q"}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret_value(docs, ref["name"], ref["key"])
    return env


def tandem_containers(docs):
    for w in workloads(docs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            if c["name"] in ("router", "prefill", "decode"):
                yield w, c


def command_line(docs, workload, container, env: dict[str, str] | None = None) -> list[str]:
    env = container_env(docs, workload["metadata"]["name"], container) if env is None else env
    argv = [expand(a, env) for a in container["command"] + container["args"]]
    assert not [a for a in argv if "$(" in a], f"unexpanded variables in {argv}"
    return argv


def parse(argv: list[str]):
    assert argv[0] == dockerfile_entrypoint()[0] == "tandem"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"`tandem` refuses the rendered command line (exit {exc.code}): {shlex.join(argv)}")


def mounted_file(docs, workload, container, path: str) -> tuple[str, str]:
    """(Secret name, key) of the secret volume item mounted at `path` in `container`."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for m in container["volumeMounts"]:
        vol = volumes[m["name"]]
        if "secret" in vol and path.startswith(m["mountPath"].rstrip("/") + "/"):
            rel = path[len(m["mountPath"].rstrip("/")) + 1:]
            items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])}
            return vol["secret"]["secretName"], items.get(rel, rel)
    pytest.fail(f"nothing mounts {path} in {workload['metadata']['name']}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A config.json RouterConfig can read (its max_model_len), no weights."""
    from engine.tiny_models import tiny_config_dict

    path = tmp_path_factory.mktemp("model")
    config = tiny_config_dict("llama", 256, 1, 2, 0)
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_command_lines_parse_and_pass_checks(rendered, scenario, model_dir, tmp_path):
    docs = rendered[scenario]
    shared = one(docs, "ConfigMap", f"{RELEASE}-tandem-shared")["data"]
    seen = set()
    for w, c in tandem_containers(docs):
        argv = command_line(docs, w, c)
        args = parse(argv)
        seen.add(args.command)
        assert args.command == c["name"]
        assert args.etcd == shared["TANDEM_ETCD"] and args.etcd_prefix == shared["TANDEM_ETCD_PREFIX"]
        check_etcd(args.etcd)
        check_port_range("--port", args.port)
        assert args.port in {p["containerPort"] for p in c["ports"]}
        # the cluster token: the file the flag names is the Secret's key, and the CLI's reader takes it
        secret, key = mounted_file(docs, w, c, args.cluster_token_file)
        token_file = tmp_path / f"{w['metadata']['name']}-token"
        token_file.write_text(secret_value(docs, secret, key))
        token = resolve_token(str(token_file))
        if args.command == "router":
            assert args.model == shared["TANDEM_MODEL"]
            config = router_config_from_args(args, str(model_dir), token)
            assert config.etcd_endpoints == tuple(shared["TANDEM_ETCD"].split(","))
            assert config.port == args.port and config.host == "0.0.0.0"
            continue
        assert args.advertise_host == POD_IP
        assert args.metrics_port in {p["containerPort"] for p in c["ports"] if p["name"] == "metrics"}
        check_port_range("--metrics-port", args.metrics_port)
        config = engine_config_from_args(args)
        assert (config.model, config.dtype, config.page_size, config.kv_transfer_backend) == (
            shared["TANDEM_MODEL"], shared["TANDEM_DTYPE"], int(shared["TANDEM_BLOCK_SIZE"]),
            shared["TANDEM_KV_TRANSFER_BACKEND"])
        assert config.role == args.command
        gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        assert config.device == ("cuda" if gpus else "cpu")
    assert seen == {"router", "prefill", "decode"}


def test_values_reach_the_flags(rendered):
    cpu = {c["name"]: parse(command_line(rendered["cpu"], w, c)) for w, c in tandem_containers(rendered["cpu"])}
    assert cpu["decode"].load_format == cpu["prefill"].load_format == "dummy"
    assert cpu["decode"].num_pages == 1048576 and cpu["decode"].max_num_seqs == 8   # integers, not 1.048576e+06
    assert cpu["decode"].async_scheduling is False and cpu["decode"].request_trace_file == "/tmp/requests.jsonl"
    assert cpu["prefill"].async_scheduling is True   # extraArgs are per role
    r = cpu["router"]
    assert (r.max_queued_requests, r.queue_timeout, r.max_request_bytes) == (-1, 2.5, 1048576)

    ingress = {c["name"]: parse(command_line(rendered["ingress"], w, c))
               for w, c in tandem_containers(rendered["ingress"])}
    assert ingress["router"].api_key == "value-of-llm-api-key-api-key"   # from the Secret, via $(TANDEM_API_KEY)
    assert ingress["router"].served_model_name == ["qwen", "default"]
    assert cpu["router"].api_key is None

    multi = {}
    for w, c in tandem_containers(rendered["multi-node"]):
        multi[w["metadata"]["name"]] = parse(command_line(rendered["multi-node"], w, c))
    prefix = f"{RELEASE}-tandem-"
    assert sorted(multi) == sorted([prefix + "router"] + [prefix + f"prefill-{p}" for p in "ab"]
                                   + [prefix + f"decode-{p}" for p in "abcd"])
    assert {a.kv_transfer_backend for n, a in multi.items() if "router" not in n} == {"nixl"}
    assert {a.dtype for n, a in multi.items() if "router" not in n} == {"bfloat16"}
    assert [n for n, a in multi.items() if getattr(a, "enforce_eager", False)] == [prefix + "decode-d"]
    assert {a.max_num_batched_tokens for n, a in multi.items() if "-prefill-" in n} == {16384}
    assert multi[prefix + "router"].api_key == "value-of-tandem-api-key-api-key"


# ---- resources, scheduling, membership ---------------------------------------------------------


def pod_spec(docs, name):
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]


def test_gpu_rdma_hugepages_and_shm(rendered):
    spec = pod_spec(rendered["default"], f"{RELEASE}-tandem-decode-main")
    res = spec["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
    assert not any(k.startswith(("hugepages-", "rdma/")) for k in res["limits"])

    spec = pod_spec(rendered["multi-node"], f"{RELEASE}-tandem-prefill-b")
    res = spec["containers"][0]["resources"]
    assert res["limits"]["rdma/rdma_shared_device_a"] == res["requests"]["rdma/rdma_shared_device_a"] == 1
    assert res["limits"]["hugepages-2Mi"] == res["requests"]["hugepages-2Mi"] == "2Gi"
    assert next(v for v in spec["volumes"] if v["name"] == "hugepages")["emptyDir"]["medium"] == "HugePages-2Mi"
    assert spec["nodeSelector"] == {"pool": "prefill-b"}
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"]["claimName"] == "models"

    spec = pod_spec(rendered["cpu"], f"{RELEASE}-tandem-prefill-main")
    assert "nvidia.com/gpu" not in json.dumps(spec)


def test_single_gpu_mode_shares_one_gpu_under_the_device_plugins_mps(chart, rendered):
    """examples/single-gpu.yaml: both workers ask for one MPS replica and get their SM share;
    the device plugin provides /dev/shm; prefill pods go where a decode pod runs."""
    specs = {role: pod_spec(rendered["single-gpu"], f"{RELEASE}-tandem-{role}-main") for role in ("prefill", "decode")}
    for role, spec in specs.items():
        c = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50", role
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert not any(v["name"] == "shm" for v in spec["volumes"])
        assert not any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
    (term,) = specs["prefill"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "decode"
    assert "affinity" not in specs["decode"]
    # the plugin's renamed resource, and a split under a cap of 100 / 2 per replica
    docs = render_docs(chart, {"singleGpu": {"enabled": True, "resourceName": "nvidia.com/gpu.shared",
                                             "prefillSmFraction": 0.5}})
    c = pod_spec(docs, f"{RELEASE}-tandem-decode-main")["containers"][0]
    assert c["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu.shared": 1}
    # off (the default): no MPS variable, the chart's own /dev/shm
    spec = pod_spec(rendered["default"], f"{RELEASE}-tandem-prefill-main")
    assert "CUDA_MPS" not in json.dumps(spec) and any(v["name"] == "shm" for v in spec["volumes"])


def test_pods_run_unprivileged(rendered):
    user = dockerfile_user()
    for scenario, docs in rendered.items():
        for w in workloads(docs):
            spec = w["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["runAsUser"] == user, "the chart's uid is the image's"
            assert spec["automountServiceAccountToken"] is False
            for c in spec["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
                writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
                if c["name"] != "etcd":   # what the libraries write goes to volumes
                    shared = one(docs, "ConfigMap", f"{RELEASE}-tandem-shared")["data"]
                    for var in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
                        assert any(shared[var].startswith(p) for p in writable), (var, writable)


def test_membership_bundled_or_external(rendered):
    bundled = rendered["default"]
    sts = one(bundled, "StatefulSet", f"{RELEASE}-tandem-etcd")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "quay.io/coreos/etcd:v3.5.21"
    client = one(bundled, "Service", f"{RELEASE}-tandem-etcd")
    endpoint = one(bundled, "ConfigMap", f"{RELEASE}-tandem-shared")["data"]["TANDEM_ETCD"]
    assert endpoint == f"{RELEASE}-tandem-etcd.{NAMESPACE}.svc:{client['spec']['ports'][0]['port']}"

    external = rendered["etcd-external"]
    assert not of_kind(external, "StatefulSet") and not of_kind(external, "NetworkPolicy")
    shared = one(external, "ConfigMap", f"{RELEASE}-tandem-shared")["data"]
    assert shared["TANDEM_ETCD"] == ",".join(SCENARIOS["etcd-external"]["etcd"]["endpoints"])
    assert shared["TANDEM_ETCD_PREFIX"] == "/tandem/llm"


def test_cluster_token_secret(chart, rendered):
    secret = one(rendered["default"], "Secret", f"{RELEASE}-tandem-cluster-token")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    # every Tandem container of the release mounts the same one
    mounted = {mounted_file(rendered["default"], w, c, "/etc/tandem/cluster-token/token")
               for w, c in tandem_containers(rendered["default"])}
    assert mounted == {(f"{RELEASE}-tandem-cluster-token", "token")}

    docs = render_docs(chart, {"clusterToken": {"existingSecret": "ops-token", "key": "secret"}})
    assert not of_kind(docs, "Secret")
    mounted = {mounted_file(docs, w, c, "/etc/tandem/cluster-token/token") for w, c in tandem_containers(docs)}
    assert mounted == {("ops-token", "secret")}


def test_shared_config_rolls_pods(chart, rendered):
    """A change of a shared setting changes every Tandem pod template (a rollout), nothing else does."""
    def checksums(docs):
        return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["annotations"]["checksum/shared"]
                for w, _ in tandem_containers(docs)}

    before = checksums(rendered["default"])
    assert len(set(before.values())) == 1
    after = checksums(render_docs(chart, {"engine": {"blockSize": 32}}))
    assert after.keys() == before.keys() and not set(after.values()) & set(before.values())
    assert checksums(render_docs(chart, {"router": {"replicas": 3}})) == before


def test_bundled_etcd_flags_start_a_real_etcd(rendered, tmp_path):
    """The rendered etcd flags, with the pod's DNS name as localhost and free ports, make a
    working single-node etcd (the local binary may be older than the image: same flags)."""
    from etcd_server import EtcdServer, find_etcd

    binary = find_etcd()
    if binary is None:
        pytest.skip("no etcd binary (Debian: etcd-server)")
    sts = one(rendered["default"], "StatefulSet", f"{RELEASE}-tandem-etcd")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    env = {"POD_NAME": f"{sts['metadata']['name']}-0"}
    pod_dns = f"{env['POD_NAME']}.{sts['spec']['serviceName']}.{NAMESPACE}.svc"
    ports = {}
    for p in c["ports"]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[p["containerPort"]] = s.getsockname()[1]
    argv = []
    for arg in c["args"]:
        arg = expand(arg, env).replace(pod_dns, "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
        for old, new in ports.items():
            arg = re.sub(rf":{old}\b", f":{new}", arg)
        argv.append(arg.replace("/var/lib/etcd", str(tmp_path)))
    assert not [a for a in argv if "$(" in a]
    proc = subprocess.Popen([binary, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=EtcdServer._env())
    try:
        health = f"http://127.0.0.1:{ports[2379]}{c['readinessProbe']['httpGet']['path']}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"etcd exited: {proc.stderr.read().decode()[-2000:]}"
            try:
                with urllib.request.urlopen(health, timeout=1) as resp:
                    assert json.loads(resp.read())["health"] == "true"
                    break
            except OSError:
                assert time.monotonic() < deadline, "etcd's /health did not answer in 30 s"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)


def test_rendered_command_lines_make_a_serving_cluster(chart, tmp_path):
    """The rendered router, prefill and decode command lines, run as processes on loopback with
    a real etcd (external mode) and a tiny model on the CPU, form a cluster: the endpoints the
    probes use answer, the workers register, and the openai client gets a completion with the
    API key from the Secret. Substituted, as a pod would differ: the pod IP (127.0.0.1), the
    bind address (loopback, not 0.0.0.0), the token file and cache directories (tmp_path)."""
    from etcd_server import EtcdServer, find_etcd

    from engine.tiny_models import make_tiny_model
    from tandem_cli.procs import free_port, stop_all, wait_members

    if find_etcd() is None:
        pytest.skip("no etcd binary (Debian: etcd-server)")
    openai = pytest.importorskip("openai")
    model = make_tiny_model(tmp_path / "model", arch="llama", seed=3)
    ports = [free_port() for _ in range(5)]
    values = {"engine": {"model": str(model), "dtype": "float32", "blockSize": 4, "numPages": 128},
              "model": {"servedModelNames": ["tiny"]}, "apiKey": {"existingSecret": "llm-api-key"},
              "router": {"port": ports[0]},
              "prefill": {"gpus": 0, "port": ports[1], "metricsPort": ports[2]},
              "decode": {"gpus": 0, "port": ports[3], "metricsPort": ports[4]}}
    etcd = EtcdServer(tmp_path / "etcd").start()
    procs: dict[str, subprocess.Popen] = {}
    try:
        values["etcd"] = {"mode": "external", "endpoints": [etcd.endpoint]}
        docs = render_docs(chart, values)
        token_path = "/etc/tandem/cluster-token/token"
        token_file = tmp_path / "token"
        token_file.write_text(secret_value(docs, *mounted_file(docs, *next(tandem_containers(docs)), token_path)))
        token_file.chmod(0o600)
        containers = {c["name"]: (w, c) for w, c in tandem_containers(docs)}
        for role in ("decode", "prefill", "router"):
            w, c = containers[role]
            env = container_env(docs, w["metadata"]["name"], c, pod_ip="127.0.0.1")
            for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR"):
                env[var] = str(tmp_path / "cache" / var.lower())
            argv = [a.replace(token_path, str(token_file)).replace("--host=0.0.0.0", "--host=127.0.0.1")
                    for a in command_line(docs, w, c, env)]
            run_env = {k: v for k, v in os.environ.items() if k != "TANDEM_CLUSTER_TOKEN"}
            run_env.update(env, OMP_NUM_THREADS="1")
            with open(tmp_path / f"{role}.log", "w") as log:
                procs[role] = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", *argv[1:]], cwd=ROOT,
                                               env=run_env, stdout=log, stderr=subprocess.STDOUT)
        probes = {}
        for role in ("decode", "prefill", "router"):
            c = containers[role][1]
            named = {p["name"]: p["containerPort"] for p in c["ports"]}
            probe = c["readinessProbe"]["httpGet"]
            probes[role] = f"http://127.0.0.1:{named[probe['port']]}{probe['path']}"
            live = c["livenessProbe"]
            deadline = time.monotonic() + 120
            while True:
                assert procs[role].poll() is None, (tmp_path / f"{role}.log").read_text()[-3000:]
                try:
                    with urllib.request.urlopen(probes[role], timeout=1) as resp:
                        assert resp.status == 200
                        break
                except OSError:
                    assert time.monotonic() < deadline, f"{role}: {probes[role]} did not answer"
                    time.sleep(0.3)
            if "tcpSocket" in live:
                socket.create_connection(("127.0.0.1", named[live["tcpSocket"]["port"]]), timeout=2).close()
        wait_members(probes["router"], 2, procs["router"], 60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[0]}/v1",
                               api_key=secret_value(docs, "llm-api-key", "api-key"))
        out = client.completions.create(model="tiny", prompt="hello there", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 and out.choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="wrong").models.list()
    finally:
        stop_all(list(procs.values()), grace=10)
        etcd.stop()


# ---- template-time checks and schema ---------------------------------------------------------


def pool(name="main", replicas=1, **extra):
    return dict(name=name, replicas=replicas, **extra)


FAIL_RULES = {
    "model": ({"decode": {"pools": [pool(engine={"model": "other/model"})]}}, "engine.model differs between pools"),
    "dtype": ({"prefill": {"engine": {"dtype": "float16"}}}, "engine.dtype differs between pools"),
    "block size": ({"prefill": {"pools": [pool("a"), pool("b", engine={"blockSize": 32})]}},
                   "engine.blockSize differs between pools"),
    "kv transport": ({"decode": {"engine": {"kvTransferBackend": "nixl"}}},
                     "engine.kvTransferBackend differs between pools"),
    "load format": ({"prefill": {"engine": {"loadFormat": "dummy"}}}, "engine.loadFormat differs between pools"),
    "dummy seed": ({"engine": {"loadFormat": "dummy"}, "prefill": {"engine": {"seed": 1}}},
                   "dummy weights come from the seed"),
    "external etcd without endpoints": ({"etcd": {"mode": "external"}},
                                        "etcd.mode is external but etcd.endpoints is empty"),
    "bundled etcd with endpoints": ({"etcd": {"endpoints": ["etcd:2379"]}}, "but etcd.mode is bundled"),
    "duplicate pool": ({"decode": {"pools": [pool("a"), pool("a")]}}, 'has two pools named "a"'),
    "name too long": ({"fullnameOverride": "a" * 40, "decode": {"pools": [pool("b" * 30)]}},
                      "Kubernetes allows 63 in a label"),
    "pool pdb blocks drains": ({"decode": {"pools": [pool(replicas=2, pdb={"enabled": True, "minAvailable": 2})]}},
                               'decode pool "main" has pdb.minAvailable 2 with 2 replicas'),
    "router pdb blocks drains": ({"router": {"pdb": {"minAvailable": 1}}},
                                 "router.pdb.minAvailable 1 with 1 router replicas"),
    "hugepages without cpu or memory": ({"decode": {"hugepages": {"enabled": True}, "pools": [
        pool(resources={"limits": {"ephemeral-storage": "20Gi"}})]}},
                                        "hugepages require a cpu or memory request"),
    "triton on cpu": ({"prefill": {"gpus": 0, "engine": {"attentionBackend": "triton"}}},
                      "the Triton kernels need a GPU"),
    "extra arg sets a managed flag": ({"decode": {"extraArgs": ["--dtype=float16"]}}, "sets --dtype"),
    "extra arg abbreviates a managed flag": ({"prefill": {"pools": [pool(extraArgs=["--block", "8"])]}},
                                             "sets --block-size"),
    "router extra arg sets a managed flag": ({"router": {"extraArgs": ["--etcd", "x:1"]}},
                                             'router.extraArgs "--etcd" sets --etcd'),
    "metrics port is the grpc port": ({"decode": {"metricsPort": 50051}}, "need their own ports"),
    "single gpu share above the mps cap": ({"singleGpu": {"enabled": True, "prefillSmFraction": 0.6}},
                                           "gives prefill 60% of the SMs, above the 50%"),
    "single gpu pods beyond the mps replicas": ({"singleGpu": {"enabled": True}, "decode": {"pools": [pool(replicas=2)]}},
                                                "3 worker pods but singleGpu.mpsReplicas 2"),
    "single gpu with a cpu pool": ({"singleGpu": {"enabled": True}, "prefill": {"gpus": 0, "tolerations": []}},
                                   "needs gpus 1 on every pool"),
}


@pytest.mark.parametrize("rule", list(FAIL_RULES))
def test_fail_rule(chart, rule):
    values, expected = FAIL_RULES[rule]
    message = render_error(chart, values)
    assert "tandem: " in message and expected in message, message


def test_agreeing_overrides_render(chart):
    """Overrides that agree, and the flags the chart does not manage, pass the checks."""
    docs = render_docs(chart, {"prefill": {"engine": {"dtype": "auto", "blockSize": 16},
                                           "extraArgs": ["--no-enable-prefix-caching"]},
                               "decode": {"pools": [pool("a", engine={"model": "Qwen/Qwen3-0.6B"}),
                                                    pool("b", replicas=3, pdb={"enabled": True, "minAvailable": 2})]}})
    assert one(docs, "PodDisruptionBudget", f"{RELEASE}-tandem-decode-b")["spec"]["minAvailable"] == 2
    args = {c["name"]: parse(command_line(docs, w, c)) for w, c in tandem_containers(docs)}
    assert args["prefill"].enable_prefix_caching is False


SCHEMA_REJECTS = {
    "dtype": ({"engine": {"dtype": "fp8"}}, "/engine/dtype"),
    "block size": ({"engine": {"blockSize": 0}}, "/engine/blockSize"),
    "transport": ({"decode": {"engine": {"kvTransferBackend": "rdma"}}}, "/decode/engine/kvTransferBackend"),
    "model": ({"engine": {"model": ""}}, "/engine/model"),
    "gpus above tensor parallel 1": ({"decode": {"gpus": 2}}, "/decode/gpus"),
    "replicas": ({"prefill": {"pools": [pool(replicas=-1)]}}, "/prefill/pools/0/replicas"),
    "pool name": ({"decode": {"pools": [pool("Decode_A")]}}, "/decode/pools/0/name"),
    "no decode pool": ({"decode": {"pools": []}}, "/decode/pools"),
    "unknown pool key": ({"decode": {"pools": [pool(gpu=1)]}}, "/decode/pools/0"),
    "engine key typo": ({"prefill": {"engine": {"dtpye": "float16"}}}, "/prefill/engine"),
    "port": ({"router": {"port": 70000}}, "/router/port"),
    "etcd mode": ({"etcd": {"mode": "embedded"}}, "/etcd/mode"),
    "etcd endpoint with a scheme": ({"etcd": {"mode": "external", "endpoints": ["http://etcd:2379"]}},
                                    "/etcd/endpoints/0"),
    "etcd prefix": ({"etcd": {"prefix": "tandem"}}, "/etcd/prefix"),
    "placement": ({"router": {"placement": "random"}}, "/router/placement"),
    "gpu memory utilization": ({"engine": {"gpuMemoryUtilization": 1.5}}, "/engine/gpuMemoryUtilization"),
    "hugepage size": ({"decode": {"hugepages": {"enabled": True, "pageSize": "4Ki"}}}, "/decode/hugepages/pageSize"),
    "type": ({"router": {"replicas": "two"}}, "/router/replicas"),
    "unknown top-level key": ({"routers": {}}, "routers"),
    "sm fraction": ({"singleGpu": {"prefillSmFraction": 1.0}}, "/singleGpu/prefillSmFraction"),
    "mps replicas": ({"singleGpu": {"mpsReplicas": 1}}, "/singleGpu/mpsReplicas"),
    "resource quantity": ({"router": {"resources": {"limits": {"memory": "lots"}}}}, "/router/resources/limits/memory"),
}


@pytest.mark.parametrize("case", list(SCHEMA_REJECTS))
def test_schema_rejects(chart, case):
    values, where = SCHEMA_REJECTS[case]
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(info.value), str(info.value)


def test_defaults_pass_the_schema(chart):
    chart.validate_schema(chart.values)
    for values in SCENARIOS.values():
        chart.validate_schema(chart.merge_values(values))


def test_helm_sdk_is_helm():
    assert helm.helm_sdk_version().startswith(("v3.", "v4.")), helm.helm_sdk_version()
