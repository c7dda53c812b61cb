"""Built-in methods; each file registers itself by name on import."""

from . import fastv, hiprune, pool, random, tome  # noqa: F401
