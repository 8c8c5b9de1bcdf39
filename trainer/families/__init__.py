"""Model families: one module each, one loop for all (see base.py for the interface)."""

from __future__ import annotations

from trainer.config import ConfigError
from trainer.families.base import Components, Conditioning, Family

__all__ = ["FAMILIES", "Components", "Conditioning", "Family", "get_family"]


def _families() -> dict[str, Family]:
    from trainer.families.sd import SDFamily
    from trainer.families.flux import FluxFamily
    from trainer.families.sd3 import SD3Family
    from trainer.families.sdxl import SDXLFamily

    return {family.name: family for family in (SDFamily(), SDXLFamily(), FluxFamily(), SD3Family())}


FAMILIES: dict[str, Family] = _families()


def get_family(name: str) -> Family:
    """The family called `name` ("sd", "sdxl")."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"family: {name!r} is not a supported family (supported: {', '.join(FAMILIES)})") from None
