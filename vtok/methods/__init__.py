"""Built-in methods; each file registers itself by name on import."""

from . import doccorr, fastv, hiprune, pool, random, todre, tome, transprune  # noqa: F401
