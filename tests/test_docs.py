"""The README and docs/ hold together: links land, the README's tables and verbs match the code, the seed contract
states the environment the code pins. Cheap: no torch, no Ray."""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.numerics import CPU_NUMERICS_ENV

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.*)$", page.read_text(), re.M)}


def test_every_relative_link_lands_on_a_file_and_heading():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{page.name}: {target}"


def test_the_readme_is_short_with_both_set_up_commands_and_every_verb():
    from kandinsky_batch.cli import _parser

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert re.search(r"^make demo {4}# installs into \.venv", text, re.M)
    assert re.search(r"^make test {4}# installs into \.venv", text, re.M)
    verbs = next(a for a in _parser()._actions if a.dest == "verb").choices
    cli = text.split("## The CLI", 1)[1]
    for verb in verbs:
        assert f"kandinsky-batch {verb} " in cli, verb


def test_the_model_table_lists_every_official_config():
    table = (ROOT / "README.md").read_text().split("## Models", 1)[1]
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        if config.stem.startswith("tiny") or "sweep" in config.stem:
            continue
        # `lite-pretrain-5s.yaml` / `-10s`: the 10 s twin shares its row
        assert f"`{config.name}`" in table or f"`{config.stem.replace('-10s', '-5s')}.yaml`" in table, config.name


def test_the_seed_contract_states_the_pinned_cpu_environment_and_reproduce():
    guarantees = (ROOT / "docs" / "guarantees.md").read_text()
    contract = guarantees.split("## The seed contract", 1)[1].split("\n## ", 1)[0]
    for name, value in CPU_NUMERICS_ENV.items():
        assert f"`{name}={value}`" in contract, name
    assert "torch.set_num_threads(1)" in contract and "same GPU model" in contract
    assert "kandinsky-batch reproduce OUTPUT_URI ID" in contract
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}={value}`" in readme for name, value in CPU_NUMERICS_ENV.items())


def test_every_metric_is_documented_with_its_registry_definition():
    """docs/scores.md has a section per registered metric holding its entry's definition word for word, and a
    table row naming it: the written definition a user reads is the one the code declares."""
    from pipelines.scoring.registry import METRICS

    text = (ROOT / "docs" / "scores.md").read_text()
    sections = dict(re.findall(r"^### (\w+)\n\n(.+?)\n(?=\n|$)", text, re.M | re.S))
    assert sorted(sections) == sorted(METRICS)
    for name, entry in METRICS.items():
        assert " ".join(sections[name].split()) == " ".join(entry.definition.split()), name
        assert re.search(rf"^\| `{name}` \| ", text, re.M), name


def _commands(text: str, prefix: str) -> list[str]:
    """The command lines of `text` starting with `prefix`, continuation lines joined, comments and spacing dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [" ".join(line.split("#")[0].split()) for line in joined.splitlines() if line.strip().startswith(prefix)]


def test_the_readmes_render_to_training_set_commands_are_what_make_demo_runs():
    section = (ROOT / "README.md").read_text().split("## A dataset", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    readme = _commands(section, "kandinsky-batch ")
    demo = [c.replace("$(BIN)/", "") for c in _commands((ROOT / "Makefile").read_text(), "$(BIN)/kandinsky-batch ")]
    assert [c.split()[1] for c in readme] == ["run", "score", "export"]
    for command in readme:
        assert any(ran.startswith(command) for ran in demo), command


def test_the_architecture_tree_names_every_module():
    """docs/architecture.md's tree is the newcomer's map: a module it does not name is one they cannot find."""
    tree = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(path.relative_to(ROOT)) for package in ("kandinsky_batch", "pipelines")
               for path in sorted((ROOT / package).rglob("*.py"))
               if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.name)}\b", tree)]
    assert missing == []
