"""Validates the Kubernetes manifests in one folder, offline.

Usage: validate.py K8S_VERSION MANIFEST_DIR RENDERED_YAML CRD_SCHEMA_CACHE

Prints one line per check, "PASS what" or "FAIL what: why", and exits 1 when any check failed.
"""

import json
import os
import pathlib
import re
import sys

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kv

K8S_VERSION, MANIFEST_DIR, RENDERED, CRD_CACHE = sys.argv[1:5]
FAILED = False

# Kinds that live outside namespaces, among those a deployment like this one would contain.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass",
                  "CustomResourceDefinition"}


def report(ok, what, why=""):
    global FAILED
    if ok:
        print(f"PASS {what}", flush=True)
    else:
        FAILED = True
        print(f"FAIL {what}: {why}", flush=True)


def forbid_unknown_fields(node):
    """Makes every object schema that lists its properties reject others, as `kubectl apply`
    does by default (--validate=strict: the API server refuses unknown fields, in custom
    resources too)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            forbid_unknown_fields(value)
    elif isinstance(node, list):
        for value in node:
            forbid_unknown_fields(value)


def crd_schema(kind):
    """The schema of a prometheus-operator kind, derived from its CRD through the models
    generated from it, made strict; cached because importing the models takes seconds."""
    cache = CRD_CACHE.replace("servicemonitor", kind.lower())
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    from cloudcoil.models.prometheus_operator import v1

    schema = getattr(v1, kind).model_json_schema(by_alias=True)
    forbid_unknown_fields(schema)
    tmp = cache + ".tmp"
    with open(tmp, "w") as f:
        json.dump(schema, f)
    os.replace(tmp, cache)
    return schema


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): lambda: crd_schema("ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): lambda: crd_schema("PrometheusRule"),
}


def k8s_validator(doc):
    """kubernetes-validate's strict schema for this kind at K8S_VERSION, or None."""
    version = [v for v in kv.all_versions()
               if kv.major_minor(v) <= kv.major_minor(K8S_VERSION)][-1]
    # apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1, v1 -> v1
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = kv.schema_contents(f"{folder}/{doc['kind'].lower()}-{group_version}.json",
                                    K8S_VERSION)
    except FileNotFoundError:
        return None
    definitions = kv.schema_contents(f"{folder}/_definitions.json", K8S_VERSION)
    registry = referencing.Registry()
    registry = referencing.Resource.from_contents(schema) @ registry
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def describe(error):
    """Where and what, looking inside anyOf/oneOf for the branch that came closest, since
    "not valid under any of the given schemas" names no field."""
    while error.context:
        # An optional field's schema is "anyOf: [the type, null]": the null branch is never
        # the helpful one.
        branches = [e for e in error.context
                    if not (e.validator == "type" and e.validator_value == "null")]
        error = jsonschema.exceptions.best_match(branches or error.context)
    path = ".".join(str(p) for p in error.absolute_path) or "(top)"
    return f"{path}: {error.message}"


def validator_for(doc):
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        return jsonschema.Draft202012Validator(crd()), "its CRD schema (prometheus-operator)"
    return k8s_validator(doc), f"Kubernetes {kv.major_minor(K8S_VERSION)}"


def name_of(doc):
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"


def check_document(where, doc):
    """Required fields, then the schema."""
    missing = [k for k in ("apiVersion", "kind") if not doc.get(k)]
    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        missing.append("metadata.name")
    if doc.get("kind") not in CLUSTER_SCOPED and not meta.get("namespace"):
        missing.append("metadata.namespace")
    if missing:
        report(False, where, "missing " + ", ".join(missing))
        return
    validator, against = validator_for(doc)
    if validator is None:
        report(False, where, f"no schema for {doc['apiVersion']} {doc['kind']} "
                             f"in Kubernetes {kv.major_minor(K8S_VERSION)}")
        return
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        report(False, where, "; ".join(map(describe, errors)))
        return
    report(True, f"{where} against {against}")


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key(doc):
    meta = doc.get("metadata") or {}
    return (doc.get("kind"), meta.get("namespace"), meta.get("name"))


def get(node, *path):
    """node[path...], or None where a level is missing or not a mapping."""
    for step in path:
        if not isinstance(node, dict):
            return None
        node = node.get(step)
    return node


def pod_templates(docs):
    for doc in docs:
        template = get(doc, "spec", "template")
        if doc.get("kind") in ("DaemonSet", "Deployment", "StatefulSet") and template:
            yield doc, template


def container_ports(template):
    return {p.get("name") for c in get(template, "spec", "containers") or []
            for p in c.get("ports") or []}


def check_references(docs):
    """What the API server or Prometheus would only find out at run time: selectors that match
    nothing, ports named but not declared, namespaces never created."""
    namespaces = {get(d, "metadata", "name") for d in docs if d.get("kind") == "Namespace"}
    for doc in docs:
        ns = get(doc, "metadata", "namespace")
        if ns and ns not in namespaces:
            report(False, f"{name_of(doc)} namespace", f"namespace {ns} is not created here")
    for doc, template in pod_templates(docs):
        labels = get(template, "metadata", "labels") or {}
        selector = get(doc, "spec", "selector", "matchLabels") or {}
        report(selector.items() <= labels.items(), f"{name_of(doc)} selector matches its pods",
               f"matchLabels {selector} not within template labels {labels}")
        for container in get(template, "spec", "containers") or []:
            ports = {p.get("name") for p in container.get("ports") or []}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = get(container, probe, "httpGet", "port")
                if isinstance(port, str):
                    report(port in ports, f"{name_of(doc)} {probe} port {port}",
                           f"no container port named {port}")
    for svc in (d for d in docs if d.get("kind") == "Service"):
        selector = get(svc, "spec", "selector") or {}
        ns = get(svc, "metadata", "namespace")
        pods = [t for d, t in pod_templates(docs) if get(d, "metadata", "namespace") == ns and
                selector.items() <= (get(t, "metadata", "labels") or {}).items()]
        report(bool(pods), f"{name_of(svc)} selects pods", f"selector {selector} matches no pods")
        ports = set().union(*map(container_ports, pods))
        for port in get(svc, "spec", "ports") or []:
            target = port.get("targetPort")
            if isinstance(target, str):
                report(target in ports, f"{name_of(svc)} targetPort {target}",
                       f"no container port named {target}")
    for mon in (d for d in docs if d.get("kind") == "ServiceMonitor"):
        selector = get(mon, "spec", "selector", "matchLabels") or {}
        ns = get(mon, "metadata", "namespace")
        services = [s for s in docs if s.get("kind") == "Service" and
                    get(s, "metadata", "namespace") == ns and
                    selector.items() <= (get(s, "metadata", "labels") or {}).items()]
        report(bool(services), f"{name_of(mon)} selects a Service",
               f"matchLabels {selector} match no Service in namespace {ns}")
        ports = {p.get("name") for s in services for p in get(s, "spec", "ports") or []}
        for endpoint in get(mon, "spec", "endpoints") or []:
            port = endpoint.get("port")
            report(port in ports, f"{name_of(mon)} endpoint port {port}",
                   f"no Service port named {port}")


def main():
    folder = pathlib.Path(MANIFEST_DIR)
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in (".yaml", ".yml") and p.stem != "kustomization")
    docs = []
    for path in files:
        try:
            file_docs = load_all(path)
        except yaml.YAMLError as e:
            report(False, path.name, f"not YAML: {e}")
            continue
        if not file_docs:
            report(False, path.name, "no document")
        for doc in file_docs:
            if not isinstance(doc, dict):
                report(False, path.name, "a document is not a mapping")
                continue
            check_document(f"{path.name} {name_of(doc)}", doc)
            docs.append(doc)

    kustomization = folder / "kustomization.yaml"
    if kustomization.exists():
        listed = (yaml.safe_load(kustomization.read_text()) or {}).get("resources") or []
        names = {p.name for p in files}
        report(set(listed) == names, "kustomization.yaml lists every manifest",
               f"not listed: {sorted(names - set(listed)) or 'none'}; "
               f"listed but absent: {sorted(set(listed) - names) or 'none'}")
        # "-": kustomize failed, which the caller reports.
        rendered = load_all(RENDERED) if RENDERED != "-" else []
        if rendered:
            ours, theirs = {key(d) for d in docs}, {key(d) for d in rendered}
            report(ours == theirs, "kustomize output holds exactly the manifests' objects",
                   f"only in the output: {sorted(map(str, theirs - ours)) or 'none'}; "
                   f"only in the files: {sorted(map(str, ours - theirs)) or 'none'}")
        # What `kubectl apply -k` would send, after any patches or image overrides.
        for doc in rendered:
            check_document(f"kustomize output {name_of(doc)}", doc)
    else:
        report(False, "kustomization.yaml", "missing")

    check_references(docs)
    sys.exit(1 if FAILED else 0)


main()
