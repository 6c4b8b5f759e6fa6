"""A small kustomize stand-in for the tests of deploy/k8s: no kubectl or kustomize binary here.

It renders a kustomization the way `kubectl kustomize` does for the few fields the manifests
use (resources, namespace, images, secretGenerator from env files without a name hash, and
strategic merge patches from files) and refuses any other field or patch directive, so a
manifest using something it does not understand fails the tests instead of being skipped.

Strategic merge as Kubernetes does it for the lists the patches touch: containers, env and
volumes merge by name, volumeMounts by mountPath, container ports by containerPort (new
items first, as kustomize orders them); a null value deletes the key; other lists are
replaced. Where kubectl is installed, a test compares this rendering with `kubectl kustomize`.
"""

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "secretGenerator",
                    "patches"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
CLUSTER_SCOPED_KINDS = {"Namespace"}
# The committed template stands in for the operator's git-ignored env file (secrets.env).
ENV_FILE_TEMPLATE_SUFFIX = ".example"


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(folder: Path) -> list[dict[str, Any]]:
    """The resources of the kustomization in `folder`, after its generators and transformers."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise ValueError(f"{folder}: kustomization fields not rendered here: {sorted(unsupported)}")
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = folder / entry
        docs += render(target) if target.is_dir() else load_documents(target)
    docs += [generated_secret(folder, spec) for spec in kustomization.get("secretGenerator", [])]
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{folder}: only file patches are rendered here: {patch}")
        for doc in load_documents(folder / patch["path"]):
            strategic_merge(target_of(docs, doc), doc)
    for image in kustomization.get("images", []):
        set_image(docs, image)
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED_KINDS:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def generated_secret(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The Secret of one secretGenerator entry (env files, disableNameSuffixHash)."""
    if set(spec) - {"name", "envs", "options"} or spec.get("options") != {
            "disableNameSuffixHash": True}:
        raise ValueError(f"{folder}: secretGenerator entry not rendered here: {spec}")
    data: dict[str, str] = {}
    for name in spec["envs"]:
        data.update(parse_env_file(folder / (name + ENV_FILE_TEMPLATE_SUFFIX)))
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": spec["name"]},
            "type": "Opaque", "data": encoded}


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as kustomize reads them: blank lines and # comments skipped."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not KEY=VALUE: {line!r}")
            pairs[key.strip()] = value
    return pairs


def target_of(docs: list[dict[str, Any]], patch: dict[str, Any]) -> dict[str, Any]:
    """The one resource a patch document names (kind and metadata.name)."""
    found = [doc for doc in docs if doc["kind"] == patch["kind"]
             and doc["metadata"]["name"] == patch["metadata"]["name"]]
    if len(found) != 1:
        raise ValueError(f"patch {patch['kind']}/{patch['metadata']['name']} matches "
                         f"{len(found)} resources")
    return found[0]


def strategic_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            raise ValueError(f"patch directive {key} is not rendered here")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(target.get(key), list):
            merge_list(target[key], value, MERGE_KEYS[key])
        else:
            target[key] = copy.deepcopy(value)


def merge_list(target: list[dict[str, Any]], patch: list[dict[str, Any]], merge_key: str) -> None:
    """Items with the key of an existing one merge into it; new ones go first, in the patch's
    order, where kustomize puts them."""
    added = []
    for item in patch:
        same = [existing for existing in target if existing[merge_key] == item[merge_key]]
        if same:
            strategic_merge(same[0], item)
        else:
            added.append(copy.deepcopy(item))
    target[:0] = added


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template's spec of a Deployment or Job, else None."""
    if doc["kind"] in ("Deployment", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def set_image(docs: list[dict[str, Any]], image: dict[str, str]) -> None:
    """The `images` transformer: containers whose image is `name` (any tag) get the new one."""
    for doc in docs:
        spec = pod_spec(doc)
        for container in [*(spec or {}).get("containers", []),
                          *(spec or {}).get("initContainers", [])]:
            if container["image"].split("@")[0].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
