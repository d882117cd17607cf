"""Small datasets bundled with the client (files in client/data/, sources and licences in its README)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

import numpy as np


@dataclass
class Cities:
    """World cities with coordinates: parallel lists/arrays, one entry per city."""

    names: list[str]
    countries: list[str]
    continents: list[str]
    latitude: np.ndarray
    longitude: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def prompts(self, template: str = "{city}, {country}") -> list[str]:
        """One prompt per city; the template may use {city}, {country} and {continent}."""
        return [template.format(city=c, country=k, continent=n)
                for c, k, n in zip(self.names, self.countries, self.continents)]

    @property
    def coordinates(self) -> np.ndarray:
        """(n, 2): latitude, longitude in degrees."""
        return np.stack([self.latitude, self.longitude], axis=1)


def world_cities() -> Cities:
    """466 cities on every inhabited continent (MIT, written for lmscope; see client/data/README.md)."""
    text = resources.files("lmscope.client").joinpath("data/world_cities.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    return Cities(names=[r["city"] for r in rows], countries=[r["country"] for r in rows],
                  continents=[r["continent"] for r in rows],
                  latitude=np.array([float(r["latitude"]) for r in rows]),
                  longitude=np.array([float(r["longitude"]) for r in rows]))
