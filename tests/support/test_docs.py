"""The documents: the README stays a front door (at most 200 lines), and every relative link in the project's
Markdown resolves, to a file and, where it names one, a heading of it (GitHub's anchors)."""

import os
import re

from helpers import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    names = [os.path.join(REPO, name) for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")]
    for folder in ("docs", "configs"):
        names += [os.path.join(REPO, folder, n) for n in sorted(os.listdir(os.path.join(REPO, folder)))
                  if n.endswith(".md")]
    return names


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped but hyphens and underscores, spaces to hyphens."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # no headings inside code blocks
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}


def test_the_readme_is_at_most_200_lines():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 200


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for path in markdown_files():
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # an address, not a file of the project
            name, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
            where = f"{os.path.relpath(path, REPO)}: {target}"
            if not os.path.exists(resolved):
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links: " + "; ".join(broken)
