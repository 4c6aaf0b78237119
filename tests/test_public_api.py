"""The public surface is exactly ``swarmbus.__all__``."""

from __future__ import annotations

import types

import swarmbus


def test_all_matches_public_attributes() -> None:
    public = {
        name
        for name, value in vars(swarmbus).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(swarmbus.__all__) - {"__version__"}


def test_every_error_derives_from_swarmbus_error() -> None:
    errors = [
        getattr(swarmbus, name)
        for name in swarmbus.__all__
        if name.endswith("Error") and isinstance(getattr(swarmbus, name), type)
    ]
    assert errors
    for error in errors:
        assert issubclass(error, swarmbus.SwarmbusError), error
