"""mkdocs hooks for the docs site.

docs/index.md includes the README's overview, whose links point into `docs/` so that they work on
the repository's front page. On the site those pages sit next to index.md, so the overview is
put in here with that prefix dropped (pymdownx.snippets would include it only after mkdocs has
checked the page's links).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_INCLUDE = '--8<-- "README.md:overview"'


def on_page_markdown(markdown: str, page: Any, config: Any, **_: Any) -> str:
    if _INCLUDE not in markdown:
        return markdown
    readme = (Path(config["config_file_path"]).parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- --8<-- [start:overview] -->")
    end = readme.index("<!-- --8<-- [end:overview] -->")
    overview = readme[readme.index("\n", start) + 1 : end].replace("](docs/", "](")
    return markdown.replace(_INCLUDE, overview)
