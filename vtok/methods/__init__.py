"""Built-in methods; each file registers itself by name on import."""

from . import doccorr, fastv, pool, random, tome  # noqa: F401
