"""Generate the synthetic ``companies`` dataset used by the demo, the examples and the benchmarks.

The output is deterministic for a given ``--rows`` and ``--seed``: every random draw comes from
one ``random.Random(seed)``, consumed column by column in a fixed order, and all the per-row
arithmetic is done by ``pyarrow.compute`` (no Python loop over rows, no numpy), so ten million
rows take seconds rather than minutes.

Usage::

    python data/generate.py --rows 10000 --seed 42 --output data/companies.parquet
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MAX_EMPLOYEES = 50_000
FIRST_YEAR, LAST_YEAR = 1950, 2025

# (country, relative weight, website top-level domain, the two usual legal-form suffixes)
COUNTRIES = [
    ("United States", 30, "com", ("Inc", "Corp")),
    ("United Kingdom", 10, "co.uk", ("Ltd", "PLC")),
    ("Germany", 10, "de", ("GmbH", "AG")),
    ("France", 8, "fr", ("SA", "SAS")),
    ("Canada", 8, "ca", ("Inc", "Ltd")),
    ("India", 9, "in", ("Pvt Ltd", "Ltd")),
    ("Netherlands", 6, "nl", ("BV", "NV")),
    ("Sweden", 5, "se", ("AB", "Group")),
    ("Australia", 7, "com.au", ("Pty Ltd", "Ltd")),
    ("Japan", 7, "jp", ("KK", "Co Ltd")),
]

# (industry, relative weight, revenue per employee multiplier)
INDUSTRIES = [
    ("Software", 16, 1.6),
    ("Fintech", 8, 2.0),
    ("Cybersecurity", 5, 1.7),
    ("Healthcare", 10, 1.1),
    ("Biotech", 5, 1.4),
    ("E-commerce", 9, 1.3),
    ("Retail", 9, 0.8),
    ("Manufacturing", 10, 0.9),
    ("Logistics", 8, 0.7),
    ("Energy", 6, 2.2),
    ("Media", 7, 1.0),
    ("Education", 7, 0.6),
]

# fmt: off
NAME_FIRST = [
    "Acme", "Apex", "Arc", "Aurora", "Beacon", "Blue", "Bright", "Cedar", "Cobalt", "Crest",
    "Delta", "Echo", "Ember", "Falcon", "Flux", "Granite", "Harbor", "Helix", "Iron", "Juniper",
    "Keystone", "Lumen", "Maple", "Meridian", "Nimbus", "North", "Nova", "Oak", "Orbit", "Pine",
    "Polar", "Quantum", "Quartz", "Red", "Ridge", "Silver", "Summit", "Terra", "Vertex", "Zenith",
]
NAME_SECOND = [
    "Analytics", "Bridge", "Cloud", "Data", "Dynamics", "Forge", "Grid", "Health", "Labs", "Logic",
    "Motion", "Networks", "Path", "Point", "Signal", "Source", "Stack", "Systems", "Works", "Wave",
]
# fmt: on

REVENUE_NULL_RATE = 0.08
WEBSITE_NULL_RATE = 0.12


def _uniform(rng: random.Random, n: int) -> pa.DoubleArray:
    """Draw ``n`` uniform doubles in [0, 1) with 53 random bits each, without a Python loop."""
    words = pa.Array.from_buffers(pa.uint64(), n, [None, pa.py_buffer(rng.randbytes(8 * n))])
    mantissa = pc.cast(pc.shift_right(words, pa.scalar(11, pa.uint64())), pa.float64())
    return pc.multiply(mantissa, 2.0**-53)


def _index(u: pa.DoubleArray, k: int) -> pa.Int64Array:
    """Map uniforms in [0, 1) to indices 0..k-1 with equal probability."""
    return pc.cast(pc.floor(pc.multiply(u, float(k))), pa.int64())


def _weighted_index(u: pa.DoubleArray, weights: list[float]) -> pa.Int64Array:
    """Map uniforms in [0, 1) to indices 0..len(weights)-1 drawn with the given weights.

    An index counts the cumulative thresholds at or below ``u``: one vectorised comparison per
    category, which beats a lookup for the dozen categories used here.
    """
    total = sum(weights)
    index = pa.repeat(pa.scalar(0, pa.int64()), len(u))
    running = 0.0
    for weight in weights[:-1]:
        running += weight
        index = pc.add(index, pc.cast(pc.greater_equal(u, running / total), pa.int64()))
    return index


def _normal(rng: random.Random, n: int) -> pa.DoubleArray:
    """Standard normal draws by the Box-Muller transform, vectorised."""
    u1 = pc.subtract(1.0, _uniform(rng, n))  # (0, 1]: keeps log() finite
    u2 = _uniform(rng, n)
    radius = pc.sqrt(pc.multiply(pc.ln(u1), -2.0))
    return pc.multiply(radius, pc.cos(pc.multiply(u2, 2.0 * math.pi)))


def _with_nulls(values: pa.Array, u: pa.DoubleArray, rate: float) -> pa.Array:
    """Replace the values whose uniform draw falls below ``rate`` by nulls."""
    return pc.if_else(pc.less(u, rate), pa.scalar(None, values.type), values)


def generate(rows: int, seed: int = 42) -> pa.Table:
    """Build the companies table.

    Args:
        rows: number of companies (ids run from 1 to ``rows``).
        seed: seed of the single ``random.Random`` every column draws from.

    Returns:
        A table with the columns id, name, country, industry, employees, revenue, founded and
        website.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    rng = random.Random(seed)

    ids = pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), rows))

    country_idx = _weighted_index(_uniform(rng, rows), [c[1] for c in COUNTRIES])
    countries = pc.take(pa.array([c[0] for c in COUNTRIES]), country_idx)

    first = pc.take(pa.array(NAME_FIRST), _index(_uniform(rng, rows), len(NAME_FIRST)))
    second = pc.take(pa.array(NAME_SECOND), _index(_uniform(rng, rows), len(NAME_SECOND)))
    # Suffixes are laid out two per country, so country * 2 + {0, 1} picks a local legal form.
    suffixes = pa.array([suffix for c in COUNTRIES for suffix in c[3]])
    suffix_idx = pc.add(pc.multiply(country_idx, 2), _index(_uniform(rng, rows), 2))
    names = pc.binary_join_element_wise(first, second, pc.take(suffixes, suffix_idx), " ")

    industry_idx = _weighted_index(_uniform(rng, rows), [w for _, w, _ in INDUSTRIES])
    industries = pc.take(pa.array([i for i, _, _ in INDUSTRIES]), industry_idx)

    # Heavily right-skewed headcount: exp(ln(50,000) * u^1.8) has a median near 20 and reaches
    # 50,000 only for a handful of companies, as real company registers do.
    skew = pc.power(_uniform(rng, rows), 1.8)
    headcount = pc.floor(pc.exp(pc.multiply(skew, math.log(MAX_EMPLOYEES))))
    employees = pc.cast(
        pc.min_element_wise(pc.max_element_wise(headcount, 1.0), MAX_EMPLOYEES), pa.int64()
    )

    # Revenue = employees x a log-normal revenue per employee (median $120k) scaled by industry.
    multiplier = pc.take(pa.array([m for _, _, m in INDUSTRIES]), industry_idx)
    per_employee = pc.multiply(
        pc.exp(pc.add(pc.multiply(_normal(rng, rows), 0.5), math.log(120_000.0))), multiplier
    )
    revenue = pc.round(pc.multiply(pc.cast(employees, pa.float64()), per_employee), 2)
    revenue = _with_nulls(revenue, _uniform(rng, rows), REVENUE_NULL_RATE)

    # Younger companies are more common: 2025 - floor(76 * u^1.5) lies in 1950..2025.
    span = LAST_YEAR - FIRST_YEAR + 1
    age = pc.floor(pc.multiply(pc.power(_uniform(rng, rows), 1.5), float(span)))
    founded = pc.cast(pc.subtract(float(LAST_YEAR), age), pa.int32())

    domain = pc.utf8_lower(pc.binary_join_element_wise(first, second, ""))
    tld = pc.take(pa.array([c[2] for c in COUNTRIES]), country_idx)
    website = pc.binary_join_element_wise("https://www.", domain, ".", tld, "")
    website = _with_nulls(website, _uniform(rng, rows), WEBSITE_NULL_RATE)

    return pa.table(
        {
            "id": ids,
            "name": names,
            "country": countries,
            "industry": industries,
            "employees": employees,
            "revenue": revenue,
            "founded": founded,
            "website": website,
        }
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: generate the table and write it as zstd-compressed Parquet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="number of rows (10,000)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (42)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "companies.parquet",
        help="Parquet file to write (data/companies.parquet)",
    )
    args = parser.parse_args(argv)
    if args.rows < 0:
        parser.error(f"--rows must be >= 0, got {args.rows}")

    started = time.perf_counter()
    table = generate(args.rows, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.output, compression="zstd")
    elapsed = time.perf_counter() - started
    print(f"wrote {table.num_rows:,} rows to {args.output} in {elapsed:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
