#!/usr/bin/env bash
# Renders the Kubernetes manifests and validates every object they hold:
#   kubectl kustomize deploy/k8s/base, deploy/k8s/overlays/production, deploy/k8s/logging
#   (into .run/manifests/)
#
# - Kubernetes' own kinds against the API's OpenAPI schemas (kubernetes-validate, strict: an
#   unknown field is an error, as `kubectl apply --validate=strict` would say), for the oldest
#   Kubernetes the manifests need (1.30: the preStop sleep action) and a recent one.
# - cert-manager's kinds (Certificate, Issuer), which have no built-in schema, against
#   cert-manager's CRD schemas (the cloudcoil-models-cert-manager package, generated from
#   them), just as strict, plus the rules cert-manager's admission webhook adds.
# - References between the objects: probes and Services name ports the pods have, each
#   Certificate's Issuer is rendered and its Secret is mounted, and every port a NetworkPolicy
#   opens on the platform's pods is one those pods listen on.
# Any other kind without a schema fails the run: nothing is skipped.
#
# The validators are installed from PyPI into .tools/manifests-venv on the first run (pinned
# below); later runs reuse them. Needs kubectl (its built-in kustomize) and python3 with venv.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

KUBERNETES_VALIDATE_VERSION="1.37.0"
CERT_MANAGER_MODELS_VERSION="1.17.1.0"
CLOUDCOIL_VERSION="0.6.0"
KUBERNETES_VERSIONS="1.30 1.37"
VENV="$TOOLS/manifests-venv"
OUT="$RUN/manifests"
# What this script renders: a name for its output file, and the kustomization.
RENDERINGS=("base deploy/k8s/base" "production deploy/k8s/overlays/production" "logging deploy/k8s/logging")

have kubectl || die "kubectl is missing: it renders the manifests (kubectl kustomize).
Install kubectl 1.27 or later (https://kubernetes.io/docs/tasks/tools/#kubectl: the Kubernetes
apt repository, or a release binary on PATH) and run this again."
have python3 || die "python3 is missing: install Python 3.9 or later with its venv module, then
run this again"

install() {
  local marker="$VENV/.installed-$KUBERNETES_VALIDATE_VERSION-$CERT_MANAGER_MODELS_VERSION-$CLOUDCOIL_VERSION"
  [ -f "$marker" ] && return
  say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and cert-manager's schemas" \
    "(cloudcoil-models-cert-manager $CERT_MANAGER_MODELS_VERSION) into .tools/manifests-venv"
  rm -rf "$VENV"
  python3 -m venv "$VENV" \
    || die "could not create a virtual environment with $(python3 --version) (is its venv module installed?)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "cloudcoil-models-cert-manager==$CERT_MANAGER_MODELS_VERSION" "cloudcoil==$CLOUDCOIL_VERSION" \
    || die "pip could not install the validators from PyPI"
  touch "$marker"
}

install
mkdir -p "$OUT"
files=()
for rendering in "${RENDERINGS[@]}"; do
  read -r name dir <<<"$rendering"
  say "kubectl kustomize $dir"
  kubectl kustomize "$dir" >"$OUT/$name.yaml" || die "kubectl kustomize $dir failed (above)"
  files+=("$OUT/$name.yaml")
done

say "validating against Kubernetes $KUBERNETES_VERSIONS and cert-manager's CRD schemas"
K8S_VERSIONS="$KUBERNETES_VERSIONS" "$VENV/bin/python" - "${files[@]}" <<'PYTHON' \
  || die "the manifests do not validate (above); the rendered objects are in .run/manifests/"
import copy
import importlib.metadata
import os
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from cloudcoil.models.cert_manager import v1 as cm

VERSIONS = os.environ["K8S_VERSIONS"].split()
# The models' version is the cert-manager release whose CRDs they were made from (1.17.1.0:
# v1.17.1).
CERT_MANAGER_VERSION = "v" + ".".join(
    importlib.metadata.version("cloudcoil.models.cert_manager").split(".")[:3])
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def strict(schema):
    """A pydantic-made JSON schema that, like the API server, refuses unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            # Optional fields are "X or null": a manifest never writes null, and without the
            # alternative an error names the field at fault instead of its whole parent.
            alternatives = node.get("anyOf")
            if isinstance(alternatives, list) and {"type": "null"} in alternatives:
                rest = [a for a in alternatives if a != {"type": "null"}]
                if len(rest) == 1:
                    del node["anyOf"]
                    node.pop("default", None)
                    node.update(rest[0])
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # Required at the top as the API server requires them; metadata.name too.
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    for key in ("apiVersion", "kind"):
        schema["properties"][key] = {"const": schema["properties"][key]["const"]}
    schema["$defs"]["ObjectMeta"].setdefault("required", []).append("name")
    return jsonschema.Draft202012Validator(schema)


CERT_MANAGER = {
    ("cert-manager.io/v1", "Certificate"): strict(
        cm.Certificate.model_json_schema(by_alias=True, mode="validation")),
    ("cert-manager.io/v1", "Issuer"): strict(
        cm.Issuer.model_json_schema(by_alias=True, mode="validation")),
}


def duration(text):
    """Seconds in a Go duration such as 2160h or 1h30m."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def cert_manager_rules(obj):
    """What cert-manager's admission webhook refuses beyond the CRD schema (the part we use)."""
    spec, errors = obj["spec"], []
    if obj["kind"] == "Certificate":
        names = ("commonName", "dnsNames", "uris", "ipAddresses", "emailAddresses", "otherNames")
        if not any(spec.get(n) for n in names):
            errors.append("spec: at least one of commonName, dnsNames, uris, ipAddresses, "
                          "emailAddresses or otherNames must be set")
        try:
            length = duration(spec.get("duration", "2160h"))
            renew = duration(spec["renewBefore"]) if "renewBefore" in spec else None
            if length < 3600:
                errors.append("spec.duration: must be at least 1h")
            if renew is not None and not 300 <= renew < length:
                errors.append("spec.renewBefore: must be at least 5m and less than spec.duration")
        except ValueError as e:
            errors.append(f"spec: {e}")
        key = spec.get("privateKey", {})
        sizes = {"ECDSA": {256, 384, 521}, "RSA": {2048, 4096, 8192}}.get(key.get("algorithm"))
        if sizes and "size" in key and key["size"] not in sizes:
            errors.append(f"spec.privateKey.size: {key['size']} is not one of {sorted(sizes)}")
        for uri in spec.get("uris", []):
            if not re.fullmatch(r"spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_]+)+", uri):
                errors.append(f"spec.uris: {uri!r} is not a SPIFFE ID")
    if obj["kind"] == "Issuer":
        kinds = [k for k in ("acme", "ca", "selfSigned", "vault", "venafi") if k in spec]
        if len(kinds) != 1:
            errors.append(f"spec: exactly one issuer type must be set, not {kinds or 'none'}")
    return errors


def selects(selector, labels):
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if not all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def references(objects):
    """Errors in what the objects say about each other."""
    errors = []
    namespace = lambda o: o["metadata"].get("namespace", "")
    pods = []  # (namespace, workload, labels, {port name: number}, {numbers}, secret volumes)
    for o in objects:
        if o["kind"] not in WORKLOADS:
            continue
        template = o["spec"]["template"]
        ports = {}
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []):
                ports[port.get("name")] = port["containerPort"]
        secrets = {v["secret"]["secretName"] for v in template["spec"].get("volumes", [])
                   if "secret" in v}
        where = f"{o['kind']}/{o['metadata']['name']}"
        pods.append((namespace(o), where, template["metadata"].get("labels", {}),
                     ports, set(ports.values()), secrets))
        for container in template["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                handler = container.get(probe) or {}
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    port = (handler.get(kind) or {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        errors.append(f"{where}: {probe} names port {port!r}, "
                                      f"which the pod does not have")
    for o in objects:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Service":
            selected = [p for p in pods if p[0] == namespace(o)
                        and selects({"matchLabels": o["spec"].get("selector")}, p[2])]
            if not selected:
                errors.append(f"{where}: selects no pod")
            for port in o["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                if not any(target in (p[3] if isinstance(target, str) else p[4])
                           for p in selected):
                    errors.append(f"{where}: targetPort {target!r} is no port of its pods")
        if o["kind"] == "Certificate":
            ref = o["spec"]["issuerRef"]
            if ref.get("kind", "Issuer") == "Issuer" and not any(
                    i["kind"] == "Issuer" and i["metadata"]["name"] == ref["name"]
                    and namespace(i) == namespace(o) for i in objects):
                errors.append(f"{where}: its Issuer {ref['name']!r} is not in the rendering")
            if not any(p[0] == namespace(o) and o["spec"]["secretName"] in p[5] for p in pods):
                errors.append(f"{where}: no pod mounts its Secret {o['spec']['secretName']!r}")
        if o["kind"] == "NetworkPolicy":
            spec = o["spec"]
            selected = [p for p in pods if p[0] == namespace(o)
                        and selects(spec["podSelector"], p[2])]
            rules = [("ingress", r, selected) for r in spec.get("ingress", [])]
            # Egress to pods of this namespace (a podSelector alone): they must listen there.
            for r in spec.get("egress", []):
                for peer in r.get("to", []):
                    if set(peer) == {"podSelector"}:
                        rules.append(("egress", r, [p for p in pods if p[0] == namespace(o)
                                                    and selects(peer["podSelector"], p[2])]))
            for direction, rule, targets in rules:
                if not targets:
                    errors.append(f"{where}: an {direction} rule reaches no pod")
                for port in rule.get("ports", []):
                    number = port.get("port")
                    if number is None or port.get("protocol", "TCP") != "TCP":
                        continue
                    if not any(number in (p[3] if isinstance(number, str) else p[4])
                               for p in targets):
                        errors.append(f"{where}: {direction} port {number!r} is no port of "
                                      f"the pods it applies to")
    return errors


failed = 0
for path in sys.argv[1:]:
    with open(path) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    name = os.path.basename(path)
    for o in objects:
        what = f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        errors, how = [], ""
        validator = CERT_MANAGER.get((o.get("apiVersion"), o.get("kind")))
        if validator is not None:
            for e in sorted(validator.iter_errors(o), key=lambda e: list(e.path)):
                errors.append(f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
            errors += cert_manager_rules(o)
            how = f"cert-manager {CERT_MANAGER_VERSION} CRD schema, webhook rules"
        else:
            for version in VERSIONS:
                try:
                    kv.validate(o, version, strict=True)
                except kv.ValidationError as e:
                    path_ = ".".join(map(str, e.path)) or "(top)"
                    errors.append(f"Kubernetes {version}: {path_}: {e.message}")
                except kv.SchemaNotFoundError as e:
                    errors.append(f"no schema: {e.message}; add one to scripts/manifests.sh")
                    break
            how = "Kubernetes " + ", ".join(VERSIONS) + " (strict)"
        if errors:
            failed += 1
            print(f"FAIL {name}: {what}")
            for error in errors:
                print(f"       {error}")
        else:
            print(f"ok   {name}: {what}  [{how}]")
    try:
        problems = references(objects)
    except (KeyError, TypeError, AttributeError) as e:
        # An object the schemas refused already (a required field missing) can trip the checks.
        problems = [f"references not checked: an object lacks {e} (see the errors above)"]
    for problem in problems:
        print(f"FAIL {name}: {problem}")
    failed += len(problems)
    if not problems:
        print(f"ok   {name}: references between its {len(objects)} objects")

if failed:
    print(f"{failed} problem(s) in the rendered manifests")
    sys.exit(1)
PYTHON
say "manifests valid: ${files[*]#"$ROOT/"}"
