"""YAML as the seed writes it: ``vote: yes`` is the word ``yes``, not a boolean.

PyYAML follows YAML 1.1, where ``yes``/``no``/``on``/``off`` are booleans; YAML 1.2
(and most people) read them as words. ``load_yaml`` is PyYAML's safe loader with YAML
1.2's booleans: only ``true`` and ``false``.
"""

from __future__ import annotations

import re
from typing import Any, Final

import yaml

_BOOL: Final = "tag:yaml.org,2002:bool"


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose booleans are YAML 1.2's."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML text; ``yes``, ``no``, ``on``, ``off`` stay strings.

    Raises:
        yaml.YAMLError: the text is not YAML.
    """
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass
