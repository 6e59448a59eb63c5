"""Sphinx extension: hide nbdev's `#|` directives and nbval's `# NBVAL_*` markers from the book's code cells.

The markers steer the tools (export, skip, hide) and mean nothing to a reader; the notebooks keep them.
"""
from docutils import nodes

MARKERS = ("#|", "# NBVAL_")


def strip_markers(text: str) -> str:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith(MARKERS)]
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def on_doctree_read(app, doctree):
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        if not any(line.lstrip().startswith(MARKERS) for line in text.splitlines()):
            continue
        stripped = strip_markers(text)
        block.children = [nodes.Text(stripped)]
        block.rawsource = stripped


def setup(app):
    app.connect("doctree-read", on_doctree_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
