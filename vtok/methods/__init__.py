"""Built-in methods; each file registers itself by name on import."""

from . import (  # noqa: F401
    doccorr, fastv, hiprune, holitom, matryoshka, pool, quota, random, tempme, todre, tokenflex, tome, transprune, vqtoken,
)
