"""责任部门: the responsibility matrix (category x district -> department).

departments.yaml gives, per category, a district-level template ({district}教育局), a
city-level department for calls whose district is unknown, per-district overrides, and
keyword routes tried first (停电 -> the power company). Unknown districts are routed to
the city level and say so in the reason, so a dispatcher checks them. In an ASR transcript
a route keyword is also found by its sound (然气 for 燃气, 以保 for 医保) when no route
keyword is written out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from analysis.config import as_mapping, read_yaml, string_list
from analysis.errors import ConfigError
from analysis.phonetic import syllables


@dataclass(frozen=True)
class Assignment:
    district_template: str | None
    city: str | None
    overrides: Mapping[str, str]

    def department(self, district: str | None) -> tuple[str | None, str]:
        if district and district in self.overrides:
            return self.overrides[district], f"{district}的专门分工"
        if district and self.district_template:
            return self.district_template.format(district=district), f"按区分派（{district}）"
        if self.city:
            return self.city, "市级部门" if self.district_template is None else "区县不明，交市级部门"
        return None, ""


@dataclass(frozen=True)
class Route:
    keywords: tuple[str, ...]
    assignment: Assignment

    def heard_keyword(self, sounds: list[str], text: str) -> tuple[str, str] | None:
        """(keyword, the characters heard) for the first keyword of two or more Chinese syllables
        whose fuzzy toneless syllables occur in the text's, or None."""
        for keyword in self.keywords:
            target = _keyword_sounds(keyword)
            if target is None:
                continue
            for start in range(len(sounds) - len(target) + 1):
                if sounds[start:start + len(target)] == target:
                    return keyword, text[start:start + len(target)]
        return None


@functools.lru_cache(maxsize=None)
def _keyword_sounds(keyword: str) -> list[str] | None:
    """The fuzzy syllables of a route keyword of two or more Chinese characters, else None."""
    target = syllables(keyword) if len(keyword) >= 2 else None
    return target if target and "_" not in target else None


@dataclass(frozen=True)
class CategoryRouting:
    default: Assignment
    routes: tuple[Route, ...]


def _assignment(entry: Mapping, path: Path, key: str) -> Assignment:
    template = entry.get("district")
    city = entry.get("city")
    for name, value in (("district", template), ("city", city)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(path, f"{key}.{name} must be a department name")
    if template is not None and "{district}" not in template:
        raise ConfigError(path, f"{key}.district must contain {{district}}, got {template!r}")
    overrides = as_mapping(entry.get("overrides"), path, f"{key}.overrides")
    if template is None and city is None and not overrides:
        raise ConfigError(path, f"{key} names no department (district, city or overrides)")
    return Assignment(template, city, dict(overrides))


@dataclass(frozen=True)
class ResponsibilityMatrix:
    city: str
    fallback: str
    categories: Mapping[str, CategoryRouting]
    source: Path

    @classmethod
    def load(cls, path: Path) -> "ResponsibilityMatrix":
        data = read_yaml(path)
        city, fallback = data.get("city"), data.get("fallback")
        if not isinstance(city, str) or not isinstance(fallback, str) or not fallback:
            raise ConfigError(path, "city and fallback must be names")
        categories = {}
        for name, entry in as_mapping(data.get("categories"), path, "categories").items():
            entry = as_mapping(entry, path, f"categories.{name}")
            routes = []
            for index, route in enumerate(entry.get("routes") or []):
                route = as_mapping(route, path, f"categories.{name}.routes[{index}]")
                keywords = string_list(route.get("keywords"), path, f"categories.{name}.routes[{index}].keywords")
                if not keywords:
                    raise ConfigError(path, f"categories.{name}.routes[{index}] has no keywords")
                routes.append(Route(keywords, _assignment(route, path, f"categories.{name}.routes[{index}]")))
            categories[name] = CategoryRouting(_assignment(entry, path, f"categories.{name}"), tuple(routes))
        return cls(city, fallback, categories, path)

    def validate_against(self, categories: tuple[str, ...], districts: tuple[str, ...]) -> None:
        """Names in the matrix must exist in the taxonomy and the gazetteer (typos caught at load)."""
        for name, routing in self.categories.items():
            if name not in categories:
                raise ConfigError(self.source, f"category {name!r} is not in the taxonomy {list(categories)}")
            for assignment in (routing.default, *(route.assignment for route in routing.routes)):
                for district in assignment.overrides:
                    if district not in districts:
                        raise ConfigError(self.source, f"{name}: override for unknown district {district!r}")

    def assign(self, category: str, district: str | None, text: str, heard: bool = False) -> tuple[str, str]:
        """(department, reason). `heard`: the text is an ASR transcript (route keywords by sound too)."""
        routing = self.categories.get(category)
        if routing is None:
            return self.fallback, f"类型“{category}”无责任部门配置，转热线办"
        for route in routing.routes:
            keyword = next((word for word in route.keywords if word in text), None)
            if keyword:
                department, how = route.assignment.department(district)
                if department:
                    return department, f"{category} / 关键词“{keyword}” / {how}"
        sounds = syllables(text) if heard and routing.routes else None
        for route in routing.routes if sounds else ():
            found = route.heard_keyword(sounds, text)
            if found:
                department, how = route.assignment.department(district)
                if department:
                    return department, f"{category} / 关键词“{found[0]}”（转写为“{found[1]}”） / {how}"
        department, how = routing.default.department(district)
        if department is None:
            return self.fallback, f"{category}: 区县不明且无市级部门，转热线办"
        return department, f"{category} / {how}"
