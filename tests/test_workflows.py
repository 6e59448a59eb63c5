"""The GitHub workflows run what the README and .ci/run run: make install and make test on every push, make book
(with its link check) and the standard Pages actions to publish the book."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def steps(workflow: str) -> list[dict]:
    data = yaml.safe_load((WORKFLOWS / workflow).read_text())
    return [step for job in data["jobs"].values() for step in job.get("steps", [])]


def test_the_test_workflow_runs_what_ci_runs():
    data = yaml.safe_load((WORKFLOWS / "test.yml").read_text())
    triggers = data[True]   # YAML 1.1 reads the key `on` as True
    assert "push" in triggers and "pull_request" in triggers
    commands = [step["run"] for step in steps("test.yml") if "run" in step]
    ci = re.findall(r"^stage \w+ (make \w+)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert ci and commands[:len(ci)] == ci, (commands, ci)
    readme = (ROOT / "README.md").read_text()
    assert all(f"\n{command} " in readme for command in ("make run", "make test")) and "make run" in commands


def test_the_book_workflow_builds_checks_and_publishes():
    assert "make book" in [step.get("run") for step in steps("book.yml")]
    used = [step["uses"].split("@")[0] for step in steps("book.yml") if "uses" in step]
    assert {"actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages"} <= set(used)
    upload = next(s for s in steps("book.yml") if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    book = re.search(r"^book:.*?\n\n", (ROOT / "Makefile").read_text(), re.M | re.S).group(0)
    assert "book/check_links.py _build/html" in book
