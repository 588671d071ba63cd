"""The operator image, checked statically (no image is built here): multi-stage, a
pinned slim base, only runtime dependencies in the final stage, non-root, and the
chart's default tag following the package's version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def test_the_base_is_a_pinned_slim_python() -> None:
    args = dict(a.split("=", 1) for w, a in instructions() if w == "ARG" and "=" in a)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", args["PYTHON"]), args
    assert all(rest.split()[0] == "${PYTHON}" for w, rest in instructions() if w == "FROM")


def test_the_final_stage_has_no_build_tools_and_runs_as_non_root() -> None:
    build, final = stages()[0], stages()[-1]
    assert len(stages()) >= 2 and "AS" in build[0][1].upper().split()
    runs = " ".join(rest for word, rest in final if word == "RUN")
    assert not re.search(r"\b(gcc|g\+\+|make|build-essential|apt-get)\b", runs)
    assert "--no-index" in runs  # only the wheels built in the first stage
    assert not any(word in ("COPY", "ADD") and "--from" not in rest for word, rest in final)
    user = [rest for word, rest in final if word == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert [rest for word, rest in final if word == "ENTRYPOINT"] == ['["scangate"]']


def test_only_the_package_goes_into_the_build_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines and "!operator/" in lines
    assert not any(line.startswith("!") and ("tests" in line or ".venv" in line)
                   for line in lines)


def test_the_chart_image_follows_the_package_version() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "scangate" / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    values = yaml.safe_load((ROOT / "charts" / "scangate" / "values.yaml").read_text())
    assert values["image"]["tag"] == ""
    template = (ROOT / "charts" / "scangate" / "templates" / "deployment.yaml").read_text()
    assert ".Values.image.tag | default .Chart.AppVersion" in template


def test_the_malware_image_is_the_operator_image_with_clamav_at_the_package_version() -> None:
    from scangate.config import Settings

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    values = yaml.safe_load((ROOT / "charts" / "scangate" / "values.yaml").read_text())
    assert values["config"]["malwareImage"] == Settings().malware_image == (
        f"scangate/scangate-clamav:{version}")
    text = (ROOT / "Dockerfile.clamav").read_text()
    assert f"ARG SCANGATE=scangate/scangate:{version}" in text
    assert "apt-get install -y --no-install-recommends clamav" in text
    # Non-root, and no signature database of the build's day inside.
    assert "USER 65532:65532" in text and "/var/lib/clamav/*" in text
