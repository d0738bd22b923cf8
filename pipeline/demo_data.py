"""A deterministic generator of realistic support tickets for the offline demo.

Several intents, varied phrasing (templates x slots x politeness x typos), and on purpose
some ambiguous rows (two intents in one ticket) and label noise, so accuracy is not
trivially 100%. The same seed always gives byte-identical output.

    python -m pipeline.demo_data --out data/demo/support_tickets.csv --rows 2400
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

INTENTS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {plan} subscription this month",
        "why is there an extra fee of {amount} on my invoice",
        "please refund the {amount} you took from my card",
        "my invoice for {month} shows the wrong amount",
        "can I get a copy of the receipt for {month}",
        "the payment of {amount} went through but my plan still says unpaid",
    ],
    "account_access": [
        "I can't log in to my account since {when}",
        "the password reset email never arrives",
        "my account got locked after too many attempts",
        "two-factor code is not accepted on the {device}",
        "how do I change the email address on my login",
        "I keep getting signed out on the {device}",
    ],
    "shipping": [
        "my order {order} has not arrived yet",
        "tracking for {order} has not updated since {when}",
        "the parcel was delivered to the wrong address",
        "can I change the delivery address for order {order}",
        "the courier says the package was returned to sender",
        "how long does shipping to {country} usually take",
    ],
    "technical_issue": [
        "the app crashes when I open settings on my {device}",
        "I get error {code} when uploading a file",
        "the page keeps loading forever since {when}",
        "sync between my {device} and laptop stopped working",
        "notifications don't show up on the {device}",
        "export to csv produces an empty file",
    ],
    "cancellation": [
        "please cancel my {plan} subscription",
        "how do I close my account for good",
        "I want to stop the automatic renewal",
        "cancel my order {order} before it ships",
        "I'd like to downgrade and then cancel the {plan} plan",
        "end my membership at the end of {month}",
    ],
    "product_question": [
        "does the {plan} plan include priority support",
        "is there a student discount for the {plan} plan",
        "can I use the product offline on my {device}",
        "what is the storage limit on the {plan} tier",
        "do you ship to {country}",
        "which plan lets me add more team members",
    ],
}
SLOTS = {
    "plan": ["basic", "pro", "premium", "family", "business", "annual"],
    "amount": ["$9.99", "$12", "$49.00", "EUR 20", "$120", "$5"],
    "month": ["January", "March", "May", "July", "September", "November", "last month"],
    "when": ["yesterday", "Monday", "last week", "this morning", "the update", "two days ago"],
    "device": ["iPhone", "Android phone", "iPad", "Windows laptop", "Mac", "tablet"],
    "order": ["#10234", "#88412", "#55120", "#70001", "#31337", "A-4411"],
    "country": ["Canada", "Germany", "Brazil", "Japan", "Australia", "the UK"],
    "code": ["500", "E42", "403", "0x80070005", "timeout", "413"],
}
OPENERS = ["", "", "hi, ", "hello team, ", "hey, ", "good morning. ", "urgent: ", "not happy. "]
CLOSERS = ["", "", "", " thanks", " please help", " asap", "!!", " - any update?", " thank you in advance"]


def _typo(text: str, rng: random.Random) -> str:
    if len(text) < 8:
        return text
    i = rng.randrange(1, len(text) - 1)
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def generate(rows: int = 2400, seed: int = 13, noise: float = 0.05, ambiguous: float = 0.06) -> list[dict[str, str]]:
    rng = random.Random(seed)
    labels = sorted(INTENTS)
    out = []
    for i in range(rows):
        label = labels[i % len(labels)] if rng.random() < 0.7 else rng.choice(labels)
        template = rng.choice(INTENTS[label])
        text = template.format(**{k: rng.choice(v) for k, v in SLOTS.items()})
        if rng.random() < ambiguous:  # a second intent in the same ticket
            other = rng.choice([x for x in labels if x != label])
            text += " and also " + rng.choice(INTENTS[other]).format(**{k: rng.choice(v) for k, v in SLOTS.items()})
        text = rng.choice(OPENERS) + text + rng.choice(CLOSERS)
        if rng.random() < 0.15:
            text = _typo(text, rng)
        if rng.random() < 0.3:
            text = text[0].upper() + text[1:]
        if rng.random() < noise:  # a mislabelled ticket, as real queues have
            label = rng.choice([x for x in labels if x != label])
        out.append({"ticket_id": f"T{i:05d}", "text": text, "label": label})
    return out


def write_csv(path: str | Path, rows: int = 2400, seed: int = 13) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = generate(rows, seed)
    # Identical texts with different labels are left to dataset-publish's validation to catch;
    # keep the demo clean of them so the demo publishes with on_invalid=error.
    seen: dict[str, str] = {}
    clean = []
    for r in records:
        if seen.setdefault(r["text"], r["label"]) == r["label"]:
            clean.append(r)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["ticket_id", "text", "label"], lineterminator="\n")
        w.writeheader()
        w.writerows(clean)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo/support_tickets.csv", help="the CSV file to write (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=2400, help="tickets to make (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=13, help="the same seed gives the same file (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.rows < 1:  # a header alone is no dataset: dataset-publish would refuse it later, far from here
        ap.error(f"--rows must be at least 1 (got {args.rows})")
    print(write_csv(args.out, args.rows, args.seed))


if __name__ == "__main__":
    main()
