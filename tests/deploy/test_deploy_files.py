"""Static checks of everything under deploy/ and docker-compose.yml (no Docker engine or cluster here):
hadolint on the Dockerfiles, the Compose file against the Compose specification's schema, `kubectl kustomize`
of every overlay validated against Kubernetes' own schemas (the kubernetes-validate package, offline), the
custom resources' required fields, promtool on the Prometheus config and alert rules (with rule unit
tests), and cross-checks against the code: every command a container runs exists in the CLI with the
options given, every ORZ__ variable names a config field, ports agree with the config, the KEDA trigger
watches the stream and consumer group the code uses."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import typer.main
import yaml

from services.cli import app
from services.config import Config
from services.config_io import load_config
from services.control import Keys
from services.queue import GENERATOR_GROUP

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
CLI = typer.main.get_command(app)
CFG = load_config(DEPLOY / "config" / "orz.yaml", environ={})
OVERLAYS = ["cpu", "gpu", "cpu-hpa", "orz-7b", "cpu-tls"]


def _tested_acl_rule() -> list[str]:
    """The ACL rule tests/integration/test_redis_security.py runs every process's calls under."""
    spec = importlib.util.spec_from_file_location("redis_security", ROOT / "tests" / "integration" /
                                                  "test_redis_security.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _acl_rule(module.ACL)


def _acl_rule(args: list[str]) -> list[str]:
    """The rules of the `orz` user in redis-server arguments, and that the default user is off."""
    args = [str(a) for a in args]
    assert " ".join(args).count("--user default off") == 1, args
    i = args.index("orz", args.index("--user", args.index("off") + 1))
    rest = args[i + 3:]
    rule = rest[:next((k for k, a in enumerate(rest) if a.startswith("--")), len(rest))]
    assert args[i + 1] == "on" and args[i + 2].startswith(">"), args
    return rule


TESTED_ACL_RULE = _tested_acl_rule()


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _check_command(args: list[str]) -> None:
    """`orz ARGS` names a CLI command and only options it has."""
    name, *rest = args
    assert name in CLI.commands, f"`orz {name}` is not a command ({sorted(CLI.commands)})"
    opts = {o for p in CLI.commands[name].params for o in (*p.opts, *p.secondary_opts)}
    for arg in rest:
        if arg.startswith("-"):
            assert arg.split("=")[0] in opts, f"`orz {name}` has no option {arg} ({sorted(opts)})"


def _check_env_name(name: str) -> None:
    """ORZ__SECTION__KEY names a field of the config model."""
    if not name.startswith("ORZ__"):
        return
    parts = name[len("ORZ__"):].lower().split("__")
    model: type = Config
    for part in parts:
        assert part in model.model_fields, f"{name}: no config field {part!r}"
        model = model.model_fields[part].annotation  # type: ignore[assignment]


# ---- Docker -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    _run(str(BIN / "hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DEPLOY / "docker" / dockerfile))
    text = (DEPLOY / "docker" / dockerfile).read_text()
    assert re.search(r"^USER 10001", text, re.M), "runs as a non-root user"
    assert 'ENTRYPOINT ["orz"]' in text and "HEALTHCHECK" in text
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"COPY of a missing path {src}"


# ---- Compose ------------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/compose/orz-7b.yml"])
def test_compose_file_matches_the_compose_specification(path: str) -> None:
    _run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / path))


def test_orz_7b_compose_override_runs_the_recipe_on_8_ranks() -> None:
    override = yaml.safe_load((ROOT / "deploy" / "compose" / "orz-7b.yml").read_text())
    services = override["services"]
    assert set(services) <= set(COMPOSE["services"]), "the override may only adjust services that exist"
    learner = services["learner-gpu"]
    cmd = learner["entrypoint"] + learner["command"]
    recipe = load_config(ROOT / "configs" / "orz-7b.yaml")
    assert cmd[:3] == ["torchrun", "--nproc-per-node", str(recipe.learner.num_processes)]
    assert cmd[3:] == ["-m", "services.cli", "learner", "--config", "/etc/orz/config.yaml", "--auto-resume"]
    gpus = learner["deploy"]["resources"]["reservations"]["devices"][0]["count"]
    assert gpus == recipe.learner.num_processes
    for name, svc in services.items():
        assert "./configs/orz-7b.yaml:/etc/orz/config.yaml:ro" in svc["volumes"], name
    assert str(recipe.model.path).startswith("/models/") and str(recipe.task.train_files[0]).startswith("/data/")
    assert learner["environment"]["ORZ__WEIGHT_SYNC__HOST"] in COMPOSE["services"]["learner-gpu"]["networks"][
        "default"]["aliases"]


def test_compose_services_match_the_cli_and_the_config() -> None:
    services = COMPOSE["services"]
    assert {"redis", "reward-server", "generator", "generator-gpu", "learner", "prometheus", "grafana"} <= set(services)
    orz = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("${ORZ")}
    assert set(orz) == {"base-model", "reward-server", "learner", "generator", "learner-gpu", "generator-gpu"}
    for name, svc in orz.items():
        _check_command(svc["command"])
        assert "./deploy/config/orz.yaml:/etc/orz/config.yaml:ro" in svc["volumes"], name
        for var in svc.get("environment", {}):
            _check_env_name(var)
    assert services["reward-server"]["expose"] == [str(CFG.reward.port)]
    for name in ("learner", "learner-gpu"):
        ws = CFG.weight_sync
        assert set(services[name]["expose"]) == {str(CFG.learner.metrics_port),
                                                  f"{ws.port}-{ws.port + ws.port_span - 1}"}
    assert CFG.weight_sync.host == "learner" and services["learner"]["hostname"] == "learner"
    assert services["learner-gpu"]["networks"]["default"]["aliases"] == ["learner"]
    for name in ("generator", "generator-gpu"):
        assert services[name]["expose"] == [str(CFG.generator.metrics_port)]
    for name in ("learner-gpu", "generator-gpu"):  # NCCL's interface, named on both ends
        assert services[name]["environment"]["ORZ__WEIGHT_SYNC__SOCKET_IFNAME"] == "eth0", name
    gpu = services["generator-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["image"].startswith("${ORZ_CUDA_IMAGE")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["generator"]["profiles"] == ["cpu"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "redis-data:/data" in redis["volumes"]
    assert _acl_rule(redis["command"]) == TESTED_ACL_RULE
    for name in ("generator", "learner"):
        env = services[name]["environment"]
        assert env["ORZ__REDIS__USERNAME"] == "orz" and env["ORZ__REDIS__PASSWORD"].startswith("${REDIS_PASSWORD")
        assert "@" not in env["ORZ__REDIS__URL"]  # no password in the URL
    # Prometheus scrapes every orz service on the ports the config gives them.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {(n, c["port"]) for job in prom["scrape_configs"] for c in job["dns_sd_configs"] for n in c["names"]}
    assert targets == {("learner", CFG.learner.metrics_port), ("generator", CFG.generator.metrics_port),
                       ("generator-gpu", CFG.generator.metrics_port), ("reward-server", CFG.reward.port)}
    assert (ROOT / ".env.example").exists() and ".env" in (ROOT / ".gitignore").read_text().split()


# ---- Kubernetes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is required (.ci/run installs it)")
    return {o: [d for d in yaml.safe_load_all(_run("kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / o)))
                if d] for o in OVERLAYS}


def test_kustomize_config_is_the_shared_config() -> None:
    assert (DEPLOY / "k8s" / "base" / "config.yaml").read_text() == (DEPLOY / "config" / "orz.yaml").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(overlay: str, built: dict[str, list[dict]]) -> None:
    docs = built[overlay]
    custom = {"ScaledObject", "TriggerAuthentication", "PodMonitor"}
    for doc in docs:
        if doc["kind"] in custom:
            continue
        kubernetes_validate.validate(doc, "1.32.0", strict=True)  # raises with the offending field
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret",
            "NetworkPolicy", "PersistentVolumeClaim", "PodMonitor"} <= kinds
    assert all(d["metadata"].get("namespace") == "orz" for d in docs if d["kind"] != "Namespace")


def _config_of(overlay: str):
    """The config an overlay's processes read: its own config.yaml when it replaces the ConfigMap."""
    own = DEPLOY / "k8s" / "overlays" / overlay / "config.yaml"
    return load_config(own, environ={}) if own.exists() else CFG


def _by(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_match_the_cli_config_and_each_other(overlay: str, built: dict[str, list[dict]]) -> None:
    docs = built[overlay]
    workloads = {**_by(docs, "Deployment"), **_by(docs, "StatefulSet")}
    assert set(workloads) == {"orz-redis", "orz-reward-server", "orz-learner", "orz-generator"}
    for name, w in workloads.items():
        spec = w["spec"]["template"]["spec"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].startswith("orz-async") and c.get("command") == ["torchrun"]:
                # torchrun [its options] -m services.cli <orz command>: the learner as data-parallel ranks
                args = c["args"]
                assert args[args.index("-m"):args.index("-m") + 2] == ["-m", "services.cli"], args
                _check_command(args[args.index("-m") + 2:])
            elif c["image"].startswith("orz-async") and "args" in c:
                _check_command(c["args"])
            for env in c.get("env", []):
                _check_env_name(env["name"])
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                if "httpGet" in c.get(probe, {}):
                    assert c[probe]["httpGet"]["path"] == "/healthz" and c[probe]["httpGet"]["port"] in ports
            if name == "orz-reward-server":
                assert ports == {"http": CFG.reward.port}
            if name in ("orz-learner", "orz-generator") and c["name"] in ("learner", "generator"):
                assert ports["metrics"] == CFG.learner.metrics_port == CFG.generator.metrics_port
                assert c["resources"]["requests"]
        if name == "orz-learner":
            assert "--auto-resume" in spec["containers"][0]["args"]
            assert w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
            assert {"name": "ORZ__WEIGHT_SYNC__HOST", "value": "orz-learner"} in spec["containers"][0]["env"]
        if name == "orz-redis":
            args = spec["containers"][0]["args"]
            assert "--appendonly" in args and w["spec"]["volumeClaimTemplates"]
            assert _acl_rule(args) == TESTED_ACL_RULE
            assert ("--tls-port" in args and args[args.index("--port") + 1] == "0") == (overlay == "cpu-tls")
        if name in ("orz-learner", "orz-generator"):
            env = {e["name"]: e for e in spec["containers"][0]["env"]}
            if overlay == "cpu-tls":  # the CA file the config names is where the Secret is mounted
                assert env["ORZ__REDIS__TLS"]["value"] == "true"
                ca = Path(env["ORZ__REDIS__TLS_CA_FILE"]["value"])
                mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
                [vol] = [v for v in spec["volumes"] if v["name"] == "redis-tls"]
                assert mounts["redis-tls"] == str(ca.parent) and vol["secret"]["secretName"] == "orz-redis-tls"
            secret = _by(docs, "Secret")["orz-secrets"]["stringData"]
            assert secret[env["ORZ__REDIS__USERNAME"]["valueFrom"]["secretKeyRef"]["key"]] == "orz"
            assert env["ORZ__REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] in secret
            assert "@" not in env["ORZ__REDIS__URL"]["value"]
    services = _by(docs, "Service")
    assert services["orz-learner"]["spec"]["ports"][1]["port"] == CFG.weight_sync.port
    # NetworkPolicies select real pods.
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads.values()]
    for np in _by(docs, "NetworkPolicy").values():
        sel = np["spec"]["podSelector"]["matchLabels"]
        assert any(sel.items() <= lab.items() for lab in pod_labels), np["metadata"]["name"]
    redis_np = _by(docs, "NetworkPolicy")["orz-redis"]["spec"]["ingress"][0]["from"]
    assert {f["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for f in redis_np} == {"orz-learner",
                                                                                          "orz-generator"}
    reward_np = _by(docs, "NetworkPolicy")["orz-reward-server"]["spec"]["ingress"][0]["from"]
    assert [f["podSelector"]["matchLabels"] for f in reward_np if "podSelector" in f] == [
        {"app.kubernetes.io/name": "orz-generator"}]
    if overlay in ("gpu", "orz-7b"):
        gpus = {"orz-learner": str(_config_of(overlay).learner.num_processes) if overlay == "orz-7b" else "1",
                "orz-generator": "1"}
        for name, count in gpus.items():
            res = workloads[name]["spec"]["template"]["spec"]["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == count
        assert all(w["spec"]["template"]["spec"]["containers"][0]["image"] == "orz-async:cuda"
                   for n, w in workloads.items() if n != "orz-redis")
        # NCCL's own interface choice can be one the other pods cannot reach: both ends name the pod's.
        for name in ("orz-learner", "orz-generator"):
            container = workloads[name]["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["ORZ__WEIGHT_SYNC__SOCKET_IFNAME"] == "eth0", name
    else:
        assert workloads["orz-generator"]["spec"]["template"]["spec"]["containers"][0]["image"] == "orz-async:cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_have_their_required_fields(overlay: str, built: dict[str, list[dict]]) -> None:
    docs = built[overlay]
    deployments = _by(docs, "Deployment")
    scaled = _by(docs, "ScaledObject")
    if overlay == "cpu-hpa":
        assert not scaled and not _by(docs, "TriggerAuthentication")
        hpa = _by(docs, "HorizontalPodAutoscaler")["orz-generator"]
        assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "orz_prompt_backlog"
    else:
        so = scaled["orz-generator"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["scaleTargetRef"]["name"] in deployments
        [trigger] = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == Keys(_config_of(overlay).namespace).prompts
        assert meta["consumerGroup"] == GENERATOR_GROUP
        assert meta["address"].startswith("orz-redis.") and int(meta["lagCount"]) > 0
        auth = _by(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
        refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
        assert set(refs) == {"username", "password"} | ({"ca"} if overlay == "cpu-tls" else set())
        assert refs["username"]["name"] in _by(docs, "Secret") and refs["password"]["name"] in _by(docs, "Secret")
        if "ca" in refs:  # created by the operator (or cert-manager), like the server's certificate
            assert refs["ca"]["name"] == "orz-redis-tls"
    pm = _by(docs, "PodMonitor")["orz-async"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [w for w in {**deployments, **_by(docs, "StatefulSet")}.values()
                if pm["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    named_ports = {p["name"] for w in selected for c in w["spec"]["template"]["spec"]["containers"]
                   for p in c.get("ports", [])}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= named_ports
    assert {e["path"] for e in pm["spec"]["podMetricsEndpoints"]} == {"/metrics"}


# ---- Prometheus and Grafana ---------------------------------------------------------------------------


def _promtool(*args: str) -> str:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is required (Debian's prometheus package; .ci/run installs it)")
    return _run("promtool", *args)


def test_prometheus_config_and_rules_check() -> None:
    _promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    _promtool("check", "rules", str(DEPLOY / "prometheus" / "rules" / "orz.yml"))


def test_alert_rule_unit_tests() -> None:
    out = _promtool("test", "rules", str(DEPLOY / "prometheus" / "tests" / "orz_test.yml"))
    assert "SUCCESS" in out
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "orz.yml").read_text())["groups"][0]["rules"]
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "tests" / "orz_test.yml").read_text()))
    untested = {r["alert"] for r in rules} - tested - {"OrzRewardCallsFailing"}
    assert not untested, f"alerts without a unit test: {untested}"


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "orz-async.json").read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("reward", "response length", "step time", "tokens/s", "queue", "staleness", "latency"):
        assert needed in titles, needed
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"]
    mounts = COMPOSE["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "orz.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_orz_7b_overlay_carries_the_recipe() -> None:
    overlay = DEPLOY / "k8s" / "overlays" / "orz-7b"
    assert (overlay / "config.yaml").read_text() == (ROOT / "configs" / "orz-7b.yaml").read_text(), \
        "copy configs/orz-7b.yaml to deploy/k8s/overlays/orz-7b/config.yaml"
    docs = [d for d in yaml.safe_load_all(_run("kubectl", "kustomize", str(overlay))) if d]
    learner = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "orz-learner")
    container = learner["spec"]["template"]["spec"]["containers"][0]
    recipe = load_config(overlay / "config.yaml")
    assert container["command"] == ["torchrun"]
    assert container["args"][:2] == ["--nproc-per-node", str(recipe.learner.num_processes)]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(recipe.learner.num_processes)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("orz-config"))
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == yaml.safe_load((overlay / "config.yaml").read_text())


# ---- SLURM ----------------------------------------------------------------------------------------------
# (run for real on a one-node cluster by tests/e2e/test_slurm.py; these checks need no cluster)


@pytest.mark.parametrize("script", ["orz.sbatch", "generators.sbatch"])
def test_slurm_scripts_parse_and_match_the_cli_and_the_config(script: str) -> None:
    path = DEPLOY / "slurm" / script
    _run("bash", "-n", str(path))
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "#SBATCH --job-name=" in text
    assert "set -euo pipefail" in text
    for line in text.splitlines():
        for m in re.finditer(r"services\.cli ([a-z][a-z-]*)((?: --?[a-z][a-z-]*)*)", line):
            _check_command([m.group(1), *m.group(2).split()])
    for name in set(re.findall(r"\b(ORZ__[A-Z_]+)", text)):
        _check_env_name(name)
    # the options the scripts pass after positional arguments, which the pattern above does not reach
    for command, option in (("learner", "--auto-resume"), ("config", "--get"), ("reward-server", "--host"),
                            ("reward-server", "--port"), ("generator", "--id")):
        if f"services.cli {command}" in text and option in text:
            _check_command([command, option])
