"""Built-in methods; each file registers itself by name on import."""

from . import fastv, pool, random, todre, tome  # noqa: F401
