"""Offer catalog `static`: servers from the shipped `offers.toml` plus your own files.

Extra catalogs: `STRATOS_OFFER_CATALOGS` = colon-separated paths to `.toml` files (an
`[[offer]]` array of tables) or `.csv` files (a header row with the same field names; empty
cells mean "not given"). Fields: `id` (unique, `[a-z0-9_-]`), `price_usd_per_hour` and `region`
are required; `gpu_model`, `gpu_count`, `gpu_mem_mib` (per GPU), `cpu_count`, `ram_mib`,
`latency_ms`, `hardware_score`, `status` are optional. A bad value stops loading with an error
that names the file, the row and the field. Later files may not reuse an id.

Latency: a row's `latency_ms` when given, else the network round trip from the user's region
(`STRATOS_USER_REGION`, default `us-east`) to the offer's region::

    latency_ms = 5 + 0.014 * great_circle_km

(5 ms for last mile and serving; light in fibre covers ~200 km/ms, routes run ~1.4x the
great circle, and a round trip goes both ways: 2 * 1.4 / 200 = 0.014 ms/km). `REGIONS` holds
each region's approximate data-centre location. us-east -> eu-west estimates ~82 ms,
us-east -> ap-northeast ~158 ms, close to measured public-cloud round trips.
"""

from __future__ import annotations

import csv
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from schemas.specs import ServerOffer
from stratosd import hookimpl
from stratosd.api import OfferCatalog
from stratosd.errors import ConfigError

SHIPPED = Path(__file__).with_name("offers.toml")
DEFAULT_USER_REGION = "us-east"

# region -> (latitude, longitude) of a typical data centre there
REGIONS: dict[str, tuple[float, float]] = {
    "us-east": (39.0, -77.5),  # N. Virginia
    "us-central": (41.6, -93.6),  # Iowa
    "us-west": (45.6, -121.2),  # Oregon
    "ca-central": (45.5, -73.6),  # Montreal
    "sa-east": (-23.5, -46.6),  # Sao Paulo
    "eu-west": (53.3, -6.3),  # Dublin
    "eu-central": (50.1, 8.7),  # Frankfurt
    "eu-north": (59.3, 18.1),  # Stockholm
    "me-central": (25.2, 55.3),  # Dubai
    "ap-south": (19.1, 72.9),  # Mumbai
    "ap-southeast": (1.35, 103.8),  # Singapore
    "ap-northeast": (35.7, 139.7),  # Tokyo
    "au-east": (-33.9, 151.2),  # Sydney
}
BASE_LATENCY_MS = 5.0
MS_PER_KM = 0.014
_EARTH_KM = 6371.0

OfferId = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,127}$")]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNeg = Annotated[float, Meta(ge=0.0)]


class CatalogRow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One offer as written in a catalog file (unknown fields are typos and are refused)."""

    id: OfferId
    price_usd_per_hour: NonNeg
    region: Annotated[str, Meta(min_length=1)]
    gpu_model: str = ""
    gpu_count: NonNegInt = 0
    gpu_mem_mib: NonNegInt = 0
    cpu_count: NonNegInt = 0
    ram_mib: NonNegInt = 0
    latency_ms: NonNeg | None = None
    hardware_score: NonNeg | None = None
    status: Literal["up", "down"] = "up"


def region_latency_ms(user_region: str, region: str) -> float:
    """Estimated round trip between two regions of `REGIONS` (see the module docstring)."""
    (la1, lo1), (la2, lo2) = REGIONS[user_region], REGIONS[region]
    p1, p2, dl = math.radians(la1), math.radians(la2), math.radians(lo2 - lo1)
    cos_c = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)
    km = _EARTH_KM * math.acos(max(-1.0, min(1.0, cos_c)))
    return round(BASE_LATENCY_MS + MS_PER_KM * km, 1)


def _field_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(field, reason) from msgspec's message."""
    text = str(exc)
    for pattern in (r"missing required field `(\w+)`", r"unknown field `(\w+)`"):
        m = re.search(pattern, text)
        if m:
            return m.group(1), text
    m = re.search(r"^(.*) - at `\$\.(\w+)", text)
    if m:
        return m.group(2), m.group(1)
    return "?", text


def _convert(raw: Mapping[str, Any], where: str, *, strict: bool) -> CatalogRow:
    try:
        return msgspec.convert(dict(raw), CatalogRow, strict=strict)
    except msgspec.ValidationError as exc:
        field, reason = _field_error(exc)
        raise ConfigError(
            f"{where}: field `{field}`: {reason}",
            hint="fix that row; ids are lowercase [a-z0-9_-], prices and counts >= 0",
            field=field,
        ) from None


def read_catalog_file(path: Path) -> list[CatalogRow]:
    """Rows of one .toml or .csv catalog; ConfigError names file, row and field."""
    if not path.is_file():
        raise ConfigError(f"offer catalog {path} not found",
                          hint="fix the path in STRATOS_OFFER_CATALOGS", field="catalog")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"offer catalog {path}: invalid TOML: {exc}",
                              hint="fix the TOML syntax", field="catalog") from None
        tables = doc.get("offer")
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError(f"offer catalog {path}: expected [[offer]] tables",
                              hint="write each server as an [[offer]] table", field="offer")
        return [
            _convert(t, f"offer catalog {path}: offer #{n} ({t.get('id', 'no id')})",
                     strict=True)
            for n, t in enumerate(tables, start=1)
        ]
    if suffix == ".csv":
        rows = []
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for rec in reader:
                cells = {k.strip(): v.strip() for k, v in rec.items()
                         if k is not None and v is not None and v.strip() != ""}
                where = f"offer catalog {path}: row {reader.line_num}"
                if None in rec:
                    raise ConfigError(f"{where}: more cells than header columns",
                                      hint="quote cells that contain commas", field="row")
                rows.append(_convert(cells, where, strict=False))
        return rows
    raise ConfigError(f"offer catalog {path}: unsupported file type {suffix!r}",
                      hint="use a .toml or .csv file", field="catalog")


def catalog_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """The shipped catalog, then the files named in STRATOS_OFFER_CATALOGS."""
    value = (os.environ if env is None else env).get("STRATOS_OFFER_CATALOGS", "")
    return [SHIPPED, *(Path(p).expanduser() for p in value.split(":") if p.strip())]


class StaticCatalog(OfferCatalog):
    """Offers read from TOML/CSV files: the shipped price list and STRATOS_OFFER_CATALOGS."""

    name: ClassVar[str] = "static"
    description: ClassVar[str] = "shipped offers.toml plus files in STRATOS_OFFER_CATALOGS"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        p = dict(params or {})
        unknown = set(p) - {"paths", "user_region", "shipped"}
        if unknown:
            raise ConfigError(f"unknown static catalog parameter(s): {sorted(unknown)}",
                              hint="use paths, user_region or shipped", field="catalog")
        self.user_region = str(p.get("user_region") or os.environ.get(
            "STRATOS_USER_REGION", DEFAULT_USER_REGION)).lower()
        if self.user_region not in REGIONS:
            raise ConfigError(
                f"unknown user region {self.user_region!r}",
                hint=f"set STRATOS_USER_REGION to one of: {', '.join(REGIONS)}",
                field="STRATOS_USER_REGION",
            )
        if "paths" in p:
            extra = [Path(x) for x in p["paths"]]
            self.paths = ([SHIPPED] if p.get("shipped", True) else []) + extra
        else:
            self.paths = catalog_paths() if p.get("shipped", True) else catalog_paths()[1:]

    def offers(self) -> list[ServerOffer]:
        """Every offer from every file, latency filled in from the region table."""
        seen: dict[str, Path] = {}
        out: list[ServerOffer] = []
        for path in self.paths:
            for n, row in enumerate(read_catalog_file(path), start=1):
                if row.id in seen:
                    raise ConfigError(
                        f"offer catalog {path}: offer #{n}: id {row.id!r} already defined "
                        f"in {seen[row.id]}",
                        hint="give every offer a unique id", field="id",
                    )
                seen[row.id] = path
                out.append(self._offer(row, path, n))
        return out

    def _offer(self, row: CatalogRow, path: Path, n: int) -> ServerOffer:
        latency = row.latency_ms
        if latency is None:
            region = row.region.lower()
            if region not in REGIONS:
                raise ConfigError(
                    f"offer catalog {path}: offer #{n} ({row.id}): field `region`: unknown "
                    f"region {row.region!r}, cannot estimate latency",
                    hint=f"use one of {', '.join(REGIONS)}, or give latency_ms", field="region",
                )
            latency = region_latency_ms(self.user_region, region)
        return ServerOffer(
            id=row.id, source=f"catalog:{self.name}", gpu_model=row.gpu_model,
            gpu_count=row.gpu_count, gpu_mem_mib=row.gpu_mem_mib, cpu_count=row.cpu_count,
            ram_mib=row.ram_mib, price_usd_per_hour=row.price_usd_per_hour, latency_ms=latency,
            region=row.region, hardware_score=row.hardware_score, status=row.status,
        )


@hookimpl
def stratos_offer_catalogs() -> list[type[OfferCatalog]]:
    """Register the static catalog."""
    return [StaticCatalog]
