"""Sphinx extension: each script once per page.

Under Jupyter Book 1 (Sphinx 7.4), the inline scripts that sphinx-thebe and sphinx-togglebutton add reach every page
twice, and the second `const THEBE_JS_URL = ...` is a JavaScript error ("Identifier 'THEBE_JS_URL' has already been
declared") in every reader's console. book/check_browser.py reports any such error.
"""


def unique(scripts: list) -> list:
    """The scripts in order, each (file, attributes, inline body) kept at its first place only (an inline script's
    file is None or "", depending on how it was added)."""
    seen, kept = set(), []
    for script in scripts:
        key = (getattr(script, "filename", script) or "", tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    return kept


def on_page(app, pagename, templatename, context, doctree):
    if "script_files" in context:
        context["script_files"] = unique(context["script_files"])


def setup(app):
    app.connect("html-page-context", on_page, priority=900)   # after the extensions that add scripts to a page
    return {"parallel_read_safe": True, "parallel_write_safe": True}
