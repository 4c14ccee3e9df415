"""Generate services/search/data/catalog.csv, the demo shop's product catalog.

Run once; the CSV is the data file (committed) and search loads it at start.
The output is deterministic (fixed seed, no clock), so re-running the script
reproduces the same file byte for byte:

    .venv/bin/python scripts/make_catalog.py            # writes the CSV
    .venv/bin/python scripts/make_catalog.py --check    # exit 1 if it differs
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "services" / "search" / "data" / "catalog.csv"
PRODUCT_COUNT = 300
SEED = 20240601


@dataclass(frozen=True)
class Kind:
    noun: str
    lo_eur: int  # price range in whole euros
    hi_eur: int
    use: str  # what it is for, for the description


CATEGORIES: dict[str, list[Kind]] = {
    "kitchen": [
        Kind("Chef's Knife", 29, 149, "slices, dices and minces with a balanced, full-tang blade"),
        Kind("Cast Iron Skillet", 24, 89, "sears, bakes and fries, and keeps heat evenly"),
        Kind("Pour-Over Coffee Dripper", 12, 45, "brews a clean, bright cup one mug at a time"),
        Kind("Espresso Cup Set", 14, 39, "serves espresso and cortado in pre-warmed comfort"),
        Kind("Cutting Board", 15, 69, "gives knives a forgiving surface that is easy to clean"),
        Kind("Dutch Oven", 49, 229, "braises, stews and bakes bread with a tight-fitting lid"),
        Kind("Stoneware Mug", 9, 29, "holds 350 ml of tea or coffee and survives the dishwasher"),
        Kind("Spice Grinder", 19, 59, "grinds pepper, cumin and coriander to an even texture"),
        Kind("Tea Kettle", 25, 99, "boils water fast on gas, electric and induction hobs"),
    ],
    "home-office": [
        Kind("Desk Lamp", 29, 149, "lights the desk with warm, flicker-free LEDs"),
        Kind("Notebook", 6, 24, "has 192 numbered pages of fountain-pen-friendly paper"),
        Kind("Monitor Stand", 29, 119, "raises the screen to eye level and frees desk space"),
        Kind("Fountain Pen", 19, 179, "writes smoothly with a steel nib and a piston converter"),
        Kind("Desk Organizer", 15, 59, "keeps pens, cables and notes in their place"),
        Kind("Ergonomic Office Chair", 189, 649, "supports the lower back through a long working day"),
        Kind("Mechanical Keyboard", 69, 219, "types with tactile switches and a detachable USB-C cable"),
        Kind("Wireless Mouse", 19, 89, "tracks precisely on wood, glass and fabric"),
    ],
    "outdoor": [
        Kind("Hiking Backpack", 59, 229, "carries a day's gear with a ventilated back panel"),
        Kind("Two-Person Tent", 119, 449, "pitches in minutes and sheds wind and rain"),
        Kind("Sleeping Bag", 69, 299, "keeps you warm down to the stated comfort temperature"),
        Kind("Camping Stove", 35, 129, "boils a litre of water in under four minutes"),
        Kind("Trekking Poles", 39, 139, "take strain off the knees on steep descents"),
        Kind("Headlamp", 19, 79, "lights the trail with a red night mode and a rechargeable cell"),
        Kind("Insulated Water Bottle", 19, 49, "keeps drinks cold for a day and hot for twelve hours"),
    ],
    "audio": [
        Kind("Wireless Headphones", 79, 399, "play for 30 hours with active noise cancelling"),
        Kind("Bluetooth Speaker", 39, 249, "fills a room with clear sound and shrugs off splashes"),
        Kind("Turntable", 149, 599, "plays vinyl at 33 and 45 rpm with a built-in preamp"),
        Kind("In-Ear Monitors", 49, 299, "isolate noise and deliver detailed, balanced sound"),
        Kind("USB Microphone", 49, 189, "records voice and podcasts with a cardioid pattern"),
        Kind("Bookshelf Speakers", 129, 549, "pair with any amplifier for rich stereo listening"),
    ],
    "apparel": [
        Kind("Merino T-Shirt", 39, 89, "regulates temperature and resists odour on long days"),
        Kind("Rain Jacket", 89, 289, "keeps you dry with taped seams and a packable hood"),
        Kind("Wool Socks", 12, 29, "cushion the foot and stay warm even when damp"),
        Kind("Denim Jacket", 69, 169, "wears in beautifully and layers over anything"),
        Kind("Running Shoes", 79, 189, "cushion every stride with a breathable mesh upper"),
        Kind("Knit Beanie", 15, 39, "keeps ears warm on cold, windy mornings"),
        Kind("Leather Belt", 29, 89, "is cut from one piece of vegetable-tanned leather"),
    ],
    "garden": [
        Kind("Pruning Shears", 19, 69, "cut branches up to 20 mm cleanly without crushing"),
        Kind("Watering Can", 15, 49, "waters seedlings gently through a removable rose"),
        Kind("Raised Garden Bed", 69, 249, "grows vegetables at a comfortable working height"),
        Kind("Garden Hose", 25, 89, "reaches the far corners and resists kinking"),
        Kind("Herb Planter", 19, 59, "grows basil, mint and thyme on a sunny windowsill"),
        Kind("Compost Bin", 39, 129, "turns kitchen scraps into rich soil in a few months"),
    ],
    "fitness": [
        Kind("Yoga Mat", 19, 89, "grips well and cushions joints during floor work"),
        Kind("Adjustable Dumbbells", 99, 349, "replace a rack of weights with a quick-change dial"),
        Kind("Jump Rope", 9, 39, "spins fast on ball bearings for cardio intervals"),
        Kind("Resistance Bands", 12, 45, "add load to squats, rows and stretches anywhere"),
        Kind("Foam Roller", 15, 49, "loosens tight muscles after training"),
        Kind("Kettlebell", 25, 99, "builds strength and power with swings and presses"),
    ],
    "home": [
        Kind("Linen Duvet Cover", 79, 229, "breathes in summer and softens with every wash"),
        Kind("Scented Candle", 12, 39, "burns cleanly for 45 hours in a reusable glass"),
        Kind("Throw Blanket", 39, 129, "adds warmth to the sofa on cool evenings"),
        Kind("Table Lamp", 39, 179, "casts a soft, even light through a fabric shade"),
        Kind("Ceramic Vase", 19, 79, "shows off fresh or dried flowers"),
        Kind("Bath Towel Set", 29, 99, "dries quickly and stays soft wash after wash"),
        Kind("Wall Clock", 25, 119, "keeps silent time with a sweep movement"),
    ],
    "toys": [
        Kind("Wooden Building Blocks", 19, 69, "invite open-ended building for ages three and up"),
        Kind("Jigsaw Puzzle", 12, 39, "has 1000 pieces that fit snugly and a poster guide"),
        Kind("Board Game", 19, 69, "brings two to six players to the table for an evening"),
        Kind("Remote Control Car", 39, 149, "races across floors and gravel with a rechargeable battery"),
        Kind("Plush Bear", 14, 39, "is soft, washable and loved from the first hug"),
        Kind("Kite", 15, 59, "flies steadily in light and moderate winds"),
    ],
}

SERIES = [
    "Alder", "Birch", "Cobalt", "Dune", "Ember", "Fjord", "Granite", "Harbor",
    "Iris", "Juniper", "Kestrel", "Lumen", "Meadow", "Nimbus", "Orchard", "Pioneer",
    "Quarry", "Ridge", "Summit", "Tundra", "Umber", "Vale", "Willow", "Zephyr",
]
FINISHES = [
    ("Walnut", "finished in oiled walnut"),
    ("Charcoal", "in a matte charcoal finish"),
    ("Sage", "in a muted sage green"),
    ("Sand", "in a warm sand tone"),
    ("Navy", "in deep navy"),
    ("Terracotta", "in sunbaked terracotta"),
    ("Slate", "in cool slate grey"),
    ("Ivory", "in soft ivory"),
    ("Olive", "in olive drab"),
    ("Crimson", "in rich crimson"),
]
EXTRAS = [
    "Designed in Lisbon and made to last.",
    "Backed by a two-year warranty.",
    "Packed in recycled, plastic-free packaging.",
    "A favourite with our customers for gifting.",
    "Easy to clean and built for everyday use.",
    "Repairable, with spare parts available for ten years.",
    "Tested by our team for a full season before release.",
    "Light enough to take anywhere.",
]


def build_rows() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    kinds = [(category, kind) for category, items in CATEGORIES.items() for kind in items]
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < PRODUCT_COUNT:
        category, kind = rng.choice(kinds)
        series = rng.choice(SERIES)
        finish, finish_text = rng.choice(FINISHES)
        name = f"{series} {kind.noun} - {finish}"
        if name in seen:
            continue
        seen.add(name)
        # Prices end in .99 or .00 like a real shop's.
        euros = rng.randint(kind.lo_eur, kind.hi_eur)
        cents = rng.choice((0, 99, 99, 99, 50))
        price_minor = max(euros * 100 + cents - (100 if cents else 0), 100)
        description = (
            f"The {series} {kind.noun.lower()} {kind.use}. "
            f"Shown {finish_text}. {rng.choice(EXTRAS)}"
        )
        rows.append(
            {
                "id": f"sku-{len(rows) + 1:04d}",
                "name": name,
                "description": description,
                "category": category,
                "price_minor": str(price_minor),
                "currency": "EUR",
            }
        )
    return rows


def render(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out,
        fieldnames=["id", "name", "description", "category", "price_minor", "currency"],
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed CSV instead of writing it")
    parser.add_argument("--output", type=Path, default=CATALOG)
    args = parser.parse_args(argv)
    text = render(build_rows())
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} differs from what scripts/make_catalog.py generates", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines()) - 1} products to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
