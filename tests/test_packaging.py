"""What the registry package holds, and the metadata it is published with.

comfy-cli (`comfy node publish`) zips the git-tracked files minus those matching .comfyignore
(pathspec "gitwildmatch", comfy_cli/file_utils.py zip_files); this applies the same rule.
"""
from __future__ import annotations

import re
import subprocess
import tomllib
import warnings
from pathlib import Path

import pathspec
import pytest

REPO = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    """What `git ls-files` lists once the working tree is committed (tracked, or new and not ignored)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}): the registry package is built from git's file list")
    return sorted({line for line in out.splitlines() if line and (REPO / line).is_file()})


def registry_package() -> list[str]:
    patterns = [line.strip() for line in (REPO / ".comfyignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    with warnings.catch_warnings():  # pathspec 1.x deprecates the name comfy-cli uses; same rules
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = pathspec.PathSpec.from_lines("gitwildmatch", patterns)
        return [f for f in tracked_files() if not spec.match_file(f)]


def test_registry_package_holds_what_users_need_and_nothing_else():
    package = registry_package()
    shipped = set(package)
    for folder in ("nodes", "pixart_core"):
        code = {f for f in tracked_files() if f.startswith(folder + "/") and f.endswith(".py")}
        assert code and code <= shipped, f"{folder}/ is missing from the package: {sorted(code - shipped)}"
    workflows = {f for f in tracked_files() if f.startswith("workflows/")}
    assert any(f.endswith(".json") for f in workflows) and workflows <= shipped
    assert {"__init__.py", "LICENSE", "NOTICE", "README.md", "requirements.txt", "pyproject.toml"} <= shipped
    assert [f for f in package if f.startswith(("tests/", "benchmarks/", ".ci/", "scripts/"))] == []
    assert [f for f in package if f.split("/")[0] not in {"nodes", "pixart_core", "workflows"} and "/" in f] == []
    assert not [f for f in package if "__pycache__" in f or f.endswith((".pyc", ".safetensors", ".pth"))]


def test_shipped_code_needs_nothing_left_out():
    """The package runs without the folders it leaves out: no shipped module imports them."""
    left_out = re.compile(r"^\s*(from|import)\s+(tests|benchmarks|scripts)\b|sys\.path.*(tests|scripts)", re.M)
    offenders = [f for f in registry_package() if f.endswith(".py") and left_out.search((REPO / f).read_text())]
    assert offenders == []


def test_registry_metadata_claims_only_what_is_true():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    meta, comfy = project["project"], project["tool"]["comfy"]
    assert meta["license"] == {"file": "LICENSE"}
    # tested on the CPU only: no accelerator is claimed until a GPU has run the tests
    assert not [c for c in meta["classifiers"] if c.startswith(("Environment :: GPU", "Environment :: NPU"))]
    assert "License :: OSI Approved :: Apache Software License" in meta["classifiers"]
    # no public repository is known: none is named (the registry treats urls as optional)
    assert "urls" not in meta
    assert comfy.get("Icon", None) is None  # an Icon is a URL; there is nowhere to point it yet
    assert meta["version"] == "0.1.0" and re.fullmatch(r"[a-z][a-z0-9-]*", meta["name"])
    runtime = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert meta["dependencies"] == [r for r in runtime if r]  # one list of runtime needs
    assert not [d for d in meta["dependencies"] if d.split("=")[0].split(">")[0].strip() == "torch"]


def test_licence_is_the_full_apache_2_text():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "9. Accepting Warranty or Additional Liability." in text and "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 190


def readme_node_rows() -> list[list[str]]:
    """The bold names in the first cell of each row of README's "## Nodes" table (a row may name two
    nodes that share a description, as PixArt Sampler Select / PixArt Step Grid do)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Nodes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| **")]
    return [re.findall(r"\*\*(.+?)\*\*", row.split(" | ", 1)[0]) for row in rows]


def test_readme_node_list_names_every_registered_node():
    from test_nodes import _import_comfy_and_pack  # the pack imported inside the test ComfyUI host

    pack = _import_comfy_and_pack()
    registered = sorted(node.define_schema().display_name for node in pack.nodes.NODES)
    rows = readme_node_rows()
    listed = [name for row in rows for name in row]
    assert sorted(listed) == registered  # every node once, nothing that is not registered
    assert len(rows) == len(registered) - 1 and ["PixArt Sampler Select", "PixArt Step Grid"] in rows
