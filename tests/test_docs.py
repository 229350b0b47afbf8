"""The documentation site: the generated configuration reference is current, and no page is orphaned."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hookgate.cli import docgen
from hookgate.cli import entry as cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference" / "configuration.md"
REGENERATE = "hookgate schema --builtin-only --markdown -o docs/reference/configuration.md"


def generated_reference(tmp_path: Path) -> str:
    out = tmp_path / "configuration.md"
    assert cli.main(["schema", "--builtin-only", "--markdown", "-o", str(out)]) == 0
    return out.read_text(encoding="utf-8")


def test_the_committed_config_reference_is_up_to_date(tmp_path: Path) -> None:
    assert REFERENCE.read_text(encoding="utf-8") == generated_reference(tmp_path), (
        f"docs/reference/configuration.md is out of date: run\n  {REGENERATE}"
    )


def test_the_config_reference_has_a_section_per_section_and_component(tmp_path: Path) -> None:
    page = generated_reference(tmp_path)
    headings = re.findall(r"^#+ (.+)$", page, flags=re.MULTILINE)
    for section in ("server", "broker", "egress", "sources.<name>", "endpoints.<name>", "routes[]"):
        assert f"`{section}`" in headings
    assert "`endpoints.<name>.retry.exponential`" in headings
    for component in ("Verifier `github`", "Access rule `ip_allow`", "Handshake `meta`"):
        assert component in headings
    for component in ("Signer `standard-webhooks`", "Endpoint auth `oauth2`", "Transform `shape`"):
        assert component in headings
    # Keys with their type and default; units named, not spelled out as patterns.
    assert '| `max_body` | size | `"1MiB"` |' in page
    assert '| `publish_timeout` | duration | `"5s"` |' in page
    assert "| `header` | string | required |" in page
    # A component's `type:` is in its heading, not a row.
    assert "| `type` |" not in page


def test_every_link_in_the_config_reference_has_its_section(tmp_path: Path) -> None:
    page = generated_reference(tmp_path)
    anchors = {docgen._slug(h) for h in re.findall(r"^#+ (.+)$", page, flags=re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", page))
    assert links and links <= anchors, sorted(links - anchors)


def test_schema_text_cannot_become_html() -> None:
    schema = {
        "$ref": "#/$defs/Config",
        "$defs": {
            "Config": {
                "type": "object",
                "description": "served at POST /webhooks/<name>",
                "properties": {
                    "a": {"type": "string", "description": "body.<path> | `a <b>`", "default": "x"}
                },
            }
        },
    }
    page = docgen.markdown(schema)
    assert "served at POST /webhooks/&lt;name&gt;" in page
    assert '| `a` | string | `"x"` | body.&lt;path&gt; \\| `a <b>` |' in page


class _MkDocsLoader(yaml.SafeLoader):
    """mkdocs.yml as plain data: its `!relative` tags are MkDocs' own."""


_MkDocsLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def test_every_docs_page_is_in_the_nav() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_MkDocsLoader)
    assert config["docs_dir"] == "docs"
    listed = nav_pages(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(listed)) == [], "pages missing from the nav in mkdocs.yml"
    assert sorted(set(listed) - set(pages)) == [], "the nav in mkdocs.yml lists pages that do not exist"
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"


def test_the_readme_keeps_what_the_site_includes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    overview = re.search(r"--8<-- \[start:overview\](.*)--8<-- \[end:overview\]", readme, flags=re.DOTALL)
    assert overview is not None, "README.md lost its overview markers, which docs/index.md includes"
    for heading in ("## The two commands", "## Quickstart", "## What hookgate guarantees"):
        assert heading in overview.group(1)
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    plugins = re.search(r"--8<-- \[start:plugins\](.*)--8<-- \[end:plugins\]", contributing, flags=re.DOTALL)
    assert plugins is not None, "CONTRIBUTING.md lost its plugins markers, which docs/plugins.md includes"
    assert "## Writing a plugin" in plugins.group(1) and "## Hook reference" in plugins.group(1)
