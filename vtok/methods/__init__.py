"""Built-in methods; each file registers itself by name on import."""

from . import doccorr, fastv, hiprune, holitom, matryoshka, pool, quota, random, todre, tokenflex, tome, transprune, vqtoken  # noqa: F401
