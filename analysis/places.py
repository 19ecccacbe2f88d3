"""Where the problem is: district, street, community, compound, road and house number.

Known names come from the gazetteer (gazetteer.yaml); a call that names only a road or a
compound gets its district from there. Names not in the gazetteer are still picked up by
patterns (XX区, XX路12号, XX小区) so a dispatcher sees them, and a stated district that
the city does not have is reported as such (`district_unknown`) rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from analysis.config import read_yaml, string_list
from analysis.errors import ConfigError
from analysis.evidence import Evidence
from analysis.phonetic import PhoneticIndex, rhymes, syllables

_HAN = "\u4e00-\u9fa5"
# Words ending in 区 that are not districts (小区, 社区, 园区, 景区, ...).
# 城 is not among them: 东城区 and 西城区 are districts (of other cities); 主城区, 市城区 are not.
# 山 is not among them either: 南山区 is a district; 在山区 is stopped by its first character.
_NOT_DISTRICT_BEFORE = set("小社园景校片街辖市郊灾禁盲雷专厂商学生居住营工军矿病院考停服示试")
_NOT_DISTRICT_START = set("在住是的我到个这那去了和跟从往向给们主该本哪每各偏远")
# XX新区 (滨海新区) first, then XX区.
_DISTRICT_PATTERN = re.compile(rf"([{_HAN}]{{2}}新|[{_HAN}]{{2}})区(?![域别间分内外])")
_STREET_PATTERN = re.compile(rf"([{_HAN}]{{2,4}}街道)")
_COMMUNITY_PATTERN = re.compile(rf"([{_HAN}]{{2,4}}社区)")
_COMPOUND_PATTERN = re.compile(rf"([{_HAN}]{{2,6}}?(?:小区|花园|家园|新村|公寓|新城|大厦|宿舍))")
_ROAD_NUMBER_PATTERN = re.compile(rf"([{_HAN}]{{1,5}}?(?:大道|大街|路|街|巷|弄))(\d+)号")
_BUILDING_PATTERN = re.compile(r"(\d+)\s*(?:栋|幢|号楼)")
_UNIT_PATTERN = re.compile(r"(\d+)\s*单元")
_ROOM_PATTERN = re.compile(r"(\d+)\s*(?:室|户)")
# Leading words a pattern may swallow before a name (我家住在阳光小区 -> 阳光小区).
_LEADING_FILLER = re.compile(r"^(?:我家住在|我家在|我住在|我们|我家|住在|就在|位于|在|是|到|的)+")
# Characters of a name that must be heard alike for a half-heard match (the kind of place).
HALF_HEARD_FIXED = "路街道区"
# Pattern matches that point at a place without naming it (这个小区, 我们小区).
_DEMONSTRATIVE = re.compile(r"^(?:这|那|本|该|咱|哪|整个|一个|每个|各个|附近|旁边|隔壁|对面|我们|他们)")


@dataclass(frozen=True)
class District:
    name: str
    aliases: tuple[str, ...]
    streets: tuple[str, ...]
    communities: tuple[str, ...]
    roads: tuple[str, ...]
    compounds: tuple[str, ...]
    landmarks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gazetteer:
    city: str
    districts: tuple[District, ...]
    source: Path
    elsewhere: tuple[str, ...] = ()   # districts of other cities (a call naming one is outside the city)

    def __post_init__(self) -> None:
        names = [district.name for district in self.districts]
        if len(set(names)) != len(names):
            raise ConfigError(self.source, f"duplicate district names in {names}")

    @property
    def district_names(self) -> tuple[str, ...]:
        return tuple(district.name for district in self.districts)

    @classmethod
    def load(cls, path: Path) -> "Gazetteer":
        data = read_yaml(path)
        city = data.get("city")
        if not isinstance(city, str) or not city:
            raise ConfigError(path, "city must be a name")
        districts = []
        for index, entry in enumerate(data.get("districts") or []):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(path, f"districts[{index}] needs a name")
            name = entry["name"]
            districts.append(
                District(
                    name=name,
                    **{key: string_list(entry.get(key), path, f"districts[{name}].{key}") for key in ("aliases", "streets", "communities", "roads", "compounds", "landmarks")},
                )
            )
        if not districts:
            raise ConfigError(path, "no districts")
        own = {district.name for district in districts}
        elsewhere = tuple(name for name in dict.fromkeys(string_list(data.get("elsewhere"), path, "elsewhere")) if name not in own)
        return cls(city, tuple(districts), path, elsewhere)


@dataclass(frozen=True)
class Place:
    district: str | None = None
    district_source: str | None = None   # stated | gazetteer
    district_unknown: str | None = None  # a stated XX区 that the city does not have
    street: str | None = None
    community: str | None = None
    compound: str | None = None
    road: str | None = None
    landmark: str | None = None
    address: str | None = None           # the most precise address found, as said
    address_key: str | None = None       # what two tickets must share to be "the same address"
    heard_as: tuple[str, ...] = ()       # names found by sound: "冰湖去->滨湖区" (check them)
    evidence: tuple[Evidence, ...] = field(default=())

    @property
    def place_keys(self) -> tuple[str, ...]:
        """Coarser shared-place keys: the same compound, community or road."""
        return tuple(key for key in (self.compound, self.community, self.road, self.landmark) if key)

    def to_dict(self) -> dict:
        return {
            "district": self.district,
            "district_source": self.district_source,
            "district_unknown": self.district_unknown,
            "street": self.street,
            "community": self.community,
            "compound": self.compound,
            "road": self.road,
            "landmark": self.landmark,
            "address": self.address,
            "address_key": self.address_key,
            "heard_as": list(self.heard_as),
        }


class PlaceExtractor:
    def __init__(self, gazetteer: Gazetteer) -> None:
        self.gazetteer = gazetteer
        # name -> districts holding it; a name in two districts does not decide one.
        self._owners: dict[str, set[str]] = {}
        self._kind: dict[str, str] = {}
        for district in gazetteer.districts:
            for kind in ("streets", "communities", "roads", "compounds", "landmarks"):
                for name in getattr(district, kind):
                    self._owners.setdefault(name, set()).add(district.name)
                    self._kind[name] = kind
        # Longest first, so 南湖大道 wins over a shorter name inside it.
        self._known_names = sorted(self._owners, key=len, reverse=True)
        # Aliases match exactly only: a sound-alike is rewritten to the canonical name. Districts
        # of other cities are heard too (海电区 -> 海淀区), then reported as outside the city.
        self._sounds = PhoneticIndex([*self._owners, *gazetteer.district_names, *gazetteer.elsewhere])
        # Then the city's own roads, compounds and landmarks with one syllable half heard (望江越
        # -> 望江苑, 马桐路 -> 码头路, 无光小区 -> 湖光小区); not districts, whose names differ
        # from other cities' in one syllable (滨海区, 滨湖区; _half_heard_district has its own rule),
        # and not in the generic part of a name (建设了 is not 建设路).
        self._half_heard_sounds = PhoneticIndex(self._owners, half_heard=HALF_HEARD_FIXED)
        self._district_names = sorted(
            ((alias, district.name) for district in gazetteer.districts for alias in (district.name, *district.aliases)),
            key=lambda pair: len(pair[0]),
            reverse=True,
        )

    def _stated_district(self, text: str) -> tuple[str | None, int]:
        for alias, name in self._district_names:
            offset = text.find(alias)
            if offset >= 0:
                return name, offset
        return None, -1

    def _unknown_district(self, text: str) -> tuple[str | None, int]:
        for match in _DISTRICT_PATTERN.finditer(text):
            stem = match.group(1)
            if stem[-1] in _NOT_DISTRICT_BEFORE or stem[0] in _NOT_DISTRICT_START:
                continue
            return stem + "区", match.start()
        return None, -1

    def _half_heard_district(self, stated: str) -> str | None:
        """The one district of the city that a stated but unknown XY区 half sounds like: every
        syllable but one alike, that one rhyming (兵无区 -> 滨湖区, 冰骨区 -> 滨湖区). Only the
        city's own districts: the 190 of other cities would make too many near neighbours.
        A district of another city (gazetteer `elsewhere`) is what it says."""
        if stated in self.gazetteer.elsewhere:
            return None
        heard = syllables(stated)
        if not heard:
            return None
        candidates = set()
        for alias, name in self._district_names:
            target = syllables(alias)
            if not target or len(target) != len(heard) or alias[-1] != stated[-1]:
                continue
            alike = sum(a == b for a, b in zip(heard, target))
            if alike == len(heard) - 1 and all(a == b or rhymes(a, b) for a, b in zip(heard, target)):
                candidates.add(name)
        return candidates.pop() if len(candidates) == 1 else None

    def _protected(self, text: str) -> frozenset[int]:
        """Positions of names written out (known names, district aliases, other cities' districts)."""
        protected = set()
        for name in (*self._known_names, *(alias for alias, _ in self._district_names), *self.gazetteer.elsewhere):
            start = text.find(name)
            while start >= 0:
                protected.update(range(start, start + len(name)))
                start = text.find(name, start + 1)
        return frozenset(protected)

    def repair_by_sound(self, text: str) -> tuple[str, tuple[str, ...]]:
        """The text with sound-alike place names replaced by the gazetteer's (same length). Names
        with one syllable half heard are not repaired: extract reads them for the district only
        (_district_half_heard)."""
        matches = self._sounds.find(text, self._protected(text))
        if not matches:
            return text, ()
        characters = list(text)
        for match in matches:
            characters[match.offset:match.offset + len(match.name)] = match.name
        return "".join(characters), tuple(f"{match.heard}->{match.name}" for match in matches)

    def _district_half_heard(self, text: str, owners: list[set[str]]) -> tuple[str | None, tuple, tuple]:
        """(district, heard_as, evidence) from the names found with one syllable half heard, when
        they and the names found before point at one district. A half-heard name is a guess: it
        gives the district (and so the department), flagged for a dispatcher, but no compound,
        road or address: the duplicate model links by those (fitted with them, its written links
        fell by four of 143 in cross-validation; docs/analysis.md, ninth pass)."""
        matches = self._half_heard_sounds.find(text, self._protected(text))
        if not matches:
            return None, (), ()
        candidates = set.intersection(*owners, *(self._owners[match.name] for match in matches))
        if len(candidates) != 1:
            return None, (), ()
        return (next(iter(candidates)), tuple(f"{match.heard}->{match.name}" for match in matches),
                tuple(Evidence(match.name, "place", match.offset) for match in matches))

    def extract(self, text: str) -> Place:
        text, heard_as = self.repair_by_sound(text)
        evidence: list[Evidence] = []
        found: dict[str, str] = {}
        owners: list[set[str]] = []
        for name in self._known_names:
            offset = text.find(name)
            if offset < 0:
                continue
            kind = self._kind[name]
            if kind in found:
                continue
            # A shorter known name inside an already found longer one is not a second place.
            if any(name in other for other in found.values()):
                continue
            found[kind] = name
            owners.append(self._owners[name])
            evidence.append(Evidence(name, "place", offset))
        for kind, pattern in (("streets", _STREET_PATTERN), ("communities", _COMMUNITY_PATTERN), ("compounds", _COMPOUND_PATTERN)):
            if kind in found:
                continue
            match = pattern.search(text)
            if match:
                name = _LEADING_FILLER.sub("", match.group(1))
                if len(name) > 2 and not _DEMONSTRATIVE.match(name):
                    found[kind] = name
                    evidence.append(Evidence(name, "place", match.start(1) + len(match.group(1)) - len(name)))

        district, district_offset = self._stated_district(text)
        district_source = "stated" if district else None
        unknown = None
        if district is None:
            unknown, unknown_offset = self._unknown_district(text)
            half_heard = self._half_heard_district(unknown) if unknown else None
            if half_heard:  # 兵无区 -> 滨湖区: stated, half heard
                heard_as = (*heard_as, f"{unknown}->{half_heard}")
                district, district_source, unknown = half_heard, "stated", None
                evidence.append(Evidence(half_heard, "place", unknown_offset))
            elif unknown:
                evidence.append(Evidence(unknown, "place", unknown_offset))
            else:
                candidates = set.intersection(*owners) if owners else set()
                if len(candidates) == 1:
                    district, district_source = next(iter(candidates)), "gazetteer"
                else:  # 无光小区 -> 湖光小区: the district only
                    district, half_heard_as, half_heard_evidence = self._district_half_heard(text, owners)
                    if district:
                        district_source = "gazetteer"
                        heard_as = (*heard_as, *half_heard_as)
                        evidence.extend(half_heard_evidence)
        else:
            evidence.append(Evidence(district, "place", district_offset))

        address, address_key, road = self._address(text, found)
        return Place(
            district=district,
            district_source=district_source,
            district_unknown=unknown,
            street=found.get("streets"),
            community=found.get("communities"),
            compound=found.get("compounds"),
            road=road,
            landmark=found.get("landmarks"),
            address=address,
            address_key=address_key,
            heard_as=heard_as,
            evidence=tuple(sorted(evidence, key=lambda e: e.char_offset)),
        )

    def _address(self, text: str, found: dict[str, str]) -> tuple[str | None, str | None, str | None]:
        road = found.get("roads")
        road_number = None
        if road:
            match = re.search(re.escape(road) + r"\s*(\d+)\s*号", text)
            road_number = f"{road}{match.group(1)}号" if match else None
        else:
            match = _ROAD_NUMBER_PATTERN.search(text)
            if match:
                road = _LEADING_FILLER.sub("", match.group(1)) or match.group(1)
                road_number = f"{road}{match.group(2)}号"
        compound = found.get("compounds")
        building = _BUILDING_PATTERN.search(text)
        unit = _UNIT_PATTERN.search(text)
        room = _ROOM_PATTERN.search(text)
        if compound:
            parts = [compound]
            if building:
                parts.append(f"{building.group(1)}栋")
            if unit:
                parts.append(f"{unit.group(1)}单元")
            if room:
                parts.append(f"{room.group(1)}室")
            address = "".join(parts)
            # The same building is the same address for duplicates; units and rooms differ per caller.
            key = f"{compound}{building.group(1)}栋" if building else (road_number or None)
            return address, key, road
        if road_number:
            return road_number, road_number, road
        return None, None, road
