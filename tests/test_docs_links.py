"""Every relative link in the repository's Markdown resolves, and every document is reachable.

The docs live beside what they document (README.md for a newcomer, then
deploy/README.md, proxy/README.md, proxy/emulator/README.md,
tests/bench/README.md, ...). When a section moves to another file, the
``[Logs](#logs)`` links that pointed at it stay behind, and GitHub renders them
as links to nowhere without any warning. So this test reads every ``*.md`` file
of the repository (outside hidden and build directories), takes every inline
link, image, reference definition and ``<a href>`` outside code, and checks
that a relative target names an existing file or directory inside the
repository, and that a ``#fragment`` names a heading (or an ``<a id>`` /
``<a name>`` anchor) of the Markdown file it points into.

Anchors follow GitHub's rules: the heading's text as rendered (code spans keep
their content, link markup and HTML tags go), lower-cased, every character
other than a letter, digit, space, ``-`` or ``_`` dropped, each space turned
into ``-``, and ``-1``, ``-2``, ... added to a repeated anchor. Headings and
links inside fenced code blocks and code spans are not Markdown and are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Not part of the repository's docs: virtualenvs, caches and build output.
_SKIP_DIRS = {"node_modules", "build", "dist", "__pycache__", "venv"}
# The newcomer's page must link each of these (its "Where to read next").
MOVED_DOCS = ("deploy/README.md", "proxy/README.md", "proxy/emulator/README.md", "tests/bench/README.md")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
# A code span: a run of backticks, then anything up to the same run, never across a blank line.
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*<?([^\s>]+)>?", re.MULTILINE)
_HTML_HREF = re.compile(r"<a\s[^>]*?href=\"([^\"]*)\"", re.IGNORECASE)
_HTML_ANCHOR = re.compile(r"<a\s[^>]*?\b(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto: ... : not ours to check


@dataclass(frozen=True)
class Link:
    line: int
    target: str


def _skipped(directory: str) -> bool:
    return directory.startswith(".") or directory in _SKIP_DIRS or directory.endswith(".egg-info")


def markdown_files(root: Path = ROOT) -> list[Path]:
    """Every ``*.md`` file of the repository, pruning hidden and build directories as it walks."""
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _skipped(d))
        found.extend(Path(directory, f) for f in sorted(files) if f.endswith(".md"))
    return found


def _without_fences(text: str) -> str:
    """The text with every fenced code block's lines blanked (line numbers kept)."""
    out: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append("")
        elif fence is not None:
            if (
                match
                and match.group(1)[0] == fence[0]
                and len(match.group(1)) >= len(fence)
                and (line.strip() == match.group(1))
            ):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def _blank(match: re.Match[str]) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    """The Markdown outside code and comments: fences, code spans, ``<!-- -->`` blanked, lines kept."""
    return _COMMENT.sub(_blank, _CODE_SPAN.sub(_blank, _without_fences(text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's source text."""
    text = _CODE_SPAN.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # so does inline HTML
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every fragment a page answers to: its headings' anchors, repeats numbered, and HTML anchors."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in _without_fences(text).split("\n"):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found.update(_HTML_ANCHOR.findall(prose(text)))
    return found


def links(text: str) -> Iterator[Link]:
    """Every link target written outside code, with the line it starts on."""
    body = prose(text)
    for pattern, group in ((_INLINE_LINK, 2), (_REFERENCE_DEF, 1), (_HTML_HREF, 1)):
        for match in pattern.finditer(body):
            yield Link(body.count("\n", 0, match.start(group)) + 1, match.group(group))


def problems(doc: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link of ``doc``: a missing file, a dead anchor, a way out."""
    found: list[str] = []
    root = root.resolve()
    for link in links(doc.read_text(encoding="utf-8")):
        if not link.target or _SCHEME.match(link.target):
            continue
        path_part, _, fragment = link.target.partition("#")
        path_part, fragment = unquote(path_part.partition("?")[0]), unquote(fragment)
        if not path_part:
            dest = doc.resolve()
        elif path_part.startswith("/"):  # GitHub reads a leading / as the repository root
            dest = (root / path_part.lstrip("/")).resolve()
        else:
            dest = (doc.parent / path_part).resolve()
        where = f"{doc.relative_to(root)}:{link.line}: {link.target}"
        if not dest.is_relative_to(root):
            found.append(f"{where}: leaves the repository")
        elif not dest.exists():
            found.append(f"{where}: no such file or directory")
        elif fragment and (not dest.is_file() or dest.suffix.lower() != ".md"):
            found.append(f"{where}: an anchor into something that is not a Markdown file")
        elif fragment and fragment not in anchors(dest.read_text(encoding="utf-8")):
            found.append(f"{where}: {dest.relative_to(root)} has no heading or anchor #{fragment}")
    return found


def linked_docs(doc: Path) -> set[Path]:
    """The Markdown files ``doc`` links to (itself excluded)."""
    out: set[Path] = set()
    for link in links(doc.read_text(encoding="utf-8")):
        path_part = unquote(link.target.partition("#")[0].partition("?")[0])
        if path_part and not _SCHEME.match(path_part) and path_part.lower().endswith(".md"):
            base = ROOT if path_part.startswith("/") else doc.parent
            out.add((base / path_part.lstrip("/")).resolve())
    out.discard(doc.resolve())
    return out


DOCS = markdown_files()


# ------------------------------------------------------------- the repository
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    assert not problems(doc), "dead links:\n" + "\n".join(problems(doc))


def test_the_scan_sees_the_docs_and_their_links() -> None:
    """The loop above ran over the real docs, which do link each other (a scan finding nothing passes)."""
    names = {str(d.relative_to(ROOT)) for d in DOCS}
    assert {"README.md", "deploy/systemd/README.md", *MOVED_DOCS} <= names
    relative = [
        link
        for doc in DOCS
        for link in links(doc.read_text(encoding="utf-8"))
        if link.target and not _SCHEME.match(link.target)
    ]
    # 76 relative links, 58 with an anchor, when this was written: far fewer means the parser broke.
    assert len(relative) >= 50, f"only {len(relative)} relative links found: is the parser broken?"
    assert sum("#" in link.target for link in relative) >= 40


def test_the_readme_links_every_moved_document() -> None:
    readme = ROOT / "README.md"
    missing = [doc for doc in MOVED_DOCS if (ROOT / doc).resolve() not in linked_docs(readme)]
    assert not missing, f"README.md's 'Where to read next' does not link {missing}"


def test_every_document_is_reachable_from_the_readme() -> None:
    seen, todo = {(ROOT / "README.md").resolve()}, [(ROOT / "README.md").resolve()]
    while todo:
        for nxt in linked_docs(todo.pop()) - seen:
            if nxt.exists():
                seen.add(nxt)
                todo.append(nxt)
    unreachable = sorted(str(d.relative_to(ROOT)) for d in DOCS if d.resolve() not in seen)
    assert not unreachable, f"no chain of links from README.md reaches {unreachable}"


# ---------------------------------------------------- the checker's own rules
@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The 401 retry, precisely", "the-401-retry-precisely"),
        ("Credentials rejected (`invalid_client`)", "credentials-rejected-invalid_client"),
        (
            "Cost per request: `python -m tests.bench.proxy_bench`",
            "cost-per-request-python--m-testsbenchproxy_bench",
        ),
        ("Control surface (`/_emulator/`)", "control-surface-_emulator"),
        (
            "Tokens: how the proxy talks to the token endpoint",
            "tokens-how-the-proxy-talks-to-the-token-endpoint",
        ),
        ("check-config and explain", "check-config-and-explain"),
        ("VMs (systemd)", "vms-systemd"),
        ("deploy/", "deploy"),
        ("See [Logs](#logs) *now*", "see-logs-now"),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_repeated_headings_are_numbered_and_code_is_not_a_heading() -> None:
    text = "# Metrics\n\n## Metrics\n\n```sh\n# not a heading\n```\n\n### Metrics ###\n"
    text += '<a id="old-name"></a>\n'
    assert anchors(text) == {"metrics", "metrics-1", "metrics-2", "old-name"}


def test_the_checker_reports_each_kind_of_dead_link(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README.md").write_text("# Sub page\n\n## Logs\n", encoding="utf-8")
    (tmp_path / "data.txt").write_text("x", encoding="utf-8")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Top\n\n## Here\n\n"
        "[ok](#here) [ok](sub/README.md#logs) [ok](sub/) [ok](/sub/README.md) [ok](https://x.example/#y)\n"
        "`[code](#in-a-code-span)` and\n```\n[fenced](#in-a-fence)\n```\n"
        "[gone](#logs)\n"
        "[gone](sub/README.md#metrics)\n"
        "[gone](missing.md)\n"
        "![gone](img/none.png)\n"
        "[gone](data.txt#L3)\n"
        "[gone](../outside.md)\n"
        "<!-- [not rendered](#in-a-comment) -->\n"
        "[gone]: other/missing.md\n"
        '<a href="sub/README.md#nope">gone</a>\n',
        encoding="utf-8",
    )
    found = problems(doc, tmp_path)
    assert [p.split(": ", 1)[0] for p in found] == [f"README.md:{n}" for n in (*range(10, 16), 17, 18)]
    assert "README.md has no heading or anchor #logs" in found[0]
    assert "sub/README.md has no heading or anchor #metrics" in found[1]
    assert found[2].endswith("no such file or directory") and found[3].endswith("no such file or directory")
    assert "not a Markdown file" in found[4]
    assert found[5].endswith("leaves the repository")
    assert found[6].endswith("no such file or directory")
    assert found[7].endswith("sub/README.md has no heading or anchor #nope")
