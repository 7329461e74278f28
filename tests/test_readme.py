"""The README's configuration reference and the example configuration match the code."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

from bpleader.config import SECTIONS, parse_config, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_readme_embeds_the_generated_configuration_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- BEGIN config reference[^>]*-->\n(.*?)\n<!-- END config reference -->",
                  readme, re.S)
    assert m, "README.md lacks the config reference markers"
    assert m.group(1).strip() == reference_markdown().strip(), (
        "README's configuration reference is stale: paste the output of "
        "`bpleader check-config --reference` between the markers")


def test_example_config_names_every_field_and_is_valid() -> None:
    text = (ROOT / "deploy" / "bpleader.example.toml").read_text()
    # Commented-out fields count: they are documented, only not set.
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)
    doc = tomllib.loads(uncommented)
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name in doc.get(section, {}), f"example lacks {section}.{f.name}"
    parse_config(tomllib.loads(text), env={})
