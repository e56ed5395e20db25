"""docs/api.md must be exactly what tools/gendocs.py writes from protos/ (as the stubs must be what
tools/genproto.py writes), and must cover the whole contract."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

API_DOC = ROOT / "docs" / "api.md"


def test_api_doc_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gendocs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    hint = "run `python tools/gendocs.py` (`make docs`)"
    assert result.returncode == 0, f"docs/api.md drifted from protos/; {hint}:\n{result.stderr}"


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "api.md"
    stale.write_text("# stale\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gendocs.py"), "--check", "--out", str(stale)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "out of date" in result.stderr


def test_api_doc_covers_every_rpc_message_and_enum() -> None:
    from wafer_proto.v1 import common_pb2, index_pb2, inference_pb2, jobs_pb2, models_pb2

    text = API_DOC.read_text(encoding="utf-8")
    for module in (common_pb2, index_pb2, inference_pb2, jobs_pb2, models_pb2):
        file = module.DESCRIPTOR
        for service in file.services_by_name.values():
            assert f'<a name="{service.full_name}"></a>' in text
            for method in service.methods:
                assert f"| `{method.name}` |" in text, method.full_name
        for message in file.message_types_by_name.values():
            assert f'<a name="{message.full_name}"></a>' in text
            for field in message.fields:
                assert f"| `{field.name}` | {field.number} |" in text, f"{message.full_name}.{field.name}"
        for enum in file.enum_types_by_name.values():
            assert f'<a name="{enum.full_name}"></a>' in text
            for value in enum.values:
                assert f"| `{value.name}` | {value.number} |" in text, value.name


def test_api_doc_links_resolve() -> None:
    text = API_DOC.read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a name="([^"]+)"></a>', text))
    headings = {h.strip().lower().replace(" ", "-") for h in re.findall(r"^##+ ([^`\n]+)$", text, re.MULTILINE)}
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors or target in headings, f"broken link #{target}"


def test_error_table_names_every_status_the_server_maps() -> None:
    from wafer.rpc.status import STATUS_BY_ERROR

    text = API_DOC.read_text(encoding="utf-8")
    table = text[text.index("## Errors") :]
    for name in [*(code.name for code in STATUS_BY_ERROR.values()), "INTERNAL"]:
        assert f"| `{name}` |" in table, f"the error table in tools/gendocs.py misses {name}"


def test_models_yaml_reference_covers_every_field() -> None:
    from wafer.specs import Catalog, ModelSpec

    text = (ROOT / "docs" / "models-yaml.md").read_text(encoding="utf-8")
    # `name` is the entry's key and `base_dir` is set by the loader; neither is written in the file.
    fields = [
        *(f for f in ModelSpec.model_fields if f != "name"),
        *(f for f in Catalog.model_fields if f != "base_dir"),
    ]
    missing = [f for f in fields if f"| `{f}` |" not in text]
    assert not missing, f"docs/models-yaml.md does not describe {missing}"


def test_models_yaml_reference_lists_every_backend_option_and_file_role() -> None:
    from wafer.backends import available_backends

    text = (ROOT / "docs" / "models-yaml.md").read_text(encoding="utf-8")
    section = text[text.index("## Backend options and extra files") :]
    for name, backend in available_backends().items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/models-yaml.md has no options row for backend {name!r}"
        names = [*backend.options_model.model_fields, *backend.required_files, *backend.optional_files]
        missing = [n for n in names if f"`{n}`" not in row]
        assert not missing, f"docs/models-yaml.md does not describe {name}'s {missing}"


def test_models_yaml_reference_names_every_backend_in_the_backend_field() -> None:
    from wafer.backends import available_backends

    text = (ROOT / "docs" / "models-yaml.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `backend` |"))
    missing = [name for name in available_backends() if f"`{name}`" not in row]
    assert not missing, f"docs/models-yaml.md's `backend` row does not name {missing}"
    task_row = next(line for line in text.splitlines() if line.startswith("| `tasks` |"))
    untold = [name for name in available_backends() if f"`{name}` models" not in task_row]
    assert not untold, f"docs/models-yaml.md's `tasks` row does not say what {untold} models do"


def test_operations_lists_every_setting() -> None:
    from wafer.config import Settings

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields if f"`WAFER_{name.upper()}`" not in text]
    assert not missing, f"docs/operations.md does not list the settings {missing}"


def layout_entries() -> list[Path]:
    """The files and folders the README's Layout section names, as paths from the repository root."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]
    entries: list[Path] = []
    parent = Path()
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 4:  # a description's second line
            continue
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        if indent == 0 and names.endswith("/"):
            parent = Path(names)
        for name in re.split(r",\s*", names):
            if "|" in name:  # tests/unit|integration|e2e
                head, _, tails = name.rpartition("/")
                entries += [Path(head) / tail for tail in tails.split("|")]
            else:
                entries.append(parent / name if indent else Path(name))
    return entries


def test_readme_layout_names_what_exists() -> None:
    entries = layout_entries()
    assert Path("server/wafer/scheduler/") in entries or Path("server/wafer/scheduler") in entries
    missing = [str(path) for path in entries if not (ROOT / path).exists()]
    assert not missing, f"README.md's Layout names what is not in the tree: {missing}"
    assert len(entries) == len(set(entries)), "README.md's Layout names something twice"


def test_readme_layout_names_every_server_module() -> None:
    named = {path.as_posix().rstrip("/") for path in layout_entries()}
    package = ROOT / "server" / "wafer"
    modules = [
        child
        for child in package.iterdir()
        if (child.suffix == ".py" and child.name not in {"__init__.py", "__main__.py"})
        or (child.is_dir() and (child / "__init__.py").exists())
    ]
    unnamed = [child.name for child in modules if child.relative_to(ROOT).as_posix() not in named]
    assert not unnamed, f"README.md's Layout does not name server/wafer/{unnamed}"


def documented_commands() -> list[tuple[str, int, list[str]]]:
    """Every `wafer ...` command line in the code blocks of README.md and docs/ (file, line, arguments),
    diagrams and comments left out."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_code = False
        # A shell line continued with a backslash is read whole.
        text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip().startswith("```"):
                in_code = not in_code
                continue
            match = re.search(r"(?:^|[\s|])(?:\.venv/bin/)?wafer ([^#|&;]*)", line)
            if not in_code or match is None or any(c in line for c in "─┐┘▶"):
                continue
            found.append((path.name, number, shlex.split(match.group(1))))
    return found


def test_documented_commands_parse() -> None:
    """A command the docs show runs as shown: its command, options and arguments are the CLI's."""
    import typer
    from typer._click.exceptions import UsageError

    from wafer_client.cli import app

    root = typer.main.get_command(app)
    commands = documented_commands()
    assert len(commands) > 20
    wrong = []
    for name, number, args in commands:
        try:
            context = root.make_context("wafer", args)
            command = root
            # A group keeps the sub-command and what follows it (click's `_protected_args`) for later.
            while hasattr(command, "resolve_command") and (rest := [*context._protected_args, *context.args]):
                sub_name, command, sub_args = command.resolve_command(context, rest)
                context = command.make_context(sub_name, sub_args, parent=context)
        except UsageError as exc:
            wrong.append(f"{name}:{number}: wafer {shlex.join(args)}: {exc.format_message()}")
    assert not wrong, "documented commands the CLI refuses:\n" + "\n".join(wrong)
