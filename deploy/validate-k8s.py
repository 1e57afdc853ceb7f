#!/usr/bin/env python3
"""Renders Fieldline's kustomizations and checks every object against the Kubernetes schemas.

    validate-k8s.py [--kubernetes-version 1.32.0] DEPLOY_DIR

Renders DEPLOY_DIR/k8s, DEPLOY_DIR/k8s-keda and DEPLOY_DIR/k8s/postgres with kustomize (the
kustomize Go library, as the pykustomize package ships it) and validates each object with
kubernetes-validate, strict (no field the schema does not name). Custom resources (KEDA's
ScaledObject, CloudNativePG's Cluster) have no schema there: they are listed apart, for the
caller's own checks. Prints {"<kustomization>": [objects...], "nats_values": {...}} as JSON on
stdout; exits 1 with each error on stderr when an object is invalid.

deploy/local/provision.sh installs both packages into a virtualenv; the query of it is the
Rust test `kubernetes_manifests_render_and_validate` (tests/e2e/k8s.rs), which `make test` runs.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

import kubernetes_validate
import pykustomize
import yaml

KUSTOMIZATIONS = ["k8s", "k8s-keda", "k8s/postgres"]
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"), ("postgresql.cnpg.io/v1", "Cluster")}


def render(path: Path) -> list:
    result = asyncio.run(pykustomize.build(str(path)))
    return [doc for doc in yaml.safe_load_all(result.yaml) if doc]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("deploy_dir", type=Path)
    parser.add_argument("--kubernetes-version", default="1.32.0")
    args = parser.parse_args()
    rendered = {}
    errors = []
    for name in KUSTOMIZATIONS:
        objects = render(args.deploy_dir / name)
        for obj in objects:
            what = f"{name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_RESOURCES:
                continue
            try:
                kubernetes_validate.validate(obj, args.kubernetes_version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                errors.append(f"{what}: {path}: {error.message}")
            except Exception as error:  # an unknown kind or version: not valid either
                errors.append(f"{what}: {type(error).__name__}: {error}")
        rendered[name] = objects
    rendered["nats_values"] = yaml.safe_load((args.deploy_dir / "k8s/nats/values.yaml").read_text())
    for error in errors:
        print(error, file=sys.stderr)
    json.dump(rendered, sys.stdout)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
