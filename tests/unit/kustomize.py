"""The part of kustomize that deploy/kubernetes relies on, for the unit tests.

Resources (files), components (with resources of their own), a
configMapGenerator of literals, strategic merge patches of mappings, JSON
patches that add, images, and replacements with a delimiter and an index,
applied in kustomize's order: resources, then each component's resources and
transformers, then this kustomization's generators, patches, images and
replacements; resources
annotated local-config are left out of the result. Anything else in a
kustomization is refused, so a feature the manifests start to use fails here
instead of being ignored. ``real_kustomize`` renders the same directory with
a real kustomize (``kubectl kustomize``), where one is installed, to check
this one against it.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "images",
    "configMapGenerator",
    "replacements",
    "patches",
}
LOCAL_CONFIG = "config.kubernetes.io/local-config"


class Unsupported(Exception):
    """The kustomization uses something this subset does not implement."""


def load(directory: Path) -> Object:
    kustomization: Object = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return kustomization


def build(directory: Path, kustomization: Object | None = None) -> list[Object]:
    """What ``kustomize build directory`` emits; ``kustomization`` stands in
    for the directory's kustomization.yaml (to try other settings)."""
    objects = _accumulate(directory, load(directory) if kustomization is None else kustomization)
    return [o for o in objects if o["metadata"].get("annotations", {}).get(LOCAL_CONFIG) != "true"]


def _accumulate(directory: Path, kustomization: Object) -> list[Object]:
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"{directory}: {sorted(unknown)}")
    objects = _resources(directory, kustomization)
    for component in kustomization.get("components", []):
        component_directory = directory / component
        found = load(component_directory)
        if found.get("components"):
            raise Unsupported(f"{component_directory}: components of a component")
        objects = objects + _resources(component_directory, found)
        own_of_component = {k: v for k, v in found.items() if k != "resources"}
        objects = _apply(component_directory, own_of_component, objects)
    own = {k: v for k, v in kustomization.items() if k not in ("resources", "components")}
    return _apply(directory, own, objects)


def _resources(directory: Path, kustomization: Object) -> list[Object]:
    objects: list[Object] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if not path.is_file():
            raise Unsupported(f"{path}: only files are implemented as resources")
        objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return objects


def _apply(directory: Path, kustomization: Object, objects: list[Object]) -> list[Object]:
    """A component's or this kustomization's own generators and transformers."""
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"{directory}: {sorted(unknown)}")
    objects = copy.deepcopy(objects)
    objects.extend(generate_config_map(g) for g in kustomization.get("configMapGenerator", []))
    for patch in kustomization.get("patches", []):
        apply_patch(patch, objects)
    for image in kustomization.get("images", []):
        set_image(image, objects)
    for replacement in kustomization.get("replacements", []):
        replace(replacement, objects)
    return objects


# ---------------------------------------------------------------- generators


def generate_config_map(generator: Object) -> Object:
    if set(generator) - {"name", "literals", "options"}:
        raise Unsupported(f"configMapGenerator {generator}")
    options = generator.get("options", {})
    if set(options) - {"disableNameSuffixHash", "annotations"} or not options.get(
        "disableNameSuffixHash"
    ):
        raise Unsupported("a generated name with a hash suffix")
    data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
    metadata: Object = {"name": generator["name"]}
    if options.get("annotations"):
        metadata["annotations"] = dict(options["annotations"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


# ---------------------------------------------------------------- transformers


def selected(selector: Object, obj: Object) -> bool:
    if set(selector) - {"kind", "name"}:
        raise Unsupported(f"selector {selector}")
    kind, name = obj["kind"], obj["metadata"]["name"]
    return selector.get("kind", kind) == kind and selector.get("name", name) == name


def apply_patch(patch: Object, objects: list[Object]) -> None:
    """A strategic merge patch that only adds or replaces mappings and
    scalars, or a JSON patch (a list of operations, as kustomize tells them
    apart) that only adds."""
    if set(patch) - {"target", "patch"}:
        raise Unsupported(f"patch {patch}")
    body = yaml.safe_load(patch["patch"])
    matches = [o for o in objects if selected(patch["target"], o)]
    if not matches:
        raise ValueError(f"patch target {patch['target']} matches nothing")
    for obj in matches:
        if isinstance(body, list):
            for operation in body:
                _json_add(obj, operation)
        else:
            _merge(obj, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")})


def _json_add(obj: Object, operation: Object) -> None:
    """RFC 6902 ``add``: into a mapping by key, into a list at an index or at
    its end (``-``); a missing parent is an error, as in kustomize."""
    if set(operation) != {"op", "path", "value"} or operation["op"] != "add":
        raise Unsupported(f"JSON patch operation {operation}")
    pointer = operation["path"]
    if not pointer.startswith("/"):
        raise ValueError(f"JSON patch path {pointer!r} does not start with /")
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation["value"])
    if isinstance(node, list):
        if last == "-":
            node.append(value)
        elif 0 <= int(last) <= len(node):
            node.insert(int(last), value)
        else:
            raise ValueError(f"JSON patch path {pointer!r}: index out of range")
    else:
        node[last] = value


def _merge(into: Object, patch: Object) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list) or isinstance(into.get(key), list):
            raise Unsupported(f"strategic merge of the list {key!r}")
        else:
            into[key] = copy.deepcopy(value)


def split_image(image: str) -> tuple[str, str]:
    """(name, ':tag' or '@digest' or '')."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    name, colon, tag = image.rpartition(":")
    if colon and "/" not in tag:
        return name, ":" + tag
    return image, ""


def set_image(entry: Object, objects: list[Object]) -> None:
    if set(entry) - {"name", "newName", "newTag"}:
        raise Unsupported(f"image {entry}")
    for container in containers_of(objects):
        name, reference = split_image(container["image"])
        if name == entry["name"]:
            tag = ":" + entry["newTag"] if "newTag" in entry else reference
            container["image"] = entry.get("newName", name) + tag


def containers_of(found: Any) -> list[Object]:
    """Every container and init container anywhere in ``found``."""
    if isinstance(found, list):
        return [c for item in found for c in containers_of(item)]
    if not isinstance(found, dict):
        return []
    own = [c for key in ("containers", "initContainers") for c in found.get(key, [])]
    return own + [c for value in found.values() for c in containers_of(value)]


_PATH_PART = re.compile(r"\[[^\]]*\]|[^.\[\]]+")


def field_path(path: str) -> list[str]:
    return _PATH_PART.findall(path)


def _step(node: Any, part: str) -> tuple[Any, Any]:
    """(container, key) of one step of a field path."""
    if part.startswith("["):
        key, _, value = part[1:-1].partition("=")
        matches = [i for i, item in enumerate(node) if item.get(key) == value]
        if len(matches) != 1:
            raise ValueError(f"{part} matches {len(matches)} items")
        return node, matches[0]
    if part not in node:
        raise ValueError(f"no field {part}")
    return node, part


def get_field(obj: Object, path: str) -> Any:
    node: Any = obj
    for part in field_path(path):
        parent, key = _step(node, part)
        node = parent[key]
    return node


def set_field(obj: Object, path: str, value: str, options: Object) -> None:
    """kustomize's replacement of one field: with a delimiter, the value is
    split on it and the piece at ``index`` replaced (index < 0 prepends, an
    index past the end appends)."""
    if set(options) - {"delimiter", "index"}:
        raise Unsupported(f"replacement options {options}")
    node: Any = obj
    parts = field_path(path)
    for part in parts[:-1]:
        parent, key = _step(node, part)
        node = parent[key]
    parent, key = _step(node, parts[-1])
    delimiter = options.get("delimiter", "")
    if delimiter:
        pieces = str(parent[key]).split(delimiter)
        index = options.get("index", 0)
        if index < 0:
            pieces.insert(0, value)
        elif index >= len(pieces):
            pieces.append(value)
        else:
            pieces[index] = value
        value = delimiter.join(pieces)
    parent[key] = value


def replace(replacement: Object, objects: list[Object]) -> None:
    if set(replacement) - {"source", "targets"}:
        raise Unsupported(f"replacement {replacement}")
    source = dict(replacement["source"])
    path = source.pop("fieldPath")
    sources = [o for o in objects if selected(source, o)]
    if len(sources) != 1:
        raise ValueError(f"replacement source {source} matches {len(sources)} objects")
    value = get_field(sources[0], path)
    for target in replacement["targets"]:
        if set(target) - {"select", "fieldPaths", "options"}:
            raise Unsupported(f"replacement target {target}")
        matches = [o for o in objects if selected(target["select"], o)]
        if not matches:
            raise ValueError(f"replacement target {target['select']} matches nothing")
        for obj in matches:
            for target_path in target["fieldPaths"]:
                set_field(obj, target_path, value, target.get("options", {}))


# ---------------------------------------------------------------- the real one


def real_kustomize() -> list[str] | None:
    """A command that runs kustomize v4.1 or later (replacements), or None."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True, check=False, timeout=60
    )
    found = re.search(r"Kustomize Version: v(\d+)\.(\d+)", done.stdout)
    if found is None or (int(found[1]), int(found[2])) < (4, 1):
        return None
    return [kubectl, "kustomize"]


def render_with(command: list[str], directory: Path) -> list[Object]:
    done = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, check=True, timeout=120
    )
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]
