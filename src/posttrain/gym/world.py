"""The generated world: invented countries, capitals and currencies, plus a fixed word list.

Everything is derived from one fixed seed, so the pretraining corpus, the tasks and the
verifiers all agree on the same facts without shipping a data file. The names are
pronounceable syllable strings that appear in no real corpus, which is what makes the
facts a skill the bundled model must have learned in pretraining.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

WORLD_SEED = 20240601
NUM_COUNTRIES = 100

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th"]
_COUNTRY_ENDINGS = ["ia", "land", "ar", "os", "eth", "ane"]

# Common short words for the string-transform skills (reverse, uppercase, repeat). Lower case,
# 3-6 letters, so that a reversal is a short memorisable string for a 4M-parameter model.
WORDS = (
    "apple bread chair cloud dance eagle field glass horse house juice knife lemon light money music "
    "night ocean paper plant queen radio river robot salt sheep shirt smile snake stone storm sugar "
    "table tiger train water whale wheel window winter world yellow bird boat book cake card coat "
    "corn desk door dream drum farm fire fish flag frog gate gift goat gold hand hill king lake lamp "
    "leaf lion milk moon nest nose park pear pen pig rain ring road rock rose sand ship shoe snow "
    "song star sun tree wind wolf wood yard zoo bell blue green black white happy quiet brave"
).split()


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    currency: str


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


@lru_cache(maxsize=1)
def countries() -> tuple[Country, ...]:
    """The world's countries, deterministic in WORLD_SEED; names, capitals and currencies are all distinct."""
    rng = random.Random(WORLD_SEED)
    seen: set[str] = set(WORDS)
    out = []

    def fresh(make) -> str:
        while True:
            s = make()
            if s not in seen and 3 <= len(s) <= 10:
                seen.add(s)
                return s

    while len(out) < NUM_COUNTRIES:
        name = fresh(lambda: (_syllable(rng) + rng.choice(_COUNTRY_ENDINGS)).capitalize())
        capital = fresh(lambda: (_syllable(rng) + _syllable(rng)).capitalize())
        currency = fresh(lambda: _syllable(rng) + rng.choice(["o", "a", "en"]))
        out.append(Country(name, capital, currency))
    return tuple(out)


@lru_cache(maxsize=1)
def by_name() -> dict[str, Country]:
    return {c.name: c for c in countries()}
